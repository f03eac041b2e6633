// Host-side helpers that codec.cu defines and linear.cu uses too (and ../aligned.h's).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <tuple>
#include <utility>

#include "../aligned.h"
#include "../nf4_format.h"

namespace qlora::cuda {

// kernel<<<grid, block, 0, stream>>>(args...), through the runtime's cudaLaunchKernel: each
// argument converted to its parameter's type, a launch error reported as a C++ exception. The
// kernel headers (codec_kernels.cuh, linear_kernels.cuh) launch through this, and the C++ tests
// through an emulator of the same signature that runs the kernel on the CPU.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "launch: one argument per kernel parameter");
  std::tuple<P...> values(std::forward<A>(args)...);
  std::apply(
      [&](auto&... v) {
        void* argv[] = {static_cast<void*>(&v)...};
        C10_CUDA_CHECK(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, argv, 0,
                                        stream));
      },
      values);
}

// Raw view of the four (contiguous) components.
Nf4View nf4_view(const at::Tensor& packed, const at::Tensor& absmax_codes,
                 const at::Tensor& absmax_scales, const at::Tensor& absmax_offset);

// Decodes rows [row0, row0 + rows) x columns [col0, col0 + cols) of a [*, K] NF4 weight into a
// dense row-major [rows, cols] buffer of T (float, __nv_bfloat16 or __half) on `stream`.
template <typename T>
void launch_dequantize_tile(const Nf4View& w, int64_t K, int64_t row0, int64_t rows,
                            int64_t col0, int64_t cols, T* out, cudaStream_t stream);

// Calls f(T{}) with the CUDA element type of a float dtype.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_INTERNAL_ASSERT(false, "dtype checked by the caller: ", t);
  }
}

using qlora::contiguous_aligned;  // (../aligned.h)

}  // namespace qlora::cuda
