// The one TORCH_LIBRARY block of namespace `qlora`: the four ops of docs/nf4_format.md, nothing
// else. The CPU kernels' switches, which are not ops of the format, live in `qlora_cpu` below.
// Kernels are registered per backend at the bottom of csrc/cpu/*.cpp and csrc/cuda/*.cu; fake
// kernels and autograd live in qlora_ext/ops.py. Storage layout: docs/nf4_format.md.
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  // weight (fp32/bf16/fp16, numel % 64 == 0) -> NF4 codes two per byte, 8-bit absmax codes,
  // one float32 scale per 256 absmax values, and the float32 mean of the absmax values.
  m.def(
      "quantize_nf4(Tensor weight) -> (Tensor packed, Tensor absmax_codes, Tensor absmax_scales, "
      "Tensor absmax_offset)");
  // The four components back to a dense tensor of `shape` and `dtype`.
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax_codes, Tensor absmax_scales, "
      "Tensor absmax_offset, SymInt[] shape, ScalarType dtype) -> Tensor");
  // y = x @ W^T (+ bias) for x [..., in_features] and W the NF4 storage of an
  // [out_features, in_features] weight, decoded tile by tile.
  m.def(
      "linear_nf4(Tensor x, Tensor packed, Tensor absmax_codes, Tensor absmax_scales, "
      "Tensor absmax_offset, int out_features, Tensor? bias=None) -> Tensor");
  // grad_x = grad_y @ W for grad_y [..., out_features]: the backward of linear_nf4.
  m.def(
      "linear_nf4_grad_input(Tensor grad_y, Tensor packed, Tensor absmax_codes, "
      "Tensor absmax_scales, Tensor absmax_offset, int in_features) -> Tensor");
}

// Switches of the CPU kernels, for tests and benchmarks (qlora_ext.ops wraps them).
TORCH_LIBRARY(qlora_cpu, m) {
  // Which CPU kernels run ("avx512", "avx2" or "portable"), and choosing them ("auto" picks the
  // best the CPU has); for tests and benchmarks.
  m.def("cpu_kernel_isa() -> str");
  m.def("set_cpu_kernel_isa(str name) -> ()");
  // Whether CPU linear_nf4 multiplies bf16 activations by bf16 tiles of W with bf16 BLAS (on a
  // CPU with AVX512-BF16, or as QLORA_CPU_BF16_GEMM=0/1 says) rather than in float32.
  m.def("cpu_bf16_gemm() -> bool");
}
