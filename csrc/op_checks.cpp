#include "op_checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "nf4_format.h"

namespace qlora {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// A dtype as Python spells it (torch.float64, where c10 prints Double): the C names by a table,
// the others (Float8_e4m3fn, UInt16, QInt8 ...) are torch's in lower case.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {
      std::string name = c10::toString(t);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

void check_defined(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "qlora::", op, ": argument '", arg, "' must be a tensor; got None");
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "qlora::", op, ": argument '", arg,
                    "' must be on the same device as '", ref_arg, "' (", ref.device(), "); got ",
                    t.device());
}

// The element count of a shape, or -1 where a size is negative or the product overflows int64
// (c10::multiply_integers wraps around: [2**62 + 1, 64] would count 64 elements).
int64_t checked_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

int64_t check_matmul_input(const char* op, const at::Tensor& x, const char* x_arg,
                           int64_t weight_numel, int64_t dim, const char* dim_arg,
                           const at::Tensor& packed) {
  check_float_dtype(op, x_arg, x);
  check_same_device(op, x_arg, x, "packed", packed);
  TORCH_CHECK_VALUE(dim > 0 && weight_numel % dim == 0, "qlora::", op, ": argument '", dim_arg,
                    "' must be a positive divisor of the weight's ", weight_numel,
                    " elements; got ", dim);
  const int64_t features = weight_numel / dim;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == features, "qlora::", op, ": argument '", x_arg,
                    "' must have last dimension ", features, " (", weight_numel,
                    " weight elements / ", dim_arg, " ", dim, "); got shape ", shape_str(x));
  return features;
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                int64_t out_features) {
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "qlora::", op,
                   ": argument 'bias' must have the dtype of 'x' (", dtype_name(x.scalar_type()), "); got ",
                   dtype_name(bias->scalar_type()));
  check_same_device(op, "bias", *bias, "x", x);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "qlora::", op,
                    ": argument 'bias' must have shape [", out_features, "]; got shape ",
                    shape_str(*bias));
}

}  // namespace

void check_float_dtype(const char* op, const char* arg, const at::Tensor& t) {
  check_defined(op, arg, t);
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "qlora::", op,
                   ": argument '", arg, "' must have dtype float32, bfloat16 or float16; got ", dtype_name(d));
}

void check_quantizable(const char* op, const char* arg, const at::Tensor& weight) {
  check_float_dtype(op, arg, weight);
  TORCH_CHECK_VALUE(weight.numel() > 0, "qlora::", op, ": argument '", arg,
                    "' must not be empty; got shape ", shape_str(weight));
  TORCH_CHECK_VALUE(weight.numel() % kBlockSize == 0, "qlora::", op, ": argument '", arg,
                    "' must have a number of elements divisible by ", kBlockSize,
                    " (the NF4 block size); got ", weight.numel(), " elements (shape ",
                    shape_str(weight), ")");
}

int64_t check_components(const char* op, const at::Tensor& packed, const at::Tensor& absmax_codes,
                         const at::Tensor& absmax_scales, const at::Tensor& absmax_offset) {
  const std::pair<const char*, const at::Tensor*> bytes[] = {{"packed", &packed},
                                                             {"absmax_codes", &absmax_codes}};
  for (const auto& [name, t] : bytes) {
    check_defined(op, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "qlora::", op, ": argument '", name,
                     "' must have dtype uint8; got ", dtype_name(t->scalar_type()));
  }
  const std::pair<const char*, const at::Tensor*> floats[] = {{"absmax_scales", &absmax_scales},
                                                              {"absmax_offset", &absmax_offset}};
  for (const auto& [name, t] : floats) {
    check_defined(op, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "qlora::", op, ": argument '", name,
                     "' must have dtype float32; got ", dtype_name(t->scalar_type()));
  }
  check_same_device(op, "absmax_codes", absmax_codes, "packed", packed);
  check_same_device(op, "absmax_scales", absmax_scales, "packed", packed);
  check_same_device(op, "absmax_offset", absmax_offset, "packed", packed);

  const int64_t bytes_per_block = kBlockSize / 2;
  TORCH_CHECK_VALUE(packed.numel() > 0 && packed.numel() % bytes_per_block == 0, "qlora::", op,
                    ": argument 'packed' must hold a positive multiple of ", bytes_per_block,
                    " bytes (two 4-bit codes per byte, 64 codes per block); got ", packed.numel());
  const int64_t nblocks = packed.numel() / bytes_per_block;
  TORCH_CHECK_VALUE(absmax_codes.numel() == nblocks, "qlora::", op,
                    ": argument 'absmax_codes' must hold one code per 64-element block, ", nblocks,
                    " for 'packed' of ", packed.numel(), " bytes; got ", absmax_codes.numel());
  const int64_t groups = (nblocks + kScalerBlockSize - 1) / kScalerBlockSize;
  TORCH_CHECK_VALUE(absmax_scales.numel() == groups, "qlora::", op,
                    ": argument 'absmax_scales' must hold one scale per 256 blocks, ", groups,
                    " for ", nblocks, " blocks; got ", absmax_scales.numel());
  TORCH_CHECK_VALUE(absmax_offset.numel() == 1, "qlora::", op,
                    ": argument 'absmax_offset' must hold exactly one value; got ",
                    absmax_offset.numel());
  return nblocks * kBlockSize;
}

int64_t check_dequantize_args(const at::Tensor& packed, const at::Tensor& absmax_codes,
                              const at::Tensor& absmax_scales, const at::Tensor& absmax_offset,
                              at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t numel =
      check_components("dequantize_nf4", packed, absmax_codes, absmax_scales, absmax_offset);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "qlora::dequantize_nf4: argument 'dtype' must be float32, bfloat16 or float16; "
                   "got ",
                   dtype_name(dtype));
  TORCH_CHECK_VALUE(checked_numel(shape) == numel,
                    "qlora::dequantize_nf4: argument 'shape' must have ", numel,
                    " elements (what the components encode); got ", shape);
  return numel;
}

int64_t check_linear_args(const at::Tensor& x, const at::Tensor& packed,
                          const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                          const at::Tensor& absmax_offset, int64_t out_features,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "linear_nf4";
  const int64_t numel = check_components(op, packed, absmax_codes, absmax_scales, absmax_offset);
  const int64_t in_features =
      check_matmul_input(op, x, "x", numel, out_features, "out_features", packed);
  check_bias(op, bias, x, out_features);
  return in_features;
}

int64_t check_grad_input_args(const at::Tensor& grad_y, const at::Tensor& packed,
                              const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                              const at::Tensor& absmax_offset, int64_t in_features) {
  const char* op = "linear_nf4_grad_input";
  const int64_t numel = check_components(op, packed, absmax_codes, absmax_scales, absmax_offset);
  return check_matmul_input(op, grad_y, "grad_y", numel, in_features, "in_features", packed);
}

void fail_non_finite(const char* op, const char* arg, const at::Tensor& weight) {
  const at::Tensor flat = weight.flatten();
  const at::Tensor bad = at::logical_not(at::isfinite(flat)).nonzero().flatten();
  std::ostringstream where;
  if (bad.numel() > 0) {
    int64_t rest = bad[0].item<int64_t>();
    const float value = flat[rest].item<float>();
    std::vector<int64_t> index(weight.dim());
    for (int64_t d = weight.dim() - 1; d >= 0; --d) {
      index[d] = rest % weight.size(d);
      rest /= weight.size(d);
    }
    where << ", the first " << value << " at index " << at::IntArrayRef(index);
  }
  TORCH_CHECK_VALUE(false, "qlora::", op, ": argument '", arg,
                    "' must hold only finite values (no NaN or Inf); got ", bad.numel(),
                    " non-finite value(s)", where.str());
}

}  // namespace qlora
