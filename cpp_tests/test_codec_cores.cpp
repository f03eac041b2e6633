// The codec cores without torch: NF4 and 8-bit code selection at and around every midpoint,
// packing order, zero blocks, NaN/Inf detection, the partial last scale group, the fixed-order
// absmax mean, dtype rounding, and agreement of every kernel table with the portable one.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

using namespace qlora;
using namespace qlora::cpu;

namespace {

std::vector<int> quantize_one_block(const CpuKernels& k, const std::vector<float>& block, float* absmax) {
  std::vector<uint8_t> packed(kBlockSize / 2);
  k.quantize_blocks(block.data(), DType::kFloat32, 0, 1, packed.data(), absmax);
  std::vector<int> codes;
  for (uint8_t b : packed) codes.insert(codes.end(), {even_code(b), odd_code(b)});
  return codes;
}

void nf4_codes_at_midpoints(const CpuKernels& k) {
  const CodeTables& t = code_tables();
  for (int i = 0; i < 15; ++i) {
    const float mid = t.nf4_mid[i];
    std::vector<float> block(kBlockSize, 0.0f);
    block[0] = 1.0f;  // absmax 1: the scaled values are the values themselves
    block[1] = mid;
    block[2] = std::nextafter(mid, 2.0f);
    block[3] = std::nextafter(mid, -2.0f);
    for (int c = 0; c < 16; ++c) block[8 + c] = t.nf4[c];
    float absmax = -1.0f;
    const std::vector<int> codes = quantize_one_block(k, block, &absmax);
    CHECK_EQ(absmax, 1.0f);
    CHECK_EQ(codes[1], i);      // a tie goes to the lower code
    CHECK_EQ(codes[2], i + 1);  // just above the midpoint
    CHECK_EQ(codes[3], i);      // just below
    for (int c = 0; c < 16; ++c) CHECK_EQ(codes[8 + c], c);
    CHECK_EQ(nf4_code(mid, t.nf4_mid), i);
    CHECK_EQ(nf4_code(std::nextafter(mid, 2.0f), t.nf4_mid), i + 1);
  }
}

// nf4_code_by_bucket (the CUDA quantize kernel's code selection) gives nf4_code's code for every
// float in [-1, 1], the range clamp_unit leaves; 2 x 1.07e9 values, a few seconds. Run once, not
// per kernel table: it uses no table.
void nf4_code_by_bucket_on_every_float() {
  const CodeTables& t = code_tables();
  int64_t mismatches = 0;
  uint32_t first_bad = 0;
  for (const uint32_t sign : {0u, 0x80000000u}) {
    for (uint32_t magnitude = 0; magnitude <= 0x3f800000u; ++magnitude) {  // +-0 ... +-1
      const float x = float_from_bits(sign | magnitude);
      if (nf4_code_by_bucket(x, t.nf4_bucket) != nf4_code(x, t.nf4_mid)) {
        if (mismatches++ == 0) first_bad = sign | magnitude;
      }
    }
  }
  if (mismatches != 0) std::printf("first mismatch at bits 0x%08x\n", first_bad);
  CHECK_EQ(mismatches, int64_t{0});
  // Outside [-1, 1] (clamped away in the kernels) and NaN: an index inside the table.
  for (const uint32_t bits :
       {0x7fc00000u, 0xffffffffu, 0x7f800000u, 0xff800000u, 0x3f800001u, 0x4b000000u}) {
    const int b = nf4_bucket(float_from_bits(bits));
    CHECK(b >= 0 && b < kNf4Buckets);
  }
  std::printf("%-6s %-8s %s\n", test::failures() == 0 ? "ok" : "FAIL", "-",
              "NF4 code by bucket = binary search, on every float in [-1, 1]");
}

void absmax_codes_at_midpoints(const CpuKernels&) {
  const CodeTables& t = code_tables();
  for (int i = 0; i < 255; ++i) {
    const float mid = t.map_mid[i];
    const float values[4] = {1.0f, mid, std::nextafter(mid, 2.0f), std::nextafter(mid, -2.0f)};
    uint8_t codes[4];
    const float scale = quantize_absmax_group(values, 4, 0.0f, codes);
    CHECK_EQ(scale, 1.0f);
    CHECK_EQ(codes[0], 255);
    CHECK_EQ(codes[1], i);
    CHECK_EQ(codes[2], i + 1);
    CHECK_EQ(codes[3], i);
  }
}

void packing_order(const CpuKernels& k) {
  const CodeTables& t = code_tables();
  std::vector<float> block(kBlockSize);
  for (int j = 0; j < kBlockSize; ++j) block[j] = t.nf4[(j * 7) % 16];  // includes -1 and 1
  std::vector<uint8_t> packed(kBlockSize / 2);
  float absmax;
  k.quantize_blocks(block.data(), DType::kFloat32, 0, 1, packed.data(), &absmax);
  for (int j = 0; j < kBlockSize / 2; ++j) {
    const int hi = (2 * j * 7) % 16, lo = ((2 * j + 1) * 7) % 16;
    CHECK_EQ(packed[j], static_cast<uint8_t>(hi << 4 | lo));  // lower index in the high nibble
  }
}

void zero_block(const CpuKernels& k) {
  std::vector<float> block(kBlockSize, 0.0f);
  std::vector<uint8_t> packed(kBlockSize / 2);
  float absmax = -1.0f;
  const uint32_t bits = k.quantize_blocks(block.data(), DType::kFloat32, 0, 1, packed.data(), &absmax);
  CHECK_EQ(bits, 0u);
  CHECK_EQ(absmax, 0.0f);
  for (uint8_t b : packed) CHECK_EQ(b, 0x77);  // code 7 is exactly 0.0
  const uint8_t code = 127;                    // map[127] == 0.0
  const float scale = 0.5f, offset = 0.0f;
  const Nf4View view{packed.data(), &code, &scale, &offset};
  std::vector<float> out(kBlockSize, 1.0f);
  k.dequantize_blocks(view, 0, 1, out.data(), DType::kFloat32);
  for (float v : out) CHECK(v == 0.0f && !std::signbit(v));
  std::vector<uint16_t> half(kBlockSize, 0xffff);
  k.dequantize_blocks(view, 0, 1, half.data(), DType::kBFloat16);
  for (uint16_t h : half) CHECK_EQ(h, 0);
}

void non_finite_is_reported(const CpuKernels& k) {
  for (const float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> w(3 * kBlockSize, 0.25f);
    w[kBlockSize + 5] = bad;
    std::vector<uint8_t> packed(3 * kBlockSize / 2);
    std::vector<float> absmax(3);
    CHECK(k.quantize_blocks(w.data(), DType::kFloat32, 0, 3, packed.data(), absmax.data()) >= kNonFiniteBits);
  }
  std::vector<float> w(kBlockSize, -3.0e38f);
  std::vector<uint8_t> packed(kBlockSize / 2);
  float absmax;
  CHECK(k.quantize_blocks(w.data(), DType::kFloat32, 0, 1, packed.data(), &absmax) < kNonFiniteBits);
  CHECK_EQ(absmax, 3.0e38f);
}

void partial_last_scale_group(const CpuKernels&) {
  const int64_t nblocks = 300;  // one group of 256 and one of 44
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(0.01f, 0.1f);
  std::vector<float> absmax(nblocks);
  for (float& a : absmax) a = dist(rng);
  absmax[3] = 5.0f;  // the first group's extreme must not leak into the second group's scale
  double exact = 0.0;
  for (float a : absmax) exact += a;
  const float offset = absmax_mean(absmax.data(), nblocks);
  CHECK(std::fabs(offset - exact / nblocks) <= 1e-7 * exact / nblocks);
  std::vector<uint8_t> codes(44);
  const float scale = quantize_absmax_group(absmax.data() + 256, 44, offset, codes.data());
  float expect = 0.0f;
  for (int i = 256; i < nblocks; ++i) expect = std::fmax(expect, std::fabs(absmax[i] - offset));
  CHECK_EQ(scale, expect);
  const CodeTables& t = code_tables();
  for (int i = 0; i < 44; ++i) {  // nearest code: within half a map step of the true value
    const float decoded = decode_absmax(t.map[codes[i]], scale, offset);
    CHECK(std::fabs(decoded - absmax[256 + i]) <= 0.01f * scale + 1e-7f);
  }
}

void absmax_mean_follows_the_tree(const CpuKernels&) {
  // The tree: lane sums (lane l takes l, l + 32, ...) then the XOR butterfly.
  std::vector<float> absmax(256 * 40 + 17);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(0.0f, 1.0f);
  for (float& a : absmax) a = dist(rng);
  const int64_t n = static_cast<int64_t>(absmax.size());
  std::vector<double> sums;
  for (int64_t first = 0; first < n; first += kScalerBlockSize) {
    double lanes[kReduceLanes] = {};
    for (int64_t i = first; i < std::min<int64_t>(n, first + kScalerBlockSize); ++i)
      lanes[(i - first) % kReduceLanes] += absmax[i];
    sums.push_back(butterfly_sum(lanes));
  }
  double lanes[kReduceLanes] = {};
  for (size_t g = 0; g < sums.size(); ++g) lanes[g % kReduceLanes] += sums[g];
  CHECK_EQ(absmax_mean(absmax.data(), n), static_cast<float>(butterfly_sum(lanes) / n));
  double v[kReduceLanes];
  for (int i = 0; i < kReduceLanes; ++i) v[i] = i + 1;
  CHECK_EQ(butterfly_sum(v), 528.0);
}

void dtype_rounding(const CpuKernels&) {
  for (uint32_t h = 0; h < 65536; ++h) {  // every fp16 survives the round trip
    const float f = fp16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(f)) CHECK_EQ(float_to_fp16(f), h);
  }
#if defined(__FLT16_MAX__)
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {  // against the compiler's own conversion
    const float f = std::ldexp(std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng), (i % 44) - 28);
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    CHECK_EQ(float_to_fp16(f), bits);
  }
#endif
  std::mt19937 rng2(5);
  for (int i = 0; i < 200000; ++i) {  // bf16: nearest, ties to even
    const float f = float_from_bits(rng2() & 0xbfffffffu);
    const uint16_t r = float_to_bf16(f);
    const double err = std::fabs(static_cast<double>(bf16_to_float(r)) - f);
    for (int d : {-1, 1}) {
      const float neighbour = bf16_to_float(static_cast<uint16_t>(r + d));
      if (std::isnan(neighbour)) continue;  // stepping off the ends of the number line
      const double other = std::fabs(static_cast<double>(neighbour) - f);
      CHECK(err < other || (err == other && r % 2 == 0));
    }
  }
  CHECK_EQ(float_to_bf16(NAN) & 0x7fc0, 0x7fc0);
}

void tables_agree_with_portable(const CpuKernels& k) {
  const CpuKernels& p = portable_kernels();
  const int64_t nblocks = 333;
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> w(nblocks * kBlockSize);
  for (float& v : w) v = dist(rng);
  std::vector<uint16_t> w16(w.size());
  for (const DType d : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const void* src = w.data();
    if (d != DType::kFloat32) {
      for (size_t i = 0; i < w.size(); ++i) w16[i] = d == DType::kBFloat16 ? float_to_bf16(w[i]) : float_to_fp16(w[i]);
      src = w16.data();
    }
    std::vector<uint8_t> pa(nblocks * 32), pb(nblocks * 32);
    std::vector<float> aa(nblocks), ab(nblocks);
    k.quantize_blocks(src, d, 0, nblocks, pa.data(), aa.data());
    p.quantize_blocks(src, d, 0, nblocks, pb.data(), ab.data());
    CHECK(pa == pb);
    CHECK(aa == ab);
    const float offset = absmax_mean(aa.data(), nblocks);
    std::vector<uint8_t> codes(nblocks);
    std::vector<float> scales(2);
    scales[0] = quantize_absmax_group(aa.data(), 256, offset, codes.data());
    scales[1] = quantize_absmax_group(aa.data() + 256, nblocks - 256, offset, codes.data() + 256);
    const Nf4View view{pa.data(), codes.data(), scales.data(), &offset};
    std::vector<uint32_t> oa(nblocks * kBlockSize), ob(nblocks * kBlockSize);  // room for float32
    k.dequantize_blocks(view, 5, nblocks, oa.data(), d);
    p.dequantize_blocks(view, 5, nblocks, ob.data(), d);
    CHECK(oa == ob);
  }
}

}  // namespace

int main() {
  nf4_code_by_bucket_on_every_float();
  return test::run_cases({
      {"nf4 codes at and around every midpoint", nf4_codes_at_midpoints},
      {"8-bit absmax codes at and around every midpoint", absmax_codes_at_midpoints},
      {"packing order: lower index in the high nibble", packing_order},
      {"zero block: code 7, exact zeros back", zero_block},
      {"NaN and Inf are reported", non_finite_is_reported},
      {"partial last scale group", partial_last_scale_group},
      {"absmax mean follows the fixed tree", absmax_mean_follows_the_tree},
      {"bf16/fp16 rounding", dtype_rounding},
      {"quantize/dequantize identical to the portable table", tables_agree_with_portable},
  });
}
