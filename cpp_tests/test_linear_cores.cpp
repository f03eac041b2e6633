// The small-M linear cores without torch: gemv_rows (forward) and gemv_cols (backward) against
// a float64 product of x with the decoded weight, and unaligned range decode.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"

using namespace qlora;
using namespace qlora::cpu;

namespace {

// A random NF4 weight [N, K] built with the kernels themselves (portable table).
struct Weight {
  int64_t N, K;
  std::vector<uint8_t> packed, codes;
  std::vector<float> scales;
  float offset;
  std::vector<float> dense;  // decoded
  Nf4View view() const { return {packed.data(), codes.data(), scales.data(), &offset}; }

  Weight(int64_t n, int64_t k, unsigned seed) : N(n), K(k) {
    const int64_t nblocks = N * K / kBlockSize;
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, 0.05f);
    std::vector<float> w(N * K), absmax(nblocks);
    for (float& v : w) v = dist(rng);
    packed.resize(N * K / 2);
    portable_kernels().quantize_blocks(w.data(), DType::kFloat32, 0, nblocks, packed.data(), absmax.data());
    codes.resize(nblocks);
    scales.resize((nblocks + kScalerBlockSize - 1) / kScalerBlockSize);
    test::double_quantize(absmax.data(), nblocks, &offset, codes.data(), scales.data());
    dense.resize(N * K);
    decode_range_f32(view(), 0, N * K, dense.data());
  }
};

std::vector<float> random_matrix(int64_t rows, int64_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> m(rows * cols);
  for (float& v : m) v = dist(rng);
  return m;
}

void gemv_rows_matches_float64(const CpuKernels& k) {
  // K = 2112 is read in several column chunks at 8 and 16 rows: partial sums accumulate in y;
  // 12, 13 and 16 rows run in two passes of the rows (6 + 6, 7 + 6, 8 + 8)
  const Weight weights[] = {Weight(37, 320, 1), Weight(19, 2112, 2)};
  for (const Weight& w : weights) {
    for (const int64_t M : {1, 3, 8, 12, 13, 16}) {
      const std::vector<float> x = random_matrix(M, w.K, 100 + M);
      std::vector<float> xs(x.size());
      for (int64_t m = 0; m < M; ++m) split_pairs(x.data() + m * w.K, w.K, xs.data() + m * w.K);
      std::vector<float> y(M * w.N, NAN);
      k.gemv_rows(w.view(), w.K, 2, w.N, xs.data(), M, w.K, y.data(), w.N);  // rows from 2 on
      for (int64_t m = 0; m < M; ++m) {
        CHECK(std::isnan(y[m * w.N]) && std::isnan(y[m * w.N + 1]));  // outside the range: untouched
        for (int64_t n = 2; n < w.N; ++n) {
          double exact = 0.0, scale = 0.0;
          for (int64_t i = 0; i < w.K; ++i) {
            exact += static_cast<double>(x[m * w.K + i]) * w.dense[n * w.K + i];
            scale += std::fabs(static_cast<double>(x[m * w.K + i]) * w.dense[n * w.K + i]);
          }
          CHECK(std::fabs(y[m * w.N + n] - exact) <= 1e-6 * scale + 1e-30);
        }
      }
    }
  }
}

// x = a column of the identity: y[n] = W[n, k] bit for bit (one product, every other term an
// exact zero), so the block absmax the forward decodes equals the codec's (an FMA in its decode
// would differ). K = 2112: 33 blocks a row, rows that cross groups of 256 blocks.
void gemv_rows_of_a_unit_vector_give_w_exactly(const CpuKernels& k) {
  const Weight weights[] = {Weight(19, 2112, 4), Weight(300, 128, 5)};
  for (const Weight& w : weights) {
    for (const int64_t col : {int64_t{0}, int64_t{1}, int64_t{63}, int64_t{64}, w.K - 1}) {
      for (const int64_t M : {1, 3}) {
        std::vector<float> x(M * w.K, 0.0f), xs(M * w.K);
        for (int64_t m = 0; m < M; ++m) x[m * w.K + col] = 1.0f;
        for (int64_t m = 0; m < M; ++m) split_pairs(x.data() + m * w.K, w.K, xs.data() + m * w.K);
        std::vector<float> y(M * w.N, NAN);
        k.gemv_rows(w.view(), w.K, 0, w.N, xs.data(), M, w.K, y.data(), w.N);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t n = 0; n < w.N; ++n) CHECK_EQ(y[m * w.N + n], w.dense[n * w.K + col]);
        }
      }
    }
  }
}

// M above a pass's rows (2 on AVX2, 4 on AVX-512) reads W from a decoded slice; 200 rows of W
// take two row groups, the second adding into what the first stored.
void gemv_cols_matches_float64(const CpuKernels& k) {
  for (const int64_t N : {45, 200}) {
    const Weight w(N, 256, 2);
    for (const int64_t M : {1, 3, 5, 16, 37}) {
      const std::vector<float> gy = random_matrix(M, w.N, 200 + M);
      std::vector<float> gx(M * w.K, NAN);
      k.gemv_cols(w.view(), w.N, w.K, 64, 192, gy.data(), M, w.N, gx.data(), w.K);
      for (int64_t m = 0; m < M; ++m) {
        CHECK(std::isnan(gx[m * w.K + 63]) && std::isnan(gx[m * w.K + 192]));
        for (int64_t i = 64; i < 192; ++i) {
          double exact = 0.0, scale = 0.0;
          for (int64_t n = 0; n < w.N; ++n) {
            exact += static_cast<double>(gy[m * w.N + n]) * w.dense[n * w.K + i];
            scale += std::fabs(static_cast<double>(gy[m * w.N + n]) * w.dense[n * w.K + i]);
          }
          CHECK(std::fabs(gx[m * w.K + i] - exact) <= 1e-6 * scale + 1e-30);
        }
      }
    }
  }
}

void unaligned_range_decode(const CpuKernels& k) {
  const Weight w(6, 128, 3);
  std::vector<float> blocks(w.N * w.K);
  k.dequantize_blocks(w.view(), 0, w.N * w.K / kBlockSize, blocks.data(), DType::kFloat32);
  for (const int64_t start : {0, 1, 63, 64, 101}) {
    std::vector<float> part(77);
    decode_range_f32(w.view(), start, 77, part.data());
    for (int64_t i = 0; i < 77; ++i) CHECK_EQ(part[i], blocks[start + i]);
  }
}

}  // namespace

int main() {
  return test::run_cases({
      {"gemv_rows (forward, small M) vs float64", gemv_rows_matches_float64},
      {"gemv_rows of a unit vector gives W exactly", gemv_rows_of_a_unit_vector_give_w_exactly},
      {"gemv_cols (backward, small M) vs float64", gemv_cols_matches_float64},
      {"unaligned range decode equals block decode", unaligned_range_decode},
  });
}
