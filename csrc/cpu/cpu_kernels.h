// The CPU kernel cores: plain C++ on raw pointers, no torch, so the same code is reached from the
// op glue (csrc/cpu/*_ops.cpp) and from the C++ tests. Each instruction set provides one
// CpuKernels table; `active_cpu_kernels()` picks one at run time.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../nf4_format.h"

namespace qlora::cpu {

// Element type of a dense weight or activation buffer.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Calls f(std::integral_constant<DType, d>{}): how each kernel file picks the instantiation of
// its dtype templates. (Instantiated per kernel file, with that file's instruction set.)
template <typename F>
decltype(auto) with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kBFloat16: return f(std::integral_constant<DType, DType::kBFloat16>{});
    default: return f(std::integral_constant<DType, DType::kFloat16>{});
  }
}

struct CpuKernels {
  const char* name;  // "avx512", "avx2" or "portable"

  // Quantizes NF4 blocks [first, last) of `w` (element i of block b is w[b * 64 + i]): writes
  // their packed bytes (32 per block, at packed[b * 32]) and float32 absmax (at absmax[b]).
  // Returns the largest |w| bit pattern seen; >= kNonFiniteBits means a NaN or Inf was read.
  uint32_t (*quantize_blocks)(const void* w, DType dtype, int64_t first, int64_t last,
                              uint8_t* packed, float* absmax);

  // Dequantizes NF4 blocks [first, last) into `out`, which points at the element first * 64.
  void (*dequantize_blocks)(const Nf4View& w, int64_t first, int64_t last, void* out,
                            DType dtype);

  // Small-M forward, K % 64 == 0: y[m * ldy + n] = sum_k x[m, k] * W[n, k] for
  // n in [n_begin, n_end), m < M (M <= kMaxFusedRows), reading the 4-bit codes directly.
  // Row m of x starts at x + m * ldx in pair-split order (split_pairs): each 32-element chunk
  // holds its 16 even-indexed elements, then its 16 odd-indexed ones, matching the two nibbles
  // of the packed bytes so that no interleaving is needed in the inner loop.
  void (*gemv_rows)(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, const float* x,
                    int64_t M, int64_t ldx, float* y, int64_t ldy);

  // Small-M backward, K % 64 == 0, k_begin and k_end multiples of 64:
  // gx[m * ldgx + k] = sum_n gy[m * ldgy + n] * W[n, k] for k in [k_begin, k_end), m < M.
  void (*gemv_cols)(const Nf4View& w, int64_t N, int64_t K, int64_t k_begin, int64_t k_end,
                    const float* gy, int64_t M, int64_t ldgy, float* gx, int64_t ldgx);

  // The most rows of grad_y linear_nf4's backward gives gemv_cols; more go through tiles + BLAS.
  int64_t max_gemv_cols_rows;
};

// Largest M the fused small-M forward takes; larger M goes through tiles + BLAS. (The backward's
// limit is each table's max_gemv_cols_rows: this in the AVX2 and portable tables.)
constexpr int64_t kMaxFusedRows = 16;

// The backward's row limit where bf16 tiles (bf16 grad_y, a CPU with AVX512-BF16) take the
// larger M, below a table's max_gemv_cols_rows (which is tuned against float32 tiles). With the
// AVX-512 table's 128, 33-128 rows took up to 2.5x as long as bf16 tiles. Fused vs bf16 tiles,
// 4096 x 4096: 3.8 vs 3.7 ms at 32 rows, 4.2 vs 4.2 at 36, 5.4 vs 4.0 at 48, 12.8 vs 5.2 at 128;
// 11008 x 4096: 10.3 vs 10.2 at 32, 16.0 vs 11.9 at 48, 34.3 vs 14.6 at 128 (ad hoc, 2 threads, a
// 2-core Xeon with AMX; at 1 thread bf16 tiles win from 36 rows).
constexpr int64_t kMaxFusedGradRowsBf16Tiles = 32;

const CpuKernels& portable_kernels();
// Null when the binary was built without AVX-512 support.
const CpuKernels* avx512_kernels();
// Null when the binary was built without AVX2 support.
const CpuKernels* avx2_kernels();

// True when this CPU can run the AVX-512 kernels (AVX-512 F, BW, VL, DQ).
bool cpu_has_avx512();
// True when this CPU can run the AVX2 kernels (AVX2, FMA, F16C).
bool cpu_has_avx2();
// True when this CPU has native bf16 dot products (AVX512-BF16), which torch's bf16 matmul uses.
bool cpu_has_avx512_bf16();

// The kernels in use: the best this CPU runs (AVX-512, else AVX2, else portable), unless
// QLORA_CPU_ISA names others or select_cpu_kernels() was called.
const CpuKernels& active_cpu_kernels();
// Chooses the kernels by name ("avx512", "avx2", "portable" or "auto"); false if not available here.
bool select_cpu_kernels(const char* name);

// Reorders `count` (a multiple of 32) elements into pair-split order for gemv_rows.
void split_pairs(const float* in, int64_t count, float* out);

// Scalar decode of any flat element range [start, start + count) of W into float32 (no alignment
// needed). The slow path for weights whose rows are not whole NF4 blocks.
void decode_range_f32(const Nf4View& w, int64_t start, int64_t count, float* out);

// Mean of the per-block absmax in the fixed float64 order that the CUDA kernels share: per group
// of 256 blocks, lane l (of 32) sums blocks l, l + 32, ..., then an XOR-butterfly over the lanes;
// the group sums are reduced the same way (lane l takes groups l, l + 32, ...).
float absmax_mean(const float* absmax, int64_t nblocks);
// The two stages of absmax_mean: one group of <= 256 blocks, then the mean over the group sums.
double absmax_group_sum(const float* absmax, int64_t count);
float absmax_mean_from_group_sums(const double* group_sums, int64_t groups, int64_t nblocks);

// Double quantization of the absmax values of one group of 256 blocks (`count` <= 256 of them):
// writes the 8-bit codes and returns the group's float32 scale max |absmax - offset|.
float quantize_absmax_group(const float* absmax, int64_t count, float offset, uint8_t* codes);

// Sum of 32 lane values by the XOR-butterfly of a CUDA warp (__shfl_xor_sync 16, 8, 4, 2, 1).
double butterfly_sum(const double* lanes);

// float32 <-> bf16 / fp16 conversions with round-to-nearest-even, as torch rounds.
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);
float fp16_to_float(uint16_t h);
uint16_t float_to_fp16(float f);

}  // namespace qlora::cpu
