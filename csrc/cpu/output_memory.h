// Output tensors of the CPU ops. A large fresh output is mostly first-touch page faults: writing
// 32 MB into new memory costs ~10x what writing it into touched memory does, one 4 KB fault at a
// time. Asking for transparent huge pages on the untouched buffer (Linux, where THP is in
// "madvise" mode as on most distributions) makes that 2 MB per fault.
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qlora::cpu {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);  // whole huge pages inside
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
  return t;
}

}  // namespace qlora::cpu
