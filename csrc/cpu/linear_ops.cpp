// CPU linear_nf4 and its backward. M <= 16 rows (decode-bound): fused kernels read the 4-bit
// codes directly. Larger M (compute-bound): W is decoded tile by tile into float32 buffers of
// a few MB and each tile goes through BLAS; the whole dense W never exists. The tiles are
// shared out among the threads in one parallel region (each thread decodes its tile and runs a
// single-threaded BLAS call on it): one fork/join per call, not two per tile, which matters on a
// busy machine where every join waits for the slowest, possibly descheduled, thread.
// Activations of any float dtype are computed in float32 and returned in their own dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>

#include "../op_checks.h"
#include "cpu_kernels.h"
#include "kernel_args.h"

namespace qlora::cpu {
namespace {

// One thread's decoded tile: up to 8 MB of float32, and between 128 and 256 rows of W forward
// (64 and 512 columns backward). Narrower tiles cost BLAS efficiency (it re-packs the activations
// for every call: measured here, 128-row tiles run 12% slower than one whole-matrix call, 256-row
// ones 3%); wider ones only cost memory.
constexpr int64_t kTileBytes = 8 << 20;
constexpr int64_t kMinTileRows = 128, kMaxTileRows = 256;
constexpr int64_t kMinTileCols = 64, kMaxTileCols = 512;

// Decodes rows [n0, n1) x columns [k0, k1) of the [*, K] weight into `out` (row-major).
void decode_tile(const CpuKernels& k, const Nf4View& w, int64_t K, int64_t n0, int64_t n1,
                 int64_t k0, int64_t k1, float* out) {
  const int64_t cols = k1 - k0;
  const bool whole_blocks = K % kBlockSize == 0 && k0 % kBlockSize == 0 && cols % kBlockSize == 0;
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * cols;
    if (whole_blocks) {
      const int64_t b = (n * K + k0) / kBlockSize;
      k.dequantize_blocks(w, b, b + cols / kBlockSize, row, DType::kFloat32);
    } else {
      decode_range_f32(w, n * K + k0, cols, row);
    }
  }
}

// Tile size along an extent: at most `max_tile`, a multiple of `align`, and a tile count that
// is a whole number of rounds for the threads (3 tiles on 2 threads would leave one idle a third
// of the time).
int64_t balanced_tile(int64_t extent, int64_t max_tile, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = (extent + max_tile - 1) / max_tile;
  const int64_t rounds = (tiles + threads - 1) / threads;
  const int64_t tile = (extent + rounds * threads - 1) / (rounds * threads);
  return std::min(extent, (tile + align - 1) / align * align);
}

at::Tensor as_float_matrix(const at::Tensor& t, int64_t cols) {
  return t.reshape({-1, cols}).to(at::kFloat).contiguous();
}

at::Tensor linear_nf4(const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                      const at::Tensor& absmax_offset, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  const int64_t K = check_linear_args(x, packed, absmax_codes, absmax_scales, absmax_offset,
                                      out_features, bias);
  const int64_t N = out_features;
  const Nf4Storage w(packed, absmax_codes, absmax_scales, absmax_offset);
  const CpuKernels& k = active_cpu_kernels();

  const at::Tensor x2 = as_float_matrix(x, K);  // [M, K]
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N]
  if (M > 0 && M <= kMaxFusedRows && K % kBlockSize == 0) {
    at::Tensor xs = at::empty_like(x2);
    for (int64_t m = 0; m < M; ++m) {
      split_pairs(x2.const_data_ptr<float>() + m * K, K, xs.mutable_data_ptr<float>() + m * K);
    }
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      k.gemv_rows(w.view, K, n0, n1, xs.const_data_ptr<float>(), M, K,
                  y.mutable_data_ptr<float>(), N);
    });
  } else if (M > 0) {
    const int64_t max_rows = std::clamp(kTileBytes / (4 * K) / 16 * 16, kMinTileRows, kMaxTileRows);
    const int64_t rows = balanced_tile(N, max_rows, 16);
    const at::ThreadLocalState caller;  // below autograd, etc.: the worker threads must be too
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard same_state(caller);
      at::Tensor tile = at::empty({rows, K}, x2.options());  // this thread's buffer
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows);
        decode_tile(k, w.view, K, n0, n1, 0, K, tile.mutable_data_ptr<float>());
        at::Tensor y_cols = y.narrow(1, n0, n1 - n0);
        at::mm_out(y_cols, x2, tile.narrow(0, 0, n1 - n0).t());
      }
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor linear_nf4_grad_input(const at::Tensor& grad_y, const at::Tensor& packed,
                                 const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                                 const at::Tensor& absmax_offset, int64_t in_features) {
  const int64_t N = check_grad_input_args(grad_y, packed, absmax_codes, absmax_scales,
                                          absmax_offset, in_features);
  const int64_t K = in_features;
  const Nf4Storage w(packed, absmax_codes, absmax_scales, absmax_offset);
  const CpuKernels& k = active_cpu_kernels();

  const at::Tensor g2 = as_float_matrix(grad_y, N);  // [M, N]
  const int64_t M = g2.size(0);
  at::Tensor gx = at::empty({M, K}, g2.options());  // [M, K]
  if (M > 0 && M <= kMaxFusedRows && K % kBlockSize == 0) {
    at::parallel_for(0, K / kBlockSize, 1, [&](int64_t c0, int64_t c1) {
      k.gemv_cols(w.view, N, K, c0 * kBlockSize, c1 * kBlockSize, g2.const_data_ptr<float>(), M,
                  N, gx.mutable_data_ptr<float>(), K);
    });
  } else if (M > 0) {
    // Column tiles: each decoded [N, cols] tile yields finished columns of grad_x.
    const int64_t fit = kTileBytes / (4 * N) / kBlockSize * kBlockSize;
    const int64_t cols = balanced_tile(K, std::clamp(fit, kMinTileCols, kMaxTileCols), kBlockSize);
    const at::ThreadLocalState caller;
    at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard same_state(caller);
      at::Tensor storage = at::empty({N * cols}, g2.options());  // this thread's buffer
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * cols, k1 = std::min(K, k0 + cols);
        at::Tensor tile = storage.narrow(0, 0, N * (k1 - k0)).view({N, k1 - k0});
        decode_tile(k, w.view, K, 0, N, k0, k1, tile.mutable_data_ptr<float>());
        at::Tensor gx_cols = gx.narrow(1, k0, k1 - k0);
        at::mm_out(gx_cols, g2, tile);
      }
    });
  }
  std::vector<int64_t> out_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  out_shape.back() = K;
  return gx.to(grad_y.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("linear_nf4", &linear_nf4);
  m.impl("linear_nf4_grad_input", &linear_nf4_grad_input);
}

}  // namespace qlora::cpu
