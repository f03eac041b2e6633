// AVX2 CPU kernels (AVX2, FMA, F16C), for x86-64 CPUs without AVX-512 (AMD Zen 2/3, older
// Intel). Compiled with -mavx2 -mfma -mf16c in a file of their own and chosen at run time
// (cpu_has_avx2), like the AVX-512 ones; the codec gives the same bytes and values bit for bit.
//
// The 16 NF4 values take two ymm registers: vpermps looks a code up in each half (it reads the
// low 3 bits of the index) and bit 3 of the code picks the half. A code is the number of NF4
// midpoints below the scaled value, found by the scalar code's four-step binary search on 8 lanes
// at once. The 256-bit ops that cross 128-bit lanes are few: AMD Zen 1 runs them slowly.
#define QLORA_ISA_NAMESPACE avx2_isa
#include <immintrin.h>

#include "cpu_kernels.h"
#include "gemv_loops.h"

namespace qlora::cpu {
namespace {

template <DType D>
__m256 load8(const void* base, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (D == DType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

// 8 floats -> 8 bf16 or fp16 bit patterns, rounded to nearest even (as float_to_bf16 /
// float_to_fp16; NaN becomes quiet NaN).
template <DType D>
__m128i to16(__m256 v) {
  if constexpr (D == DType::kBFloat16) {
    __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    bits = _mm256_srli_epi32(bits, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7fc0), nan);
    // 32 -> 16 bits (every value fits): packus works per 128-bit lane, so gather lanes 0 and 2.
    const __m256i packed = _mm256_packus_epi32(bits, bits);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  } else {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

// The 16-entry table `lo` (entries 0-7) / `hi` (8-15) looked up at 8 codes in 0..15.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i codes) {
  const __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));  // sign = bit 3
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, codes), _mm256_permutevar8x32_ps(hi, codes), from_hi);
}

inline uint32_t reduce_max_u32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The midpoints the binary search of nf4_code compares with, level by level: m7; m3 or m11; one
// of m1, m5, m9, m13 (at code / 4); one of m0, m2, ..., m14 (at code / 2).
struct MidpointSearch {
  __m256 m7, m3, m11, quarter, half;

  explicit MidpointSearch(const float* mid)
      : m7(_mm256_set1_ps(mid[7])),
        m3(_mm256_set1_ps(mid[3])),
        m11(_mm256_set1_ps(mid[11])),
        quarter(_mm256_setr_ps(mid[1], mid[5], mid[9], mid[13], 0.0f, 0.0f, 0.0f, 0.0f)),
        half(_mm256_setr_ps(mid[0], mid[2], mid[4], mid[6], mid[8], mid[10], mid[12], mid[14])) {}

  // The codes of 8 scaled values: nf4_code's four steps, with the thresholds of the later
  // steps looked up per lane (what a scalar loop finds, NaN included: every compare is false).
  __m256i codes(__m256 s) const {
    const __m256 above_m7 = _mm256_cmp_ps(s, m7, _CMP_GT_OQ);
    __m256i c = _mm256_and_si256(_mm256_castps_si256(above_m7), _mm256_set1_epi32(8));
    const __m256 t4 = _mm256_blendv_ps(m3, m11, above_m7);
    c = _mm256_or_si256(c, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, t4, _CMP_GT_OQ)), _mm256_set1_epi32(4)));
    const __m256 t2 = _mm256_permutevar8x32_ps(quarter, _mm256_srli_epi32(c, 2));
    c = _mm256_or_si256(c, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, t2, _CMP_GT_OQ)), _mm256_set1_epi32(2)));
    const __m256 t1 = _mm256_permutevar8x32_ps(half, _mm256_srli_epi32(c, 1));
    return _mm256_or_si256(c, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, t1, _CMP_GT_OQ)), _mm256_set1_epi32(1)));
  }
};

// Packs a block's 64 codes (c[q] holds those of weights 8q .. 8q + 7, one per 32-bit lane) into
// its 32 bytes, weight 2j in the high nibble of byte j. The codes are narrowed to bytes, each
// adjacent pair is joined into one byte, and the lane order the packs leave is undone at the end.
inline void pack_block(const __m256i c[8], uint8_t* out) {
  // per 128-bit lane: weights 8q .. 8q + 3 of q = 0..3 (lane 0), 8q + 4 .. 8q + 7 (lane 1)
  const __m256i low = _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  const __m256i high = _mm256_packus_epi16(_mm256_packs_epi32(c[4], c[5]), _mm256_packs_epi32(c[6], c[7]));
  // each 16-bit unit holds an (even, odd) pair of codes: the byte (even << 4) | odd in its low half
  const __m256i byte_mask = _mm256_set1_epi16(0x00ff);
  const auto join = [&](__m256i u) {
    return _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(u, 4), _mm256_srli_epi16(u, 8)), byte_mask);
  };
  // lane 0: bytes of pairs 4q, 4q + 1 for q = 0..7; lane 1: pairs 4q + 2, 4q + 3
  const __m256i pairs = _mm256_packus_epi16(join(low), join(high));
  const __m128i lane0 = _mm256_castsi256_si128(pairs), lane1 = _mm256_extracti128_si256(pairs, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(lane0, lane1));       // pairs 0-15
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi16(lane0, lane1));  // 16-31
}

template <DType D>
uint32_t quantize_blocks_t(const void* w, int64_t first, int64_t last, uint8_t* packed,
                           float* absmax) {
  const CodeTables& t = code_tables();
  const MidpointSearch search(t.nf4_mid);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256 minus_one = _mm256_set1_ps(-1.0f), one = _mm256_set1_ps(1.0f);
  __m256i seen = _mm256_setzero_si256();
  for (int64_t b = first; b < last; ++b) {
    __m256 v[8];
    __m256i block_bits = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      v[q] = load8<D>(w, b * kBlockSize + 8 * q);
      // max |v| on the bit patterns: exact, and NaN / Inf order above every number.
      block_bits = _mm256_max_epu32(block_bits, _mm256_and_si256(_mm256_castps_si256(v[q]), abs_mask));
    }
    seen = _mm256_max_epu32(seen, block_bits);
    const float amax = float_from_bits(reduce_max_u32(block_bits));
    absmax[b] = amax;
    const __m256 inv = _mm256_set1_ps(inverse_absmax(amax));
    __m256i codes[8];
    for (int q = 0; q < 8; ++q) {
      codes[q] = search.codes(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[q], inv), minus_one), one));
    }
    pack_block(codes, packed + b * (kBlockSize / 2));
  }
  return reduce_max_u32(seen);
}

uint32_t quantize_blocks(const void* w, DType dtype, int64_t first, int64_t last, uint8_t* packed,
                         float* absmax) {
  return with_dtype(dtype, [&](auto d) { return quantize_blocks_t<d.value>(w, first, last, packed, absmax); });
}

// The 16 NF4 values in two registers (entries 0-7, 8-15): the table of the gemv kernels.
struct NF4Registers {
  __m256 lo, hi;
  explicit NF4Registers(const CodeTables& t) : lo(_mm256_loadu_ps(t.nf4)), hi(_mm256_loadu_ps(t.nf4 + 8)) {}
};

// The NF4 values of 16 weights (8 packed bytes): the 8 even-indexed ones and the 8 odd-indexed.
struct Pairs8 {
  __m256 even;
  __m256 odd;
};

inline Pairs8 decode8(const uint8_t* bytes, __m256 lo, __m256 hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  return {lookup16(lo, hi, _mm256_srli_epi32(b, 4)), lookup16(lo, hi, _mm256_and_si256(b, _mm256_set1_epi32(15)))};
}

// (even, odd) back into element order: weights 0-7 and 8-15 of the 16.
inline void interleave(__m256 even, __m256 odd, __m256* first, __m256* second) {
  const __m256 a = _mm256_unpacklo_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5
  const __m256 b = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
  *first = _mm256_permute2f128_ps(a, b, 0x20);
  *second = _mm256_permute2f128_ps(a, b, 0x31);
}

// 16-bit outputs: per block, the 16 NF4 values times its absmax are rounded to the output
// dtype once (the products and roundings each element would get), split into a table of their
// low bytes and one of their high bytes, and the block's 64 codes look both up with vpshufb (a
// 16-entry byte table per 128-bit lane). Unpacking the looked-up bytes into 16-bit values and
// then even/odd pairs stays within lanes: lane 0 holds codes 0-31 of the block, lane 1 codes
// 32-63, each stored as 128-bit quarters (no cross-lane shuffles; slow on AMD Zen 1).
template <DType D>
void dequantize_blocks_16bit(const Nf4View& w, int64_t first, int64_t last, void* out) {
  const CodeTables& t = code_tables();
  const __m256 lo = _mm256_loadu_ps(t.nf4), hi = _mm256_loadu_ps(t.nf4 + 8);
  const __m128i split_bytes = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  uint16_t* dst = static_cast<uint16_t*>(out);
  for (int64_t b = first; b < last; ++b) {
    const __m256 a = _mm256_set1_ps(block_absmax(w, b, t));
    // values 0-7 and 8-15, each as [8 low bytes | 8 high bytes]
    const __m128i v0 = _mm_shuffle_epi8(to16<D>(_mm256_mul_ps(lo, a)), split_bytes);
    const __m128i v1 = _mm_shuffle_epi8(to16<D>(_mm256_mul_ps(hi, a)), split_bytes);
    const __m256i low_bytes = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(v0, v1));
    const __m256i high_bytes = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(v0, v1));
    // byte j holds weights 2j (high nibble) and 2j + 1 (low nibble)
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.packed + b * (kBlockSize / 2)));
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
    const __m256i odd = _mm256_and_si256(bytes, nibble);
    const __m256i even_lo = _mm256_shuffle_epi8(low_bytes, even), even_hi = _mm256_shuffle_epi8(high_bytes, even);
    const __m256i odd_lo = _mm256_shuffle_epi8(low_bytes, odd), odd_hi = _mm256_shuffle_epi8(high_bytes, odd);
    // 16-bit values of bytes 0-7 / 8-15 of each lane, even and odd weights
    const __m256i e0 = _mm256_unpacklo_epi8(even_lo, even_hi), e1 = _mm256_unpackhi_epi8(even_lo, even_hi);
    const __m256i o0 = _mm256_unpacklo_epi8(odd_lo, odd_hi), o1 = _mm256_unpackhi_epi8(odd_lo, odd_hi);
    // in weight order: per lane, r0 = bytes 0-3, r1 = 4-7, r2 = 8-11, r3 = 12-15 (8 weights each)
    const __m256i r[4] = {_mm256_unpacklo_epi16(e0, o0), _mm256_unpackhi_epi16(e0, o0),
                          _mm256_unpacklo_epi16(e1, o1), _mm256_unpackhi_epi16(e1, o1)};
    __m128i* o = reinterpret_cast<__m128i*>(dst + (b - first) * kBlockSize);
    for (int q = 0; q < 4; ++q) {
      _mm_storeu_si128(o + q, _mm256_castsi256_si128(r[q]));           // weights 8q .. 8q + 7
      _mm_storeu_si128(o + 4 + q, _mm256_extracti128_si256(r[q], 1));  // weights 32 + 8q ..
    }
  }
}

// float32 outputs: each 16 weights are looked up in the two table registers (vpermps), scaled
// and put back in order. The 4 bytes written per weight bound this loop already (6.9 ms for a
// 4096x4096 weight on 2 Zen 1 cores, as fast per byte as the 16-bit path), so it keeps the
// simpler lookup.
void dequantize_blocks_f32(const Nf4View& w, int64_t first, int64_t last, float* out) {
  const CodeTables& t = code_tables();
  const __m256 lo = _mm256_loadu_ps(t.nf4), hi = _mm256_loadu_ps(t.nf4 + 8);
  for (int64_t b = first; b < last; ++b) {
    const __m256 a = _mm256_set1_ps(block_absmax(w, b, t));
    float* o = out + (b - first) * kBlockSize;
    for (int q = 0; q < 4; ++q) {
      const Pairs8 v = decode8(w.packed + b * (kBlockSize / 2) + 8 * q, lo, hi);
      __m256 first8, second8;
      interleave(_mm256_mul_ps(v.even, a), _mm256_mul_ps(v.odd, a), &first8, &second8);
      _mm256_storeu_ps(o + 16 * q, first8);
      _mm256_storeu_ps(o + 16 * q + 8, second8);
    }
  }
}

void dequantize_blocks(const Nf4View& w, int64_t first, int64_t last, void* out, DType dtype) {
  with_dtype(dtype, [&](auto d) {
    if constexpr (d.value == DType::kFloat32) {
      dequantize_blocks_f32(w, first, last, static_cast<float*>(out));
    } else {
      dequantize_blocks_16bit<d.value>(w, first, last, out);
    }
  });
}

constexpr int64_t kPrefetchBytes = 2048;  // how far ahead the stream of codes is prefetched

// Rows [n_begin, n_end) of W against MB rows of x (pair-split: per 32 elements, the 16 even then
// the 16 odd), over columns [k0, k1): adds the partial dot products into y (or stores them when
// `first`). Bytes 8h..8h+7 of a 32-element chunk hold its weights 16h..16h+15: their even ones
// meet x's split positions 8h..8h+7, their odd ones 16+8h..16+8h+7. Per block the code-value
// products are summed first and scaled by the block's absmax once.
template <int MB>
void gemv_rows_span(const Nf4View& w, int64_t K, int64_t n_begin, int64_t n_end, int64_t k0,
                    int64_t k1, bool first, const float* x, int64_t ldx, float* y, int64_t ldy,
                    const CodeTables& t, const NF4Registers& nf4) {
  const __m256 lo = nf4.lo, hi = nf4.hi;
  const int64_t blocks_per_row = K / kBlockSize;
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t kb = k0 / kBlockSize; kb < k1 / kBlockSize; ++kb) {
      const int64_t b = n * blocks_per_row + kb;
      const uint8_t* bytes = w.packed + b * (kBlockSize / 2);
      _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchBytes, _MM_HINT_T0);
      Pairs8 d[4];
      for (int q = 0; q < 4; ++q) d[q] = decode8(bytes + 8 * q, lo, hi);
      const __m256 a = _mm256_set1_ps(block_absmax(w, b, t));
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * ldx + kb * kBlockSize;
        __m256 p = _mm256_mul_ps(d[0].even, _mm256_loadu_ps(xm));
        p = _mm256_fmadd_ps(d[0].odd, _mm256_loadu_ps(xm + 16), p);
        p = _mm256_fmadd_ps(d[1].even, _mm256_loadu_ps(xm + 8), p);
        p = _mm256_fmadd_ps(d[1].odd, _mm256_loadu_ps(xm + 24), p);
        p = _mm256_fmadd_ps(d[2].even, _mm256_loadu_ps(xm + 32), p);
        p = _mm256_fmadd_ps(d[2].odd, _mm256_loadu_ps(xm + 48), p);
        p = _mm256_fmadd_ps(d[3].even, _mm256_loadu_ps(xm + 40), p);
        p = _mm256_fmadd_ps(d[3].odd, _mm256_loadu_ps(xm + 56), p);
        acc[m] = _mm256_fmadd_ps(p, a, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float s = reduce_add(acc[m]);
      y[m * ldy + n] = first ? s : y[m * ldy + n] + s;
    }
  }
}

// Rows ahead whose codes the backward prefetches. Its walk down a column block reads one 32-byte
// piece per row, K / 2 bytes apart, which the hardware prefetchers do not run ahead of: 8 rows
// left M = 1 latency-bound; 64 took it from 1.6 to 1.0 ms at 4096 x 4096 (QLORA_CPU_ISA=avx2;
// medians, ad hoc, the 2-core AVX-512 EPYC), M = 8 and 16 no slower.
constexpr int64_t kColsPrefetchRows = 64;

// Row n's 64 weights [k, k + 64) of W times their block's absmax: per 16 weights, the 8 even
// ones then the 8 odd ones.
inline void cols_row(const Nf4View& w, int64_t K, int64_t n, int64_t k, const CodeTables& t,
                     const NF4Registers& nf4, __m256 v[8]) {
  const int64_t b = n * (K / kBlockSize) + k / kBlockSize;
  const uint8_t* bytes = w.packed + b * (kBlockSize / 2);
  _mm_prefetch(reinterpret_cast<const char*>(bytes) + kColsPrefetchRows * (K / 2), _MM_HINT_T0);
  const __m256 a = _mm256_set1_ps(block_absmax(w, b, t));
  for (int q = 0; q < 4; ++q) {
    const Pairs8 d = decode8(bytes + 8 * q, nf4.lo, nf4.hi);
    v[2 * q] = _mm256_mul_ps(d.even, a);
    v[2 * q + 1] = _mm256_mul_ps(d.odd, a);
  }
}

// cols_row for rows [n0, n1), one after another into `decoded` (64 floats a row).
void gemv_cols_decode(const Nf4View& w, int64_t K, int64_t n0, int64_t n1, int64_t k,
                      const CodeTables& t, const NF4Registers& nf4, float* decoded) {
  for (int64_t n = n0; n < n1; ++n) {
    __m256 v[8];
    cols_row(w, K, n, k, t, nf4, v);
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(decoded + (n - n0) * kBlockSize + 8 * q, v[q]);
  }
}

// 64 columns [k, k + 64) of grad_x for MB rows, over rows [n0, n1) of W: adds
// gy[m, n] * W[n, k:k+64] into gx (or stores when `first`). W's rows are decoded from the codes,
// or with kFromSlice read from `decoded` (gemv_cols_decode's output for these rows and columns).
// Accumulators stay in (even, odd) order per 16 weights and are interleaved once at the end.
template <int MB, bool kFromSlice>
[[gnu::noinline]]  // compiled on its own: see cols_block_of_rows in gemv_loops.h
void gemv_cols_block(const Nf4View& w, int64_t K, int64_t n0, int64_t n1, int64_t k, bool first,
                     const float* gy, int64_t ldgy, float* gx, int64_t ldgx, const CodeTables& t,
                     const NF4Registers& nf4, const float* decoded) {
  __m256 acc[MB][8];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 8; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int64_t n = n0; n < n1; ++n) {
    __m256 v[8];
    if constexpr (kFromSlice) {
      for (int q = 0; q < 8; ++q) v[q] = _mm256_loadu_ps(decoded + (n - n0) * kBlockSize + 8 * q);
    } else {
      cols_row(w, K, n, k, t, nf4, v);
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 g = _mm256_set1_ps(gy[m * ldgy + n]);
      for (int q = 0; q < 8; ++q) acc[m][q] = _mm256_fmadd_ps(v[q], g, acc[m][q]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* out = gx + m * ldgx + k;
    for (int q = 0; q < 4; ++q) {
      __m256 first8, second8;
      interleave(acc[m][2 * q], acc[m][2 * q + 1], &first8, &second8);
      if (!first) {
        first8 = _mm256_add_ps(first8, _mm256_loadu_ps(out + 16 * q));
        second8 = _mm256_add_ps(second8, _mm256_loadu_ps(out + 16 * q + 8));
      }
      _mm256_storeu_ps(out + 16 * q, first8);
      _mm256_storeu_ps(out + 16 * q + 8, second8);
    }
  }
}

// The inner kernels the loops of gemv_loops.h run.
struct Gemv {
  using Table = NF4Registers;
  static constexpr int kColsRows = 2;  // rows of grad_y per pass: 16 accumulators (ymm registers are 16)
  static constexpr int kRowsPass = 8;  // rows of x per rows_span pass (passes of 4 were slower at 8 rows)
  template <int MB>
  static constexpr auto rows_span = &gemv_rows_span<MB>;
  template <int MB, bool kFromSlice>
  static constexpr auto cols_block = &gemv_cols_block<MB, kFromSlice>;
  static constexpr auto cols_decode = &gemv_cols_decode;
};

}  // namespace

const CpuKernels* avx2_kernels() {
  // Above 16 rows the backward's passes of 2 rows lose to tiles + BLAS (4096 x 4096 at 24 rows:
  // 11.0 vs 9.7 ms; ad hoc, the 2-core AVX-512 Xeon running the AVX2 kernels).
  static const CpuKernels kernels{"avx2", quantize_blocks, dequantize_blocks, gemv_rows<Gemv>,
                                  gemv_cols<Gemv>, kMaxFusedRows};
  return &kernels;
}

}  // namespace qlora::cpu
