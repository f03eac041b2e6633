// AVX-512 CPU kernels (F, BW, VL, DQ), compiled with -mavx512* in a file of their own and chosen
// at run time (cpu_has_avx512), so the rest of the library runs on any x86-64. No torch headers
// here: an inline function from them, compiled with AVX-512, could be picked by the linker for
// the portable code too.
//
// The 16 NF4 values fit one zmm register: vpermps looks a code up with one instruction, and it
// reads only the low 4 bits of each index, so a zero-extended packed byte looks up its odd
// (low-nibble) code as it is, and its even code after a shift by 4.
#define QLORA_ISA_NAMESPACE avx512_isa
#include <immintrin.h>

#include "cpu_kernels.h"
#include "gemv_loops.h"

namespace qlora::cpu {
namespace {

template <DType D>
__m512 load16(const void* base, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (D == DType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <DType D>
void store16(void* base, int64_t i, __m512 v) {
  if constexpr (D == DType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(base) + i, v);
  } else {
    __m256i h;
    if constexpr (D == DType::kBFloat16) {
      // Round to nearest even on the bit pattern (no AVX512-BF16 assumed); NaN stays quiet NaN.
      __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      bits = _mm512_srli_epi32(bits, 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      bits = _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(0x7fc0));
      h = _mm512_cvtepi32_epi16(bits);
    } else {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(base) + i), h);
  }
}

// NF4 codes of 16 scaled values: the binary search of nf4_code, one vpermps + compare per level.
inline __m512i nf4_codes16(__m512 s, __m512 mids) {
  const __m512 mid7 = _mm512_permutexvar_ps(_mm512_set1_epi32(7), mids);
  __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, mid7, _CMP_GT_OQ),
                                     _mm512_set1_epi32(8));
  for (int step = 4; step > 0; step >>= 1) {
    const __m512 m = _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(step - 1)), mids);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, m, _CMP_GT_OQ), c,
                              _mm512_set1_epi32(step));
  }
  return c;
}

inline __m512 clamp_unit16(__m512 v) {
  return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
}

template <DType D>
uint32_t quantize_blocks_t(const void* w, int64_t first, int64_t last, uint8_t* packed,
                           float* absmax) {
  const CodeTables& t = code_tables();
  const __m512 mids = _mm512_loadu_ps(t.nf4_mid);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i seen = _mm512_setzero_si512();
  for (int64_t b = first; b < last; ++b) {
    __m512 v[4];
    __m512i block_bits = _mm512_setzero_si512();
    for (int q = 0; q < 4; ++q) {
      v[q] = load16<D>(w, b * kBlockSize + 16 * q);
      // max |v| on the bit patterns: exact, and NaN / Inf order above every number.
      block_bits = _mm512_max_epu32(block_bits, _mm512_and_si512(_mm512_castps_si512(v[q]), abs_mask));
    }
    seen = _mm512_max_epu32(seen, block_bits);
    const float amax = float_from_bits(_mm512_reduce_max_epu32(block_bits));
    absmax[b] = amax;
    const __m512 inv = _mm512_set1_ps(inverse_absmax(amax));
    __m512i codes = _mm512_setzero_si512();  // 64 code bytes in element order
    for (int q = 0; q < 4; ++q) {
      const __m512i c = nf4_codes16(clamp_unit16(_mm512_mul_ps(v[q], inv)), mids);
      codes = _mm512_inserti32x4(codes, _mm512_cvtepi32_epi8(c), q);
    }
    // As 16-bit lanes the low byte is the even element: byte = even << 4 | odd.
    const __m512i pairs = _mm512_or_si512(
        _mm512_slli_epi16(_mm512_and_si512(codes, _mm512_set1_epi16(0x00ff)), 4),
        _mm512_srli_epi16(codes, 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + b * (kBlockSize / 2)),
                        _mm512_cvtepi16_epi8(pairs));
  }
  return _mm512_reduce_max_epu32(seen);
}

uint32_t quantize_blocks(const void* w, DType dtype, int64_t first, int64_t last, uint8_t* packed,
                         float* absmax) {
  return with_dtype(dtype, [&](auto d) { return quantize_blocks_t<d.value>(w, first, last, packed, absmax); });
}

// The 16 NF4 values in one register: the table of the gemv kernels.
struct NF4Register {
  __m512 values;
  explicit NF4Register(const CodeTables& t) : values(_mm512_loadu_ps(t.nf4)) {}
};

// The NF4 values of 32 weights (16 packed bytes): even-indexed weights and odd-indexed ones.
struct HalfBlock {
  __m512 even;
  __m512 odd;
};

inline HalfBlock decode_half(const uint8_t* bytes, __m512 table) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  return {_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), _mm512_permutexvar_ps(b, table)};
}

// permutex2var indices that interleave (even, odd) back into element order.
inline __m512i interleave_low() {
  return _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}
inline __m512i interleave_high() {
  return _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
}

template <DType D>
void dequantize_blocks_t(const Nf4View& w, int64_t first, int64_t last, void* out) {
  const CodeTables& t = code_tables();
  const __m512 table = _mm512_loadu_ps(t.nf4);
  const __m512i lo = interleave_low(), hi = interleave_high();
  for (int64_t b = first; b < last; ++b) {
    const __m512 a = _mm512_set1_ps(block_absmax(w, b, t));
    const int64_t o = (b - first) * kBlockSize;
    for (int h = 0; h < 2; ++h) {
      const HalfBlock v = decode_half(w.packed + b * (kBlockSize / 2) + 16 * h, table);
      const __m512 even = _mm512_mul_ps(v.even, a), odd = _mm512_mul_ps(v.odd, a);
      store16<D>(out, o + 32 * h, _mm512_permutex2var_ps(even, lo, odd));
      store16<D>(out, o + 32 * h + 16, _mm512_permutex2var_ps(even, hi, odd));
    }
  }
}

void dequantize_blocks(const Nf4View& w, int64_t first, int64_t last, void* out, DType dtype) {
  with_dtype(dtype, [&](auto d) { dequantize_blocks_t<d.value>(w, first, last, out); });
}

constexpr int64_t kPrefetchBytes = 2048;  // how far ahead the stream of codes is prefetched

// Rows [n_begin, n_end) of W against MB rows of x (pair-split), over columns [k0, k1): adds the
// partial dot products into y (or stores them when `first`). Per block the code-value products
// are summed first and scaled by the block's absmax once.
template <int MB>
void gemv_rows_span(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, int64_t k0,
                    int64_t k1, bool first, const float* x, int64_t ldx, float* y, int64_t ldy,
                    const CodeTables& t, const NF4Register& nf4) {
  const __m512 table = nf4.values;
  const int64_t blocks_per_row = K / kBlockSize;
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t kb = k0 / kBlockSize; kb < k1 / kBlockSize; ++kb) {
      const int64_t b = n * blocks_per_row + kb;
      const uint8_t* bytes = w.packed + b * (kBlockSize / 2);
      _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchBytes, _MM_HINT_T0);
      const HalfBlock h0 = decode_half(bytes, table), h1 = decode_half(bytes + 16, table);
      const __m512 a = _mm512_set1_ps(block_absmax(w, b, t));
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * ldx + kb * kBlockSize;
        __m512 p = _mm512_mul_ps(h0.even, _mm512_loadu_ps(xm));
        p = _mm512_fmadd_ps(h0.odd, _mm512_loadu_ps(xm + 16), p);
        p = _mm512_fmadd_ps(h1.even, _mm512_loadu_ps(xm + 32), p);
        p = _mm512_fmadd_ps(h1.odd, _mm512_loadu_ps(xm + 48), p);
        acc[m] = _mm512_fmadd_ps(p, a, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float s = _mm512_reduce_add_ps(acc[m]);
      y[m * ldy + n] = first ? s : y[m * ldy + n] + s;
    }
  }
}

// Rows ahead whose codes the backward prefetches. Its walk down a column block reads one 32-byte
// piece per row, K / 2 bytes apart, which the hardware prefetchers do not run ahead of: 8 rows
// left M = 1 latency-bound; 64 took it from 1.04 to 0.57-0.65 ms at 4096 x 4096 and from 2.8 to
// 1.7-1.8 ms at 11008 x 4096 (medians, ad hoc, the 2-core AVX-512 EPYC), M = 8 and 16 no slower.
constexpr int64_t kColsPrefetchRows = 64;

// Row n's 64 weights [k, k + 64) of W times their block's absmax, in (even, odd) order per 32.
inline void cols_row(const Nf4View& w, int64_t K, int64_t n, int64_t k, const CodeTables& t,
                     __m512 table, __m512 v[4]) {
  const int64_t b = n * (K / kBlockSize) + k / kBlockSize;
  const uint8_t* bytes = w.packed + b * (kBlockSize / 2);
  _mm_prefetch(reinterpret_cast<const char*>(bytes) + kColsPrefetchRows * (K / 2), _MM_HINT_T0);
  const __m512 a = _mm512_set1_ps(block_absmax(w, b, t));
  const HalfBlock h0 = decode_half(bytes, table), h1 = decode_half(bytes + 16, table);
  v[0] = _mm512_mul_ps(h0.even, a);
  v[1] = _mm512_mul_ps(h0.odd, a);
  v[2] = _mm512_mul_ps(h1.even, a);
  v[3] = _mm512_mul_ps(h1.odd, a);
}

// cols_row for rows [n0, n1), one after another into `decoded` (64 floats a row).
void gemv_cols_decode(const Nf4View& w, int64_t K, int64_t n0, int64_t n1, int64_t k,
                      const CodeTables& t, const NF4Register& nf4, float* decoded) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 v[4];
    cols_row(w, K, n, k, t, nf4.values, v);
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(decoded + (n - n0) * kBlockSize + 16 * q, v[q]);
  }
}

// 64 columns [k, k + 64) of grad_x for MB rows, over rows [n0, n1) of W: adds
// gy[m, n] * W[n, k:k+64] into gx (or stores when `first`). W's rows are decoded from the codes,
// or with kFromSlice read from `decoded` (gemv_cols_decode's output for these rows and columns).
template <int MB, bool kFromSlice>
[[gnu::noinline]]  // compiled on its own: see cols_block_of_rows in gemv_loops.h
void gemv_cols_block(const Nf4View& w, int64_t K, int64_t n0, int64_t n1, int64_t k, bool first,
                     const float* gy, int64_t ldgy, float* gx, int64_t ldgx, const CodeTables& t,
                     const NF4Register& nf4, const float* decoded) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t n = n0; n < n1; ++n) {
    __m512 v[4];
    if constexpr (kFromSlice) {
      for (int q = 0; q < 4; ++q) v[q] = _mm512_loadu_ps(decoded + (n - n0) * kBlockSize + 16 * q);
    } else {
      cols_row(w, K, n, k, t, nf4.values, v);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 g = _mm512_set1_ps(gy[m * ldgy + n]);
      for (int q = 0; q < 4; ++q) acc[m][q] = _mm512_fmadd_ps(v[q], g, acc[m][q]);
    }
  }
  const __m512i lo = interleave_low(), hi = interleave_high();
  for (int m = 0; m < MB; ++m) {
    float* out = gx + m * ldgx + k;
    for (int h = 0; h < 2; ++h) {
      __m512 v0 = _mm512_permutex2var_ps(acc[m][2 * h], lo, acc[m][2 * h + 1]);
      __m512 v1 = _mm512_permutex2var_ps(acc[m][2 * h], hi, acc[m][2 * h + 1]);
      if (!first) {
        v0 = _mm512_add_ps(v0, _mm512_loadu_ps(out + 32 * h));
        v1 = _mm512_add_ps(v1, _mm512_loadu_ps(out + 32 * h + 16));
      }
      _mm512_storeu_ps(out + 32 * h, v0);
      _mm512_storeu_ps(out + 32 * h + 16, v1);
    }
  }
}

// The inner kernels the loops of gemv_loops.h run.
struct Gemv {
  using Table = NF4Register;
  static constexpr int kColsRows = 4;  // rows of grad_y per pass: 4 x 4 accumulators stay in registers
  static constexpr int kRowsPass = 8;  // rows of x per rows_span pass: 8 accumulators + 4 decoded halves + row pointers
  template <int MB>
  static constexpr auto rows_span = &gemv_rows_span<MB>;
  template <int MB, bool kFromSlice>
  static constexpr auto cols_block = &gemv_cols_block<MB, kFromSlice>;
  static constexpr auto cols_decode = &gemv_cols_decode;
};

}  // namespace

const CpuKernels* avx512_kernels() {
  // The backward reads W from decoded slices in passes of 4 rows up to 128 rows: tiles + BLAS
  // decode all of W to float32 first, and took 1.1-1.6x as long at 64 and 128 rows on the Llama-2
  // 7B shapes and 768 x 768 (4096 x 4096: 10.5 vs 15.6 ms at 64, 22-26 vs 35-40 ms at 128), but
  // won at 256 (37-43 vs 46 ms); ad hoc, the 2-core AVX-512 Xeon. Float32 tiles: bf16 ones take
  // over from kMaxFusedGradRowsBf16Tiles rows.
  static const CpuKernels kernels{"avx512", quantize_blocks, dequantize_blocks,
                                  gemv_rows<Gemv>, gemv_cols<Gemv>, 128};
  return &kernels;
}

}  // namespace qlora::cpu
