// CPU linear_nf4 and its backward. M <= 16 rows (decode-bound; the backward up to the kernel
// table's max_gemv_cols_rows, or kMaxFusedGradRowsBf16Tiles where bf16 tiles take the larger M):
// fused kernels read the 4-bit codes directly. Larger M
// (compute-bound): W is decoded tile by tile into float32 buffers of a few MB and each tile goes
// through BLAS; the whole dense W never exists. The tiles are shared out among the threads in one
// parallel region (each thread decodes its tile and runs a single-threaded BLAS call on it): one
// fork/join per call, not two per tile, which matters on a busy machine where every join waits
// for the slowest, possibly descheduled, thread.
// Activations are computed in float32 and returned in their own dtype, except bf16 activations
// of the tile path on a CPU with native bf16 dot products (bf16_tiles below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

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
// The narrowest band BLAS is given: a remainder narrower than this joins the band before it.
// torch's float32 matmul (oneDNN) with fewer than about 12 output columns takes another kernel
// whose error was 2.3-2.8x that of wider products over a reduction of 4160 (129 rows, 1 to 9
// columns; 12 and more: the same as the whole product), and 41 rows of W went in bands of 32
// and 9.
constexpr int64_t kMinBand = 16;

// A tile of a few columns of W (the backward's bands) reads each row's codes a whole row apart:
// the hardware prefetchers do not follow, and each row waited on memory (11008 x 4096 backward
// in bf16 bands of 192 columns: about 29 ms of 93 at M = 256 went to decoding, ad hoc on the
// 2-core AMD EPYC). So the codes and absmax codes of the row kPrefetchRows ahead are prefetched.
constexpr int64_t kPrefetchRows = 8;

void prefetch_codes(const Nf4View& w, int64_t start, int64_t count) {
  for (int64_t byte = start / 2; byte < (start + count) / 2; byte += 64) __builtin_prefetch(w.packed + byte);
  __builtin_prefetch(w.packed + (start + count) / 2 - 1);
  __builtin_prefetch(w.absmax_codes + start / kBlockSize);
}

// Decodes rows [n0, n1) x columns [k0, k1) of the [*, K] weight into the row-major tile `out`,
// float32, or bfloat16 when the rows are whole NF4 blocks (K % 64 == 0, k0 and k1 multiples of 64
// or K).
void decode_tile(const CpuKernels& k, const Nf4View& w, int64_t K, int64_t n0, int64_t n1,
                 int64_t k0, int64_t k1, at::Tensor& out) {
  const int64_t cols = k1 - k0;
  const bool whole_blocks = K % kBlockSize == 0 && k0 % kBlockSize == 0 && cols % kBlockSize == 0;
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_INTERNAL_ASSERT(whole_blocks || !bf16);
  char* base = static_cast<char*>(out.mutable_data_ptr());
  for (int64_t n = n0; n < n1; ++n) {
    if (n + kPrefetchRows < n1) prefetch_codes(w, (n + kPrefetchRows) * K + k0, cols);
    void* row = base + (n - n0) * cols * out.element_size();
    if (whole_blocks) {
      const int64_t b = (n * K + k0) / kBlockSize;
      k.dequantize_blocks(w, b, b + cols / kBlockSize, row, bf16 ? DType::kBFloat16 : DType::kFloat32);
    } else {
      decode_range_f32(w, n * K + k0, cols, static_cast<float*>(row));
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

// out = act @ W^T (+ bias) (forward: bands over W's rows, the reduction over its columns) or
// out = act @ W (backward: bands over W's columns, the reduction over its rows), band by band on
// the threads. float32 act: each band's reduction in tiles decoded into the thread's buffer and
// accumulated in `out`. bfloat16 act (bf16_tiles): narrower bands, each with the whole reduction
// in one bf16 tile and one BLAS call, so each output is rounded once, as dense bf16 rounds it.
// The bias goes into the first BLAS call of each band, as F.linear's addmm takes it.
void banded_matmul(const CpuKernels& k, const Nf4View& w, int64_t N, int64_t K, bool transposed,
                   const at::Tensor& act, at::Tensor& out,
                   const std::optional<at::Tensor>& bias = std::nullopt) {
  const bool bf16 = act.scalar_type() == at::kBFloat16;
  const int64_t band_extent = transposed ? N : K, reduce_extent = transposed ? K : N;
  const int64_t max_band = bf16 ? std::max<int64_t>(16, kTileBytes / (2 * reduce_extent)) : kMaxBand;
  const int64_t band = balanced_tile(band_extent, max_band, transposed ? 16 : kBlockSize);
  const int64_t chunk = bf16 ? reduce_extent : reduction_chunk(reduce_extent, band);
  const int64_t rest = band_extent % band;
  const int64_t bands = band_extent / band + (rest >= kMinBand ? 1 : 0);  // band <= band_extent
  const at::Tensor bias_out = bias.has_value() ? bias->to(out.scalar_type()) : at::Tensor();
  const at::ThreadLocalState caller;  // below autograd, etc.: the worker threads must be too
  at::parallel_for(0, bands, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_state(caller);
    // This thread's tile (a last band may be up to kMinBand - 1 wider).
    at::Tensor storage = at::empty({(band + kMinBand) * chunk}, act.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * band, b1 = t == bands - 1 ? band_extent : b0 + band;
      at::Tensor out_band = out.narrow(1, b0, b1 - b0);  // [M, b1 - b0]
      for (int64_t r0 = 0; r0 < reduce_extent; r0 += chunk) {
        const int64_t r1 = std::min(reduce_extent, r0 + chunk);
        at::Tensor tile = storage.narrow(0, 0, (b1 - b0) * (r1 - r0));
        if (transposed) {  // W rows [b0, b1) x columns [r0, r1), used as its transpose
          decode_tile(k, w, K, b0, b1, r0, r1, tile);
          tile = tile.view({b1 - b0, r1 - r0}).t();
        } else {           // W rows [r0, r1) x columns [b0, b1)
          decode_tile(k, w, K, r0, r1, b0, b1, tile);
          tile = tile.view({r1 - r0, b1 - b0});
        }
        const at::Tensor act_chunk = act.narrow(1, r0, r1 - r0);
        if (r0 == 0 && bias_out.defined()) {
          const at::Tensor bias_band = bias_out.narrow(0, b0, b1 - b0).expand_as(out_band);
          at::addmm_out(out_band, bias_band, act_chunk, tile);
        } else if (r0 == 0) {
          at::mm_out(out_band, act_chunk, tile);
        } else {
          at::addmm_out(out_band, out_band, act_chunk, tile);
        }
      }
    }
  });
}

// Whether the tile path keeps bf16 activations in bf16 (bf16 tiles, bf16 BLAS with float32
// accumulation) rather than computing in float32: by default on a CPU with AVX512-BF16, where
// torch's bf16 matmul runs 2.3x its float32 rate (2-core AMD EPYC: 210 vs 92 GFLOP/s a core);
// elsewhere bf16 BLAS is emulated and slower than float32 (2-core Xeon without it: 194 vs 62 ms
// at M = 256). The environment variable QLORA_CPU_BF16_GEMM=0/1 overrides the CPU check, read at
// each call (tests, benchmarks). Also the op qlora_cpu::cpu_bf16_gemm.
bool cpu_bf16_gemm() {
  const char* env = std::getenv("QLORA_CPU_BF16_GEMM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return cpu_has_avx512_bf16();
  TORCH_CHECK_VALUE(std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
                    "qlora: environment variable QLORA_CPU_BF16_GEMM must be 'auto', '0' or '1'; got '",
                    env, "'");
  return env[0] == '1';
}

// bf16 tiles need rows of W that are whole NF4 blocks (K % 64 == 0).
bool bf16_tiles(const at::Tensor& act, int64_t K) {
  return act.scalar_type() == at::kBFloat16 && K % kBlockSize == 0 && cpu_bf16_gemm();
}

at::Tensor as_float_matrix(const at::Tensor& t, int64_t cols) {
  return contiguous_aligned(t.reshape({-1, cols}).to(at::kFloat), alignof(float));
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

  const int64_t M = x.numel() / K;
  at::Tensor y;  // [M, N]; the tile path takes the bias into its BLAS calls, the fused one adds it
  if (M > kMaxFusedRows && bf16_tiles(x, K)) {
    y = at::empty({M, N}, x.options());
    banded_matmul(k, w.view, N, K, /*transposed=*/true, x.reshape({M, K}).contiguous(), y, bias);
  } else {
    const at::Tensor x2 = as_float_matrix(x, K);  // [M, K]
    y = at::empty({M, N}, x2.options());
    if (M > 0 && M <= kMaxFusedRows && K % kBlockSize == 0) {
      at::Tensor xs = at::empty_like(x2);
      for (int64_t m = 0; m < M; ++m) {
        split_pairs(x2.const_data_ptr<float>() + m * K, K, xs.mutable_data_ptr<float>() + m * K);
      }
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        k.gemv_rows(w.view, K, n0, n1, xs.const_data_ptr<float>(), M, K,
                    y.mutable_data_ptr<float>(), N);
      });
      if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
    } else if (M > 0) {
      banded_matmul(k, w.view, N, K, /*transposed=*/true, x2, y, bias);
    }
  }
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

  const int64_t M = grad_y.numel() / N;
  const bool tiles_in_bf16 = bf16_tiles(grad_y, K);
  const int64_t max_fused_rows =
      tiles_in_bf16 ? std::min(k.max_gemv_cols_rows, kMaxFusedGradRowsBf16Tiles) : k.max_gemv_cols_rows;
  at::Tensor gx;  // [M, K]
  if (M > max_fused_rows && tiles_in_bf16) {
    gx = at::empty({M, K}, grad_y.options());
    banded_matmul(k, w.view, N, K, /*transposed=*/false, grad_y.reshape({M, N}).contiguous(), gx);
  } else {
    const at::Tensor g2 = as_float_matrix(grad_y, N);  // [M, N]
    gx = at::empty({M, K}, g2.options());
    if (M > 0 && M <= max_fused_rows && K % kBlockSize == 0) {
      at::parallel_for(0, K / kBlockSize, 1, [&](int64_t c0, int64_t c1) {
        k.gemv_cols(w.view, N, K, c0 * kBlockSize, c1 * kBlockSize, g2.const_data_ptr<float>(),
                    M, N, gx.mutable_data_ptr<float>(), K);
      });
    } else if (M > 0) {
      banded_matmul(k, w.view, N, K, /*transposed=*/false, g2, gx);
    }
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

TORCH_LIBRARY_IMPL(qlora_cpu, CompositeExplicitAutograd, m) {
  m.impl("cpu_bf16_gemm", &cpu_bf16_gemm);
}

}  // namespace qlora::cpu
