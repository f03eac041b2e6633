// CPU quantize_nf4 / dequantize_nf4: argument checks, threading over blocks, and the choice of
// kernel table (AVX-512, AVX2 or portable); the arithmetic is in kernels_*.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <vector>

#include "../op_checks.h"
#include "cpu_kernels.h"
#include "kernel_args.h"

namespace qlora::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight) {
  check_quantizable("quantize_nf4", "weight", weight);
  const at::Tensor w = contiguous_aligned(weight, weight.element_size());
  const int64_t nblocks = w.numel() / kBlockSize;
  const int64_t groups = (nblocks + kScalerBlockSize - 1) / kScalerBlockSize;
  const auto bytes = w.options().dtype(at::kByte);
  const auto floats = w.options().dtype(at::kFloat);
  at::Tensor packed = at::empty({nblocks * kBlockSize / 2}, bytes);
  at::Tensor absmax_codes = at::empty({nblocks}, bytes);
  at::Tensor absmax_scales = at::empty({groups}, floats);
  at::Tensor absmax_offset = at::empty({}, floats);
  std::vector<float> absmax(nblocks);
  std::vector<double> group_sums(groups);

  const CpuKernels& k = active_cpu_kernels();
  const DType dtype = to_kernel_dtype(w.scalar_type());
  std::atomic<uint32_t> seen_bits{0};
  // One task per group of 256 blocks: its blocks, then its share of the absmax mean.
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    const int64_t first = g_begin * kScalerBlockSize;
    const int64_t last = std::min(g_end * kScalerBlockSize, nblocks);
    const uint32_t bits = k.quantize_blocks(w.const_data_ptr(), dtype, first, last,
                                            packed.mutable_data_ptr<uint8_t>(), absmax.data());
    uint32_t prev = seen_bits.load();
    while (bits > prev && !seen_bits.compare_exchange_weak(prev, bits)) {
    }
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t start = g * kScalerBlockSize;
      group_sums[g] = absmax_group_sum(absmax.data() + start,
                                       std::min(kScalerBlockSize, nblocks - start));
    }
  });
  if (seen_bits.load() >= kNonFiniteBits) fail_non_finite("quantize_nf4", "weight", weight);

  const float offset = absmax_mean_from_group_sums(group_sums.data(), groups, nblocks);
  absmax_offset.fill_(offset);
  float* scales = absmax_scales.mutable_data_ptr<float>();
  uint8_t* codes = absmax_codes.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t start = g * kScalerBlockSize;
      scales[g] = quantize_absmax_group(absmax.data() + start,
                                        std::min(kScalerBlockSize, nblocks - start), offset,
                                        codes + start);
    }
  });
  return {packed, absmax_codes, absmax_scales, absmax_offset};
}

// A large output is mostly fresh memory: a 32 MB one is 8k first-touch page faults, most of a
// dequantize's time. Each thread asks the kernel to fault in its own part in one call
// (MADV_POPULATE_WRITE, Linux 5.14+; elsewhere, or when refused, the writes fault as usual), which
// saves the trap per page. Transparent huge pages were tried and dropped: they halved the median
// on the 2-core VM but made calls 10x slower whenever the 2 MB blocks had been handed back to the
// VM's host.
void prefault_pages(char* begin, int64_t bytes) {
#if defined(__linux__)
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  constexpr uintptr_t kPage = 4096;
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + kPage - 1) & ~(kPage - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(begin) + bytes) & ~(kPage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, kPopulateWrite);  // advice only
#else
  (void)begin;
  (void)bytes;
#endif
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax_codes,
                          const at::Tensor& absmax_scales, const at::Tensor& absmax_offset,
                          at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t numel =
      check_dequantize_args(packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype);
  const Nf4Storage storage(packed, absmax_codes, absmax_scales, absmax_offset);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const CpuKernels& k = active_cpu_kernels();
  const DType out_dtype = to_kernel_dtype(dtype);
  const int64_t elem_bytes = out.element_size();
  auto* out_bytes = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, numel / kBlockSize, 256, [&](int64_t first, int64_t last) {
    char* begin = out_bytes + first * kBlockSize * elem_bytes;
    prefault_pages(begin, (last - first) * kBlockSize * elem_bytes);
    k.dequantize_blocks(storage.view, first, last, begin, out_dtype);
  });
  return out;
}

std::string cpu_kernel_isa() { return active_cpu_kernels().name; }

void set_cpu_kernel_isa(std::string_view name) {
  const std::string n(name);
  TORCH_CHECK_VALUE(select_cpu_kernels(n.c_str()), "qlora_cpu::set_cpu_kernel_isa: argument 'name' must ",
                    "be 'auto', 'portable', 'avx2' or 'avx512' (each on a CPU with it and a build ",
                    "with it; this one: avx2 ", cpu_has_avx2() && avx2_kernels() ? "yes" : "no",
                    ", avx512 ", cpu_has_avx512() && avx512_kernels() ? "yes" : "no", "); got '", n,
                    "'");
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4);
  m.impl("dequantize_nf4", &dequantize_nf4);
}

TORCH_LIBRARY_IMPL(qlora_cpu, CompositeExplicitAutograd, m) {
  m.impl("cpu_kernel_isa", &cpu_kernel_isa);
  m.impl("set_cpu_kernel_isa", &set_cpu_kernel_isa);
}

}  // namespace qlora::cpu
