// Argument checks shared by the CPU and CUDA op glue. Every failure names the op, the argument,
// the rule and the value received, and raises TypeError (dtype) or ValueError (everything else).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qlora {

// float32, bfloat16 or float16.
void check_float_dtype(const char* op, const char* arg, const at::Tensor& t);

// A weight quantize_nf4 accepts: float dtype, not empty, numel a multiple of 64.
void check_quantizable(const char* op, const char* arg, const at::Tensor& weight);

// The four NF4 components: dtypes, sizes consistent with each other, one device.
// Returns the element count of the weight they encode.
int64_t check_components(const char* op, const at::Tensor& packed, const at::Tensor& absmax_codes,
                         const at::Tensor& absmax_scales, const at::Tensor& absmax_offset);

// `t` lives on the same device as `ref`.
void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref);

// x [..., features] against a weight of `weight_numel` elements whose other dimension is
// `dim` (named `dim_arg`): x's last dimension must be weight_numel / dim. Returns that size.
int64_t check_matmul_input(const char* op, const at::Tensor& x, const char* x_arg,
                           int64_t weight_numel, int64_t dim, const char* dim_arg,
                           const at::Tensor& packed);
void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                int64_t out_features);

// The weight must be finite: after a kernel saw a NaN or Inf, find the first and report it.
[[noreturn]] void fail_non_finite(const char* op, const char* arg, const at::Tensor& weight);

}  // namespace qlora
