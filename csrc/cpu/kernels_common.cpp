// Scalar pieces every CPU kernel table shares: dtype conversions, the fixed-order absmax mean,
// double quantization of the absmax values, unaligned decode, and run-time kernel selection.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace qlora::cpu {

float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

uint16_t float_to_bf16(float f) {
  uint32_t bits = bits_from_float(f);
  if ((bits & 0x7fffffffu) > kNonFiniteBits) return 0x7fc0;  // quiet NaN, as torch
  bits += 0x7fffu + ((bits >> 16) & 1u);                    // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return float_from_bits(sign | bits_from_float(magnitude));
  }
  if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_fp16(float f) {
  const uint32_t bits = bits_from_float(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > kNonFiniteBits) return sign | 0x7e00u;  // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;    // >= 65520 rounds to Inf
  if (magnitude < 0x38800000u) {                          // below 2^-14: fp16 subnormal
    // Scale to units of 2^-24 (exact), then round to an integer, ties to even, by the 2^23 trick.
    const float units = float_from_bits(magnitude) * 0x1p24f;
    const float rounded = (units + 0x1p23f) - 0x1p23f;
    return sign | static_cast<uint16_t>(rounded);
  }
  magnitude += 0xfffu + ((magnitude >> 13) & 1u);  // round away the 13 low bits, ties to even
  return sign | static_cast<uint16_t>((magnitude - (112u << 23)) >> 13);
}

double butterfly_sum(const double* lanes) {
  double v[kReduceLanes];
  std::memcpy(v, lanes, sizeof v);
  for (int offset = kReduceLanes / 2; offset > 0; offset >>= 1) {
    double next[kReduceLanes];
    for (int i = 0; i < kReduceLanes; ++i) next[i] = v[i] + v[i ^ offset];
    std::memcpy(v, next, sizeof v);
  }
  return v[0];
}

namespace {

// Lane l sums values[l], values[l + 32], ... in order (float64), then the lanes are butterflied.
template <typename T>
double lane_tree_sum(const T* values, int64_t count) {
  double lanes[kReduceLanes] = {};
  for (int64_t i = 0; i < count; ++i) lanes[i % kReduceLanes] += static_cast<double>(values[i]);
  return butterfly_sum(lanes);
}

}  // namespace

double absmax_group_sum(const float* absmax, int64_t count) { return lane_tree_sum(absmax, count); }

float absmax_mean_from_group_sums(const double* group_sums, int64_t groups, int64_t nblocks) {
  return static_cast<float>(lane_tree_sum(group_sums, groups) / static_cast<double>(nblocks));
}

float absmax_mean(const float* absmax, int64_t nblocks) {
  const int64_t groups = (nblocks + kScalerBlockSize - 1) / kScalerBlockSize;
  std::vector<double> sums(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * kScalerBlockSize;
    sums[g] = absmax_group_sum(absmax + first, std::min(kScalerBlockSize, nblocks - first));
  }
  return absmax_mean_from_group_sums(sums.data(), groups, nblocks);
}

float quantize_absmax_group(const float* absmax, int64_t count, float offset, uint8_t* codes) {
  const CodeTables& t = code_tables();
  float scale = 0.0f;
  for (int64_t i = 0; i < count; ++i) scale = std::fmax(scale, std::fabs(absmax[i] - offset));
  const float inv = inverse_absmax(scale);
  for (int64_t i = 0; i < count; ++i) {
    const float centered = absmax[i] - offset;
    codes[i] = static_cast<uint8_t>(absmax_code(clamp_unit(centered * inv), t.map_mid));
  }
  return scale;
}

void split_pairs(const float* in, int64_t count, float* out) {
  for (int64_t c = 0; c < count; c += 32) {
    for (int64_t j = 0; j < 16; ++j) {
      out[c + j] = in[c + 2 * j];
      out[c + 16 + j] = in[c + 2 * j + 1];
    }
  }
}

void decode_range_f32(const Nf4View& w, int64_t start, int64_t count, float* out) {
  const CodeTables& t = code_tables();
  int64_t block = -1;
  float absmax = 0.0f;
  for (int64_t i = start; i < start + count; ++i) {
    if (i / kBlockSize != block) {
      block = i / kBlockSize;
      absmax = block_absmax(w, block, t);
    }
    const uint8_t byte = w.packed[i / 2];
    const int code = (i % 2 == 0) ? even_code(byte) : odd_code(byte);
    out[i - start] = t.nf4[code] * absmax;
  }
}

#if !defined(QLORA_HAVE_AVX512)
const CpuKernels* avx512_kernels() { return nullptr; }
#endif
#if !defined(QLORA_HAVE_AVX2)
const CpuKernels* avx2_kernels() { return nullptr; }
#endif

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

namespace {

const CpuKernels* kernels_by_name(const char* name) {
  const bool want_auto = name == nullptr || std::strcmp(name, "auto") == 0;
  if (want_auto || std::strcmp(name, "avx512") == 0) {
    if (avx512_kernels() != nullptr && cpu_has_avx512()) return avx512_kernels();
    if (!want_auto) return nullptr;
  }
  if (want_auto || std::strcmp(name, "avx2") == 0) {
    if (cpu_has_avx2() && avx2_kernels() != nullptr) return avx2_kernels();  // CPU check first
    if (!want_auto) return nullptr;
  }
  if (want_auto || std::strcmp(name, "portable") == 0) return &portable_kernels();
  return nullptr;
}

const CpuKernels* default_kernels() {
  const char* env = std::getenv("QLORA_CPU_ISA");
  const CpuKernels* chosen = kernels_by_name(env);
  return chosen != nullptr ? chosen : kernels_by_name("auto");
}

std::atomic<const CpuKernels*> g_active{nullptr};

}  // namespace

const CpuKernels& active_cpu_kernels() {
  const CpuKernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = default_kernels();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

bool select_cpu_kernels(const char* name) {
  const CpuKernels* k = kernels_by_name(name);
  if (k == nullptr) return false;
  g_active.store(k, std::memory_order_release);
  return true;
}

}  // namespace qlora::cpu
