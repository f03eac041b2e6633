// CUDA linear_nf4 and its backward: the ops, and which path each call takes (the kernels and
// their launchers: linear_kernels.cuh).
//
// M <= 16 rows (bandwidth-bound: the 4-bit weight is the traffic): fused kernels read the packed
// codes straight from global memory, decode both absmax levels in-kernel with the tables in
// shared memory, and accumulate in float32. The forward for bf16/fp16 x with at least
// mma_min_rows() rows (in_features % 64 == 0, sm_80+) runs on tensor cores: W decoded to x's type
// in registers, mma.m16n8k16 against up to 16 rows of x. A float32 FMA per weight and row of x
// would cost more than reading the weight once M reaches a few rows; the tensor cores do not.
// Fewer rows, float32 x and the backward use CUDA-core kernels: the forward reads 16 bytes of codes
// (32 weights) per lane and step where in_features % 32 == 0, else one 32-bit word (8 weights), as
// does the backward.
// M > 16 rows (compute-bound): W is decoded a half to a quarter at a time into a workspace of x's
// dtype and multiplied by cuBLAS (at::mm_out into the matching slice of the output); no whole
// dense W (see large_m_tiles in linear_kernels.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "../op_checks.h"
#include "launchers.h"
// after launchers.h, which declares launch()
#include "linear_kernels.cuh"

namespace qlora::cuda {
namespace {

constexpr int kMmaMinRows = 5;  // default of mma_min_rows(); untuned (no GPU measured yet)

// The whole number in environment variable `name`, from lo to hi, or `unset` where it is unset or
// empty; any other value is an error that names the variable, the rule and the value.
int int_from_environment(const char* name, int unset, long lo, long hi, const char* rule) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return unset;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= lo && v <= hi, "qlora: environment variable ", name,
                    " must be ", rule, "; got '", s, "'");
  return static_cast<int>(v);
}

// The smallest M whose bf16/fp16 small-M forward takes the tensor-core kernel: kMmaMinRows, or
// the environment's QLORA_CUDA_MMA_MIN_ROWS (read once; 17 or more: never), for measuring the
// crossover with bench/linear.py on a GPU.
int mma_min_rows() {
  static const int rows =
      int_from_environment("QLORA_CUDA_MMA_MIN_ROWS", kMmaMinRows, 1, 1000000,
                           "a whole number >= 1 (17 or more: no tensor-core kernel)");
  return rows;
}

// Whether the code of the tensor-core kernel that runs on the current GPU was compiled for
// compute_80 or newer: a build for an older arch holds only a trap, also when the driver JITs its
// PTX for a newer GPU (so the PTX version counts, not the binary's).
template <typename T, int MT>
bool mma_kernel_runs() {
  const bool no_earlier_error = cudaPeekAtLastError() == cudaSuccess;
  cudaFuncAttributes attrs{};
  if (cudaFuncGetAttributes(&attrs, gemv_rows_mma_kernel<T, MT>) != cudaSuccess) {
    // No image for this GPU: clear our error, or the next launch check would report it (an
    // earlier one is left for its own check).
    if (no_earlier_error) (void)cudaGetLastError();
    return false;
  }
  return attrs.ptxVersion >= 80;
}

// mma_kernel_runs, asked once per device: one process may drive GPUs of different archs, and a
// build for "75;90" runs the trap on a T4 and the kernel on an H100.
template <typename T, int MT>
bool mma_kernel_runs_on_current_device() {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int8_t>, kDevices> known{};  // 0 not asked yet, 1 runs, 2 not
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kDevices) return mma_kernel_runs<T, MT>();
  int8_t state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    state = mma_kernel_runs<T, MT>() ? 1 : 2;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

// The tensor-core forward where it applies (see the file comment); false: use gemv_rows.
template <typename T>
bool gemv_rows_mma(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                   cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    if (M < mma_min_rows() || K % kBlockSize != 0) return false;
    const bool runs = mma_m_tiles(M) == 1 ? mma_kernel_runs_on_current_device<T, 1>()
                                          : mma_kernel_runs_on_current_device<T, 2>();
    if (!runs) return false;
    launch_gemv_rows_mma<T>(w, N, K, x, M, bias, y, stream);
    return true;
  }
}

// How many tiles the large-M path decodes W in, for an [M, out_cols] product on the current GPU:
// large_m_tiles (linear_kernels.cuh), or the environment's QLORA_CUDA_LARGE_M_TILES (read once),
// for measuring the choice with bench/linear.py on a GPU.
int64_t large_m_tiles_here(int64_t M, int64_t out_cols) {
  static const int forced =
      int_from_environment("QLORA_CUDA_LARGE_M_TILES", 0, kMinTiles, kMaxTiles,
                           "a whole number from 2 to 4 (unset: chosen per shape)");
  if (forced != 0) return forced;
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return large_m_tiles(M, out_cols, sms);
}

// ---- ops ------------------------------------------------------------------------------------

at::Tensor linear_nf4(const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                      const at::Tensor& absmax_offset, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  const int64_t K = check_linear_args(x, packed, absmax_codes, absmax_scales, absmax_offset,
                                      out_features, bias);
  const int64_t N = out_features;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor p = contiguous_aligned(packed, 4), c = absmax_codes.contiguous(),
                   s = contiguous_aligned(absmax_scales, 4), o = contiguous_aligned(absmax_offset, 4);
  const Nf4View w = nf4_view(p, c, s, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // [M, K], rows 8-element aligned for the small-M kernels' vector loads when K % 8 == 0
  const at::Tensor x2 = contiguous_aligned(x.reshape({-1, K}), 8 * x.element_size());
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N]
  if (M > 0 && M <= kMaxFusedRows && K % 8 == 0) {
    const at::Tensor b = bias.has_value() ? contiguous_aligned(*bias, bias->element_size()) : at::Tensor();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* xp = reinterpret_cast<const T*>(x2.const_data_ptr());
      const T* bp = b.defined() ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr;
      T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
      if (!gemv_rows_mma<T>(w, N, K, xp, static_cast<int>(M), bp, yp, stream)) {
        gemv_rows<T>(w, N, K, xp, static_cast<int>(M), bp, yp, stream);
      }
    });
  } else if (M > 0) {
    const int64_t rows = tile_extent(N, large_m_tiles_here(M, N));
    at::Tensor tile = at::empty({rows, K}, x2.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n = std::min(rows, N - n0);
      dispatch_float(x.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        launch_dequantize_tile<T>(w, K, n0, n, 0, K, reinterpret_cast<T*>(tile.mutable_data_ptr()),
                                  stream);
      });
      at::Tensor y_cols = y.narrow(1, n0, n);
      if (bias.has_value()) {  // bias added in cuBLAS's float32 epilogue: one rounding, as F.linear
        at::addmm_out(y_cols, bias->narrow(0, n0, n), x2, tile.narrow(0, 0, n).t());
      } else {
        at::mm_out(y_cols, x2, tile.narrow(0, 0, n).t());
      }
    }
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.reshape(out_shape);
}

at::Tensor linear_nf4_grad_input(const at::Tensor& grad_y, const at::Tensor& packed,
                                 const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                                 const at::Tensor& absmax_offset, int64_t in_features) {
  const int64_t N = check_grad_input_args(grad_y, packed, absmax_codes, absmax_scales,
                                          absmax_offset, in_features);
  const int64_t K = in_features;
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor p = contiguous_aligned(packed, 4), c = absmax_codes.contiguous(),
                   s = contiguous_aligned(absmax_scales, 4), o = contiguous_aligned(absmax_offset, 4);
  const Nf4View w = nf4_view(p, c, s, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // [M, N], rows 8-element aligned where N % 8 == 0 (as x forward)
  const at::Tensor g2 = contiguous_aligned(grad_y.reshape({-1, N}), 8 * grad_y.element_size());
  const int64_t M = g2.size(0);
  at::Tensor gx = at::empty({M, K}, g2.options());  // [M, K]
  if (M > 0 && M <= kMaxFusedRows && K % 8 == 0) {
    at::Tensor partial = at::empty({cols_slices(N).slices * M * K}, g2.options().dtype(at::kFloat));
    dispatch_float(grad_y.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      gemv_cols<T>(w, N, K, reinterpret_cast<const T*>(g2.const_data_ptr()), M,
                   reinterpret_cast<T*>(gx.mutable_data_ptr()), partial.mutable_data_ptr<float>(),
                   stream);
    });
  } else if (M > 0) {
    const int64_t cols = tile_extent(K, large_m_tiles_here(M, K));
    at::Tensor storage = at::empty({N * cols}, g2.options());
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
      const int64_t k = std::min(cols, K - k0);
      at::Tensor tile = storage.narrow(0, 0, N * k).view({N, k});
      dispatch_float(grad_y.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        launch_dequantize_tile<T>(w, K, 0, N, k0, k, reinterpret_cast<T*>(tile.mutable_data_ptr()),
                                  stream);
      });
      at::Tensor gx_cols = gx.narrow(1, k0, k);
      at::mm_out(gx_cols, g2, tile);
    }
  }
  std::vector<int64_t> out_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  out_shape.back() = K;
  return gx.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("linear_nf4", &linear_nf4);
  m.impl("linear_nf4_grad_input", &linear_nf4_grad_input);
}

}  // namespace qlora::cuda
