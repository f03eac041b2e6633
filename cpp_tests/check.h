// A minimal test harness: CHECK records a failure with its location and goes on; each test
// program runs its cases for every CPU kernel table available and exits non-zero on any failure.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "../csrc/cpu/cpu_kernels.h"

namespace qlora::test {

inline int& failures() {
  static int count = 0;
  return count;
}

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);        \
      ++::qlora::test::failures();                                                    \
    }                                                                                 \
  } while (0)

#define CHECK_EQ(a, b)                                                                \
  do {                                                                                \
    const auto va = (a);                                                              \
    const auto vb = (b);                                                              \
    if (!(va == vb)) {                                                                \
      std::fprintf(stderr, "  FAILED %s:%d: %s == %s (%.9g vs %.9g)\n", __FILE__,     \
                   __LINE__, #a, #b, static_cast<double>(va), static_cast<double>(vb)); \
      ++::qlora::test::failures();                                                    \
    }                                                                                 \
  } while (0)

// Double quantization of the `nblocks` absmax values of a weight with the CPU cores, as the
// quantize op does: their mean (`offset`), 8-bit codes, one scale per group of 256 (`scales`).
inline void double_quantize(const float* absmax, int64_t nblocks, float* offset, uint8_t* codes,
                            float* scales) {
  *offset = cpu::absmax_mean(absmax, nblocks);
  for (int64_t g = 0; g * kScalerBlockSize < nblocks; ++g) {
    const int64_t first = g * kScalerBlockSize;
    const int64_t count = std::min(kScalerBlockSize, nblocks - first);
    scales[g] = cpu::quantize_absmax_group(absmax + first, count, *offset, codes + first);
  }
}

struct Case {
  const char* name;
  std::function<void(const cpu::CpuKernels&)> run;
};

// The kernel tables this machine can run: portable always, AVX2 and AVX-512 where built and supported.
inline std::vector<const cpu::CpuKernels*> kernel_tables() {
  std::vector<const cpu::CpuKernels*> tables{&cpu::portable_kernels()};
  if (cpu::cpu_has_avx2() && cpu::avx2_kernels() != nullptr) tables.push_back(cpu::avx2_kernels());
  if (cpu::avx512_kernels() != nullptr && cpu::cpu_has_avx512()) tables.push_back(cpu::avx512_kernels());
  return tables;
}

inline int run_cases(const std::vector<Case>& cases) {
  for (const cpu::CpuKernels* k : kernel_tables()) {
    for (const Case& c : cases) {
      const int before = failures();
      c.run(*k);
      std::printf("%-6s %-8s %s\n", failures() == before ? "ok" : "FAIL", k->name, c.name);
    }
  }
  std::printf("%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace qlora::test
