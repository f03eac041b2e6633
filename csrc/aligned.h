// Tensors whose data the kernels read through typed pointers (and vector loads): contiguous and
// at an address aligned for those reads. Torch gives any contiguous tensor, aligned or not: one
// from torch.frombuffer at an odd offset, a numpy view, or a safetensors file where a float tensor
// follows an odd number of bytes is misaligned, and reading it through a float* is undefined
// behaviour (UBSan stopped there). Such a tensor is copied into a fresh, aligned block; an
// aligned one is used as it is.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace qlora {

inline at::Tensor contiguous_aligned(const at::Tensor& t, int64_t alignment) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % alignment == 0) return c;
  c = c.clone(at::MemoryFormat::Contiguous);  // a fresh block: CPU 64-byte, CUDA 512-byte aligned
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(c.const_data_ptr()) % alignment == 0,
                        "qlora: the allocator returned memory aligned to less than ", alignment,
                        " bytes");
  return c;
}

}  // namespace qlora
