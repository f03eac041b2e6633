// CPU linear_nf4 and its backward. M <= 16 rows (decode-bound; the backward up to the kernel
// table's max_gemv_cols_rows): fused kernels read the 4-bit codes directly. Larger M
// (compute-bound): W is decoded tile by tile into float32 buffers of a few MB and each tile goes
// through BLAS; the whole dense W never exists. The tiles are shared out among the threads in one
// parallel region (each thread decodes its tile and runs a single-threaded BLAS call on it): one
// fork/join per call, not two per tile, which matters on a busy machine where every join waits
// for the slowest, possibly descheduled, thread.
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

// out = act @ W^T (forward: bands over W's rows, the reduction over its columns) or
// out = act @ W (backward: bands over W's columns, the reduction over its rows), band by band on
// the threads, each band's reduction in tiles decoded into the thread's buffer.
void banded_matmul(const CpuKernels& k, const Nf4View& w, int64_t N, int64_t K, bool transposed,
                   const at::Tensor& act, at::Tensor& out) {
  const int64_t band_extent = transposed ? N : K, reduce_extent = transposed ? K : N;
  const int64_t band = balanced_tile(band_extent, kMaxBand, transposed ? 16 : kBlockSize);
  const int64_t chunk = reduction_chunk(reduce_extent, band);
  const at::ThreadLocalState caller;  // below autograd, etc.: the worker threads must be too
  at::parallel_for(0, (band_extent + band - 1) / band, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_state(caller);
    at::Tensor storage = at::empty({band * chunk}, act.options());  // this thread's tile
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * band, b1 = std::min(band_extent, b0 + band);
      at::Tensor out_band = out.narrow(1, b0, b1 - b0);  // [M, b1 - b0]
      for (int64_t r0 = 0; r0 < reduce_extent; r0 += chunk) {
        const int64_t r1 = std::min(reduce_extent, r0 + chunk);
        at::Tensor tile = storage.narrow(0, 0, (b1 - b0) * (r1 - r0));
        if (transposed) {  // W rows [b0, b1) x columns [r0, r1), used as its transpose
          decode_tile(k, w, K, b0, b1, r0, r1, tile.mutable_data_ptr<float>());
          tile = tile.view({b1 - b0, r1 - r0}).t();
        } else {           // W rows [r0, r1) x columns [b0, b1)
          decode_tile(k, w, K, r0, r1, b0, b1, tile.mutable_data_ptr<float>());
          tile = tile.view({r1 - r0, b1 - b0});
        }
        const at::Tensor act_chunk = act.narrow(1, r0, r1 - r0);
        if (r0 == 0) {
          at::mm_out(out_band, act_chunk, tile);
        } else {
          at::addmm_out(out_band, out_band, act_chunk, tile);
        }
      }
    }
  });
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
    banded_matmul(k, w.view, N, K, /*transposed=*/true, x2, y);
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
  if (M > 0 && M <= k.max_gemv_cols_rows && K % kBlockSize == 0) {
    at::parallel_for(0, K / kBlockSize, 1, [&](int64_t c0, int64_t c1) {
      k.gemv_cols(w.view, N, K, c0 * kBlockSize, c1 * kBlockSize, g2.const_data_ptr<float>(), M,
                  N, gx.mutable_data_ptr<float>(), K);
    });
  } else if (M > 0) {
    banded_matmul(k, w.view, N, K, /*transposed=*/false, g2, gx);
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
