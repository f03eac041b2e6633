// The loops around the fused small-M kernels, shared by the AVX2 and AVX-512 files: how W is
// walked (groups of rows and column chunks forward; 64-column slices down groups of rows
// backward) and the choice of the instantiation for M. Each file passes its own inner kernels
// as a policy type, and includes this after defining QLORA_ISA_NAMESPACE, so every loop here is
// compiled with that file's instruction set and never shared with another file's copy.
//
// The policy `Isa` has:
//   Isa::Table                   the code table in registers, constructed from a CodeTables
//   Isa::rows_span<MB>(...)      gemv_rows over rows [n_begin, n_end), columns [k0, k1)
//   Isa::cols_block<MB, S>(...)  gemv_cols' 64 columns [k, k + 64) over rows [n0, n1), W's rows
//                                decoded from the codes, or (S true) read from cols_decode's output
//   Isa::cols_decode(...)        those rows of W decoded into a float buffer, as cols_block reads it
//   Isa::kColsRows               the most rows of grad_y one cols_block keeps in registers
//   Isa::kRowsPass               the most rows of x one rows_span takes
#pragma once

#include <cstdint>
#include <utility>

#include "cpu_kernels.h"

namespace qlora::cpu {
inline namespace QLORA_ISA_NAMESPACE {

// x is read in column chunks of about 32 KB (all MB rows together), which stay in L1 while a
// group of W rows streams past: every 16 products read a fresh line of x, and from L2 the
// kernel waits on them. (The earlier chunks, 2048 columns or whole rows up to 64 KB, took
// 1.2-1.5x as long at 4, 8, 12 and 16 rows on the 2-core AVX-512 Xeon, whose L1 is 48 KB.)
// When the whole of x takes at most 48 KB, whole rows, so that W streams sequentially: at one
// row of x that matters more than L1 hits (a 1 x 11008 x in two chunks took 1.5x as long).
constexpr int64_t kRowsChunkBytes = 32 << 10;
constexpr int64_t kRowsWholeBytes = 48 << 10;
constexpr int64_t kRowsGroup = 64;

// The columns of one chunk for MB rows of x: K when x is small enough whole, else about equal
// chunks (a multiple of the NF4 block each) rather than full ones and a sliver.
template <int MB>
constexpr int64_t rows_chunk_cols(int64_t K) {
  if (MB * K * 4 <= kRowsWholeBytes) return K;
  const int64_t fit = kRowsChunkBytes / (MB * int64_t{4});
  const int64_t chunks = (K + fit - 1) / fit;
  const int64_t cols = (K + chunks - 1) / chunks;
  return (cols + kBlockSize - 1) / kBlockSize * kBlockSize;
}

// W rows per pass over the columns backward: the group's codes (and their absmax codes) stay in
// L2 and within few pages while every 64-column slice walks down it; walking all N rows per
// slice instead thrashes the TLB (rows are K/2 bytes apart). Decoded, a group's slice is 32 KB.
constexpr int64_t kColsGroup = 128;

// Isa::rows_span for MB rows of x in about equal passes of at most Isa::kRowsPass rows, each
// decoding the group's codes again (from L1/L2): one pass of more rows than the registers hold
// spills accumulators and row pointers to the stack (AVX-512 from 14 rows, AVX2 from 12). On
// the 2-core AMD EPYC, 4096 x 4096 at 16 rows: AVX-512 9.0-9.8 -> 3.9-4.0 ms, AVX2 7.6-9.5 ->
// 4.6 ms; at 12 rows 5.2-6.1 -> 2.9-3.4 and 5.2-7.0 -> 3.6-4.7 ms (ad hoc, alternating builds).
template <typename Isa, int MB>
void rows_span_in_passes(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, int64_t k0,
                         int64_t k1, bool first, const float* x, int64_t ldx, float* y,
                         int64_t ldy, const CodeTables& t, const typename Isa::Table& table) {
  constexpr int kPasses = (MB + Isa::kRowsPass - 1) / Isa::kRowsPass;
  constexpr int kPass = (MB + kPasses - 1) / kPasses;  // about equal passes: 12 rows in 6 + 6
  Isa::template rows_span<kPass>(w, K, n_begin, n_end, k0, k1, first, x, ldx, y, ldy, t, table);
  if constexpr (MB > kPass) {
    rows_span_in_passes<Isa, MB - kPass>(w, K, n_begin, n_end, k0, k1, first, x + kPass * ldx,
                                         ldx, y + kPass * ldy, ldy, t, table);
  }
}

template <typename Isa, int MB>
void gemv_rows_mb(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, const float* x,
                  int64_t ldx, float* y, int64_t ldy) {
  const CodeTables& t = code_tables();
  const typename Isa::Table table(t);
  const int64_t chunk = rows_chunk_cols<MB>(K);
  for (int64_t g = n_begin; g < n_end; g += kRowsGroup) {
    const int64_t g_end = g + kRowsGroup < n_end ? g + kRowsGroup : n_end;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t k1 = k0 + chunk < K ? k0 + chunk : K;
      rows_span_in_passes<Isa, MB>(w, K, g, g_end, k0, k1, k0 == 0, x, ldx, y, ldy, t, table);
    }
  }
}

using GemvRowsFn = void (*)(const Nf4View&, int64_t, int64_t, int64_t, const float*, int64_t,
                            float*, int64_t);

template <typename Isa, int... MB>
constexpr GemvRowsFn gemv_rows_for(int64_t M, std::integer_sequence<int, MB...>) {
  constexpr GemvRowsFn table[] = {&gemv_rows_mb<Isa, MB + 1>...};
  return table[M - 1];
}

// CpuKernels::gemv_rows.
template <typename Isa>
void gemv_rows(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, const float* x,
               int64_t M, int64_t ldx, float* y, int64_t ldy) {
  gemv_rows_for<Isa>(M, std::make_integer_sequence<int, kMaxFusedRows>{})(w, K, n_begin, n_end,
                                                                          x, ldx, y, ldy);
}

// Isa::cols_block for MB = rows (1 <= rows <= MB_MAX), reading W from `decoded` when not null.
template <typename Isa, int MB_MAX = Isa::kColsRows>
void cols_block_of_rows(int64_t rows, const Nf4View& w, int64_t K, int64_t n0, int64_t n1,
                        int64_t k, bool first, const float* gy, int64_t ldgy, float* gx,
                        int64_t ldgx, const CodeTables& t, const typename Isa::Table& table,
                        const float* decoded) {
  if constexpr (MB_MAX > 1) {
    if (rows < MB_MAX) {
      cols_block_of_rows<Isa, MB_MAX - 1>(rows, w, K, n0, n1, k, first, gy, ldgy, gx, ldgx, t,
                                          table, decoded);
      return;
    }
  }
  // Two instantiations, reading `decoded` or the codes, each compiled on its own (the kernels are
  // noinline): a branch in the loop, or both inlined into gemv_cols, changed the register
  // allocation of the decoding loop (20% slower at 2 rows on AVX2, 15% at 1 row on AVX-512).
  if (decoded != nullptr) {
    Isa::template cols_block<MB_MAX, true>(w, K, n0, n1, k, first, gy, ldgy, gx, ldgx, t, table,
                                           decoded);
  } else {
    Isa::template cols_block<MB_MAX, false>(w, K, n0, n1, k, first, gy, ldgy, gx, ldgx, t, table,
                                            nullptr);
  }
}

// CpuKernels::gemv_cols. When M takes more than one pass of Isa::kColsRows rows, each slice
// is decoded once into an L1-sized buffer that every pass reads, rather than decoded again per
// pass (the AVX2 kernel, 2 rows a pass, decoded W 8 times at M = 16). A 4096 x 4096 backward at
// M = 16 went from 17.8 to 7.2 ms on AVX2 and from 5.2 to 3.5 ms on AVX-512; at M = 8, 8.7 to
// 4.2 ms on AVX2 (medians of 5 alternating runs, ad hoc, the 2-core AVX-512 Xeon).
template <typename Isa>
void gemv_cols(const Nf4View& w, int64_t N, int64_t K, int64_t k_begin, int64_t k_end,
               const float* gy, int64_t M, int64_t ldgy, float* gx, int64_t ldgx) {
  const CodeTables& t = code_tables();
  const typename Isa::Table table(t);
  alignas(64) float slice[kColsGroup * kBlockSize];
  const float* decoded = M > Isa::kColsRows ? slice : nullptr;
  for (int64_t n0 = 0; n0 < N; n0 += kColsGroup) {
    const int64_t n1 = n0 + kColsGroup < N ? n0 + kColsGroup : N;
    for (int64_t k = k_begin; k < k_end; k += kBlockSize) {
      if (decoded != nullptr) Isa::cols_decode(w, K, n0, n1, k, t, table, slice);
      for (int64_t m = 0; m < M; m += Isa::kColsRows) {
        const int64_t rows = M - m < Isa::kColsRows ? M - m : Isa::kColsRows;
        cols_block_of_rows<Isa>(rows, w, K, n0, n1, k, n0 == 0, gy + m * ldgy, ldgy,
                                gx + m * ldgx, ldgx, t, table, decoded);
      }
    }
  }
}

}  // namespace QLORA_ISA_NAMESPACE
}  // namespace qlora::cpu
