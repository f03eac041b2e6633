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

// All arguments of dequantize_nf4; returns the element count.
int64_t check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax_codes,
                              const at::Tensor& absmax_scales, const at::Tensor& absmax_offset,
                              at::IntArrayRef shape, at::ScalarType dtype);

// All arguments of linear_nf4 (x [..., in], W numel = out_features * in, bias [out] like x);
// returns in_features.
int64_t check_linear_args(const at::Tensor& x, const at::Tensor& packed,
                          const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                          const at::Tensor& absmax_offset, int64_t out_features,
                          const std::optional<at::Tensor>& bias);

// All arguments of linear_nf4_grad_input (grad_y [..., out]); returns out_features.
int64_t check_grad_input_args(const at::Tensor& grad_y, const at::Tensor& packed,
                              const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                              const at::Tensor& absmax_offset, int64_t in_features);

// The weight must be finite: after a kernel saw a NaN or Inf, find the first and report it.
[[noreturn]] void fail_non_finite(const char* op, const char* arg, const at::Tensor& weight);

}  // namespace qlora
