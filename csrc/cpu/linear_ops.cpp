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

// One thread's decoded tile: at most 4 MB of float32. A thread owns a band of up to 1024 output
// columns (rows of W forward, columns of W backward) and walks the reduction dimension through
// it in chunks that keep the tile within 4 MB, accumulating into its band of the output. BLAS
// re-packs the activations for every call, so what costs is the number of bands: bands of 128
// rows of W spanning all of K (the earlier layout) ran 12% slower than one whole-matrix call, and
// at K = 11008 only 176 rows fit, 30-50% slower.
constexpr int64_t kTileBytes = 4 << 20;
constexpr int64_t kMaxBand = 1024;

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

// How much of the reduction dimension (`extent`) one tile of `band` output columns takes: a
// multiple of the NF4 block (so the tile decodes whole blocks) that keeps the tile within
// kTileBytes, and about equal chunks rather than a full one and a sliver.
int64_t reduction_chunk(int64_t extent, int64_t band) {
  const int64_t fit = std::max<int64_t>(kBlockSize, kTileBytes / (4 * band) / kBlockSize * kBlockSize);
  const int64_t chunks = (extent + fit - 1) / fit;
  const int64_t chunk = (extent + chunks - 1) / chunks;
  return std::min(extent, (chunk + kBlockSize - 1) / kBlockSize * kBlockSize);
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
    const int64_t rows = balanced_tile(N, kMaxBand, 16);  // rows of W per band
    const int64_t chunk = reduction_chunk(K, rows);      // columns of W per tile
    const at::ThreadLocalState caller;  // below autograd, etc.: the worker threads must be too
    at::parallel_for(0, (N + rows - 1) / rows, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard same_state(caller);
      at::Tensor storage = at::empty({rows * chunk}, x2.options());  // this thread's tile
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows);
        at::Tensor y_band = y.narrow(1, n0, n1 - n0);  // [M, n1 - n0]
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t k1 = std::min(K, k0 + chunk);
          at::Tensor tile = storage.narrow(0, 0, (n1 - n0) * (k1 - k0)).view({n1 - n0, k1 - k0});
          decode_tile(k, w.view, K, n0, n1, k0, k1, tile.mutable_data_ptr<float>());
          const at::Tensor x_chunk = x2.narrow(1, k0, k1 - k0);
          if (k0 == 0) {
            at::mm_out(y_band, x_chunk, tile.t());
          } else {
            at::addmm_out(y_band, y_band, x_chunk, tile.t());
          }
        }
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
    const int64_t cols = balanced_tile(K, kMaxBand, kBlockSize);  // columns of W per band
    const int64_t chunk = reduction_chunk(N, cols);                 // rows of W per tile
    const at::ThreadLocalState caller;
    at::parallel_for(0, (K + cols - 1) / cols, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard same_state(caller);
      at::Tensor storage = at::empty({chunk * cols}, g2.options());  // this thread's tile
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * cols, k1 = std::min(K, k0 + cols);
        at::Tensor gx_band = gx.narrow(1, k0, k1 - k0);  // [M, k1 - k0]
        for (int64_t n0 = 0; n0 < N; n0 += chunk) {
          const int64_t n1 = std::min(N, n0 + chunk);
          at::Tensor tile = storage.narrow(0, 0, (n1 - n0) * (k1 - k0)).view({n1 - n0, k1 - k0});
          decode_tile(k, w.view, K, n0, n1, k0, k1, tile.mutable_data_ptr<float>());
          const at::Tensor g_chunk = g2.narrow(1, n0, n1 - n0);
          if (n0 == 0) {
            at::mm_out(gx_band, g_chunk, tile);
          } else {
            at::addmm_out(gx_band, gx_band, g_chunk, tile);
          }
        }
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
