// Torch tensors -> the raw arguments of the CPU kernel cores (cpu_kernels.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../aligned.h"
#include "cpu_kernels.h"

namespace qlora::cpu {

inline DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "dtype checked by the caller: ", t);
  }
}

// The four NF4 components made contiguous and aligned (a no-op when they already are) and their
// raw view.
struct Nf4Storage {
  at::Tensor packed, absmax_codes, absmax_scales, absmax_offset;
  Nf4View view;

  Nf4Storage(const at::Tensor& p, const at::Tensor& c, const at::Tensor& s, const at::Tensor& o)
      : packed(p.contiguous()),
        absmax_codes(c.contiguous()),
        absmax_scales(contiguous_aligned(s, alignof(float))),
        absmax_offset(contiguous_aligned(o, alignof(float))),
        view{packed.const_data_ptr<uint8_t>(), absmax_codes.const_data_ptr<uint8_t>(),
             absmax_scales.const_data_ptr<float>(), absmax_offset.const_data_ptr<float>()} {}
};

}  // namespace qlora::cpu
