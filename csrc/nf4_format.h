// The NF4 storage format shared by every kernel (docs/nf4_format.md): block sizes, the exact
// float32 code tables, code selection, packing order, the fixed reduction order of the absmax
// mean, and the raw view of the four storage tensors. Host and device; no torch includes, so the
// C++ tests can use it on their own.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

// Every function below is inline and so is merged across object files by the linker. The
// AVX-512 kernels are compiled with other instruction-set flags, so they include this header with
// QLORA_ISA_NAMESPACE set to a name of their own: their copies can never stand in for the
// portable ones.
#ifndef QLORA_ISA_NAMESPACE
#define QLORA_ISA_NAMESPACE base_isa
#endif

namespace qlora {

constexpr int64_t kBlockSize = 64;         // weights per NF4 block (one absmax each)
constexpr int64_t kScalerBlockSize = 256;  // absmax values per float32 scale (double quantization)
constexpr int kReduceLanes = 32;           // width of the fixed absmax-mean tree (one CUDA warp)
constexpr float kMinAbsmax = 1e-38f;       // floor of a block's absmax before taking 1/absmax
constexpr uint32_t kNonFiniteBits = 0x7f800000u;  // |x| bits >= this: x is Inf or NaN

// The 16 NF4 values (code -> value, ascending, code 7 is exactly 0.0), as float32 bit patterns.
#define QLORA_NF4_BITS                                                                      \
  {0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu,            \
   0xbdba7871u, 0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au,            \
   0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u}

// The 256-entry signed dynamic map of the 8-bit absmax codes (ascending, code 127 is 0.0).
#define QLORA_ABSMAX_MAP_BITS                                                                \
  {0xbf7e3333u, 0xbf7a999au, 0xbf770000u, 0xbf736666u, 0xbf6fcccdu, 0xbf6c3333u, 0xbf68999au, \
   0xbf650000u, 0xbf616666u, 0xbf5dcccdu, 0xbf5a3333u, 0xbf56999au, 0xbf530000u, 0xbf4f6666u, \
   0xbf4bcccdu, 0xbf483333u, 0xbf44999au, 0xbf410000u, 0xbf3d6666u, 0xbf39cccdu, 0xbf363334u, \
   0xbf32999au, 0xbf2f0000u, 0xbf2b6666u, 0xbf27cccdu, 0xbf243334u, 0xbf20999au, 0xbf1d0000u, \
   0xbf196666u, 0xbf15cccdu, 0xbf123334u, 0xbf0e999au, 0xbf0b0000u, 0xbf076666u, 0xbf03ccccu, \
   0xbf003333u, 0xbef93332u, 0xbef20000u, 0xbeeaccccu, 0xbee3999au, 0xbedc6666u, 0xbed53333u, \
   0xbece0000u, 0xbec6ccccu, 0xbebf999au, 0xbeb86666u, 0xbeb13333u, 0xbeaa0000u, 0xbea2ccccu, \
   0xbe9b999au, 0xbe946666u, 0xbe8d3334u, 0xbe860000u, 0xbe7d9999u, 0xbe6f3333u, 0xbe60cccdu, \
   0xbe526666u, 0xbe440000u, 0xbe35999au, 0xbe273333u, 0xbe18cccdu, 0xbe0a6666u, 0xbdf80000u, \
   0xbddb3334u, 0xbdc9eb85u, 0xbdc428f7u, 0xbdbe6667u, 0xbdb8a3d7u, 0xbdb2e148u, 0xbdad1eb8u, \
   0xbda75c2au, 0xbda1999au, 0xbd9bd70au, 0xbd96147bu, 0xbd9051ebu, 0xbd8a8f5du, 0xbd84cccdu, \
   0xbd7e147bu, 0xbd728f5du, 0xbd670a3du, 0xbd5b851fu, 0xbd500000u, 0xbd447ae1u, 0xbd38f5c3u, \
   0xbd2d70a3u, 0xbd21eb85u, 0xbd166667u, 0xbd0ae148u, 0xbcfeb852u, 0xbce7ae15u, 0xbcd0a3d7u, \
   0xbcb9999au, 0xbca28f5du, 0xbc8b851fu, 0xbc68f5c3u, 0xbc3ae148u, 0xbc1f3b64u, 0xbc160418u, \
   0xbc0ccccdu, 0xbc039581u, 0xbbf4bc6au, 0xbbe24dd3u, 0xbbcfdf3bu, 0xbbbd70a4u, 0xbbab020du, \
   0xbb989374u, 0xbb8624ddu, 0xbb676c8au, 0xbb428f5cu, 0xbb1db22du, 0xbaf1a9fcu, 0xbaa7ef9du, \
   0xba7765ffu, 0xba59e83eu, 0xba3c6a80u, 0xba1eecc1u, 0xba016f01u, 0xb9c7e283u, 0xb98ce705u, \
   0xb923d70bu, 0xb8ba1f4bu, 0xb88aefb3u, 0xb8378034u, 0xb7b24206u, 0xb70205ffu, 0xb65a1a94u, \
   0xb513a3b7u, 0x00000000u, 0x3513a3b7u, 0x365a1a94u, 0x370205ffu, 0x37b24206u, 0x38378034u, \
   0x388aefb3u, 0x38ba1f4bu, 0x3923d70bu, 0x398ce705u, 0x39c7e283u, 0x3a016f01u, 0x3a1eecc1u, \
   0x3a3c6a80u, 0x3a59e83eu, 0x3a7765ffu, 0x3aa7ef9du, 0x3af1a9fcu, 0x3b1db22du, 0x3b428f5cu, \
   0x3b676c8au, 0x3b8624ddu, 0x3b989374u, 0x3bab020du, 0x3bbd70a4u, 0x3bcfdf3bu, 0x3be24dd3u, \
   0x3bf4bc6au, 0x3c039581u, 0x3c0ccccdu, 0x3c160418u, 0x3c1f3b64u, 0x3c3ae148u, 0x3c68f5c3u, \
   0x3c8b851fu, 0x3ca28f5du, 0x3cb9999au, 0x3cd0a3d7u, 0x3ce7ae15u, 0x3cfeb852u, 0x3d0ae148u, \
   0x3d166667u, 0x3d21eb85u, 0x3d2d70a3u, 0x3d38f5c3u, 0x3d447ae1u, 0x3d500000u, 0x3d5b851fu, \
   0x3d670a3du, 0x3d728f5du, 0x3d7e147bu, 0x3d84cccdu, 0x3d8a8f5du, 0x3d9051ebu, 0x3d96147bu, \
   0x3d9bd70au, 0x3da1999au, 0x3da75c2au, 0x3dad1eb8u, 0x3db2e148u, 0x3db8a3d7u, 0x3dbe6667u, \
   0x3dc428f7u, 0x3dc9eb85u, 0x3ddb3334u, 0x3df80000u, 0x3e0a6666u, 0x3e18cccdu, 0x3e273333u, \
   0x3e35999au, 0x3e440000u, 0x3e526666u, 0x3e60cccdu, 0x3e6f3333u, 0x3e7d9999u, 0x3e860000u, \
   0x3e8d3334u, 0x3e946666u, 0x3e9b999au, 0x3ea2ccccu, 0x3eaa0000u, 0x3eb13333u, 0x3eb86666u, \
   0x3ebf999au, 0x3ec6ccccu, 0x3ece0000u, 0x3ed53333u, 0x3edc6666u, 0x3ee3999au, 0x3eeaccccu, \
   0x3ef20000u, 0x3ef93332u, 0x3f003333u, 0x3f03ccccu, 0x3f076666u, 0x3f0b0000u, 0x3f0e999au, \
   0x3f123334u, 0x3f15cccdu, 0x3f196666u, 0x3f1d0000u, 0x3f20999au, 0x3f243334u, 0x3f27cccdu, \
   0x3f2b6666u, 0x3f2f0000u, 0x3f32999au, 0x3f363334u, 0x3f39cccdu, 0x3f3d6666u, 0x3f410000u, \
   0x3f44999au, 0x3f483333u, 0x3f4bcccdu, 0x3f4f6666u, 0x3f530000u, 0x3f56999au, 0x3f5a3333u, \
   0x3f5dcccdu, 0x3f616666u, 0x3f650000u, 0x3f68999au, 0x3f6c3333u, 0x3f6fcccdu, 0x3f736666u, \
   0x3f770000u, 0x3f7a999au, 0x3f7e3333u, 0x3f800000u}

// One of the buckets that nf4_code_by_bucket picks from: the NF4 midpoint inside it (+Inf where
// there is none) and how many midpoints lie in lower buckets.
struct alignas(8) Nf4Bucket {  // one 8-byte load
  float mid;
  int32_t below;
};
constexpr int kNf4Buckets = 64;  // 33 in use; the index is masked to 6 bits, the rest pad it

// Code tables as float32 plus their midpoints (a[i] + a[i+1]) / 2, computed in float32 (the last
// midpoint slot is padding that code selection never reads), and the NF4 buckets.
struct CodeTables {
  float nf4[16];
  float nf4_mid[16];
  float map[256];
  float map_mid[256];
  Nf4Bucket nf4_bucket[kNf4Buckets];
};

// Raw view of the four storage tensors of one NF4 weight.
struct Nf4View {
  const uint8_t* packed;        // [numel / 2] two codes per byte
  const uint8_t* absmax_codes;  // [numel / 64] 8-bit code of each block's absmax
  const float* absmax_scales;   // [ceil(numel / 64 / 256)] one float32 scale per 256 blocks
  const float* absmax_offset;   // [1] mean of the absmax values, added back after decoding
};

inline namespace QLORA_ISA_NAMESPACE {

QLORA_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

QLORA_HD uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// nf4_code in one table read and one compare, where nf4_code makes four dependent reads and
// compares (the CUDA quantize kernel uses this; a table read there is a shared-memory access, on
// its critical path). 16 * scaled + 16 rounded to a whole number picks one of 33 buckets of width
// 1/16 over [-1, 1]: adding 1.5 * 2^23, where floats are whole numbers, rounds it, and the low
// bits of the sum are the number (16 * scaled is exact, so a fused multiply-add gives the same
// sum). The bucket grows monotonically with scaled and no two midpoints share one (they lie 0.085
// apart or more), so the midpoints in lower buckets are all below scaled, those in higher ones
// above, and only the one in its own bucket needs comparing: exactly nf4_code
// (cpp_tests/test_codec_cores.cpp checks every float in [-1, 1]). A NaN gives some bucket of the
// 64, never an index outside the table.
QLORA_HD int nf4_bucket(float scaled) {
  return static_cast<int>(bits_from_float(scaled * 16.0f + 12582928.0f) & (kNf4Buckets - 1));
}

QLORA_HD int nf4_code_by_bucket(float scaled, const Nf4Bucket* buckets) {
  const Nf4Bucket b = buckets[nf4_bucket(scaled)];
  return b.below + (scaled > b.mid ? 1 : 0);
}

// Bucket j of nf4_code_by_bucket, from the 15 midpoints: nf4_mid(i) is midpoint i. One midpoint
// at a time (not unrolled), so that a CUDA thread filling a bucket holds few registers.
template <typename Midpoint>
QLORA_HD Nf4Bucket make_nf4_bucket(int j, Midpoint nf4_mid) {
  Nf4Bucket b{float_from_bits(kNonFiniteBits), 0};
#if defined(__CUDACC__)
#pragma unroll 1
#endif
  for (int i = 0; i < 15; ++i) {
    const float mid = nf4_mid(i);
    const int at = nf4_bucket(mid);
    if (at < j) ++b.below;
    if (at == j) b.mid = mid;
  }
  return b;
}

// The midpoint accessor of make_nf4_bucket over an array.
struct MidpointsIn {
  const float* mid;
  QLORA_HD float operator()(int i) const { return mid[i]; }
};

inline CodeTables make_code_tables() {
  constexpr uint32_t nf4_bits[16] = QLORA_NF4_BITS;
  constexpr uint32_t map_bits[256] = QLORA_ABSMAX_MAP_BITS;
  CodeTables t{};
  for (int i = 0; i < 16; ++i) t.nf4[i] = float_from_bits(nf4_bits[i]);
  for (int i = 0; i < 256; ++i) t.map[i] = float_from_bits(map_bits[i]);
  for (int i = 0; i < 15; ++i) t.nf4_mid[i] = (t.nf4[i] + t.nf4[i + 1]) / 2.0f;
  for (int i = 0; i < 255; ++i) t.map_mid[i] = (t.map[i] + t.map[i + 1]) / 2.0f;
  t.nf4_mid[15] = t.nf4[15];
  t.map_mid[255] = t.map[255];
  for (int j = 0; j < kNf4Buckets; ++j) {
    t.nf4_bucket[j] = make_nf4_bucket(j, MidpointsIn{t.nf4_mid});
  }
  return t;
}

// Host copy of the tables, built once.
inline const CodeTables& code_tables() {
  static const CodeTables tables = make_code_tables();
  return tables;
}

// 1 / max(absmax, 1e-38): an all-zero block scales to zeros and gets the zero code. The floor's
// inverse is a constant: 1e-38 is subnormal, and with flush-to-zero on (torch.set_flush_denormal)
// a division by it at run time would give inf, and 0 * inf NaN.
constexpr float kInverseMinAbsmax = 1.0f / kMinAbsmax;
QLORA_HD float inverse_absmax(float absmax) {
  return absmax > kMinAbsmax ? 1.0f / absmax : kInverseMinAbsmax;
}

QLORA_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Number of the 15 NF4 midpoints strictly below `scaled` (a binary search): the NF4 code.
// Ties go to the lower code.
QLORA_HD int nf4_code(float scaled, const float* nf4_mid) {
  int c = 0;
  c += scaled > nf4_mid[c + 7] ? 8 : 0;
  c += scaled > nf4_mid[c + 3] ? 4 : 0;
  c += scaled > nf4_mid[c + 1] ? 2 : 0;
  c += scaled > nf4_mid[c] ? 1 : 0;
  return c;
}

// Number of the 255 map midpoints strictly below `scaled`: the 8-bit absmax code.
QLORA_HD int absmax_code(float scaled, const float* map_mid) {
  int c = 0;
  for (int step = 128; step > 0; step >>= 1) c += scaled > map_mid[c + step - 1] ? step : 0;
  return c;
}

// Two codes per byte, the element with the lower index in the HIGH nibble.
QLORA_HD uint8_t pack_codes(int even_code, int odd_code) {
  return static_cast<uint8_t>((even_code << 4) | odd_code);
}
QLORA_HD int even_code(uint8_t byte) { return byte >> 4; }
QLORA_HD int odd_code(uint8_t byte) { return byte & 15; }

// absmax = map[code] * scale + offset, rounded after the multiply and after the add (never an
// FMA): this is what makes dequantizing a bitsandbytes state bit-identical to bitsandbytes.
QLORA_HD float decode_absmax(float map_value, float scale, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(map_value, scale), offset);
#else
  volatile float product = map_value * scale;  // volatile: keep the rounding step
  return product + offset;
#endif
}

// The float32 absmax of NF4 block `b` (tables on the host, or in shared memory on the device).
QLORA_HD float block_absmax(const Nf4View& w, int64_t b, const CodeTables& t) {
  return decode_absmax(t.map[w.absmax_codes[b]], w.absmax_scales[b / kScalerBlockSize],
                       *w.absmax_offset);
}

}  // namespace QLORA_ISA_NAMESPACE
}  // namespace qlora
