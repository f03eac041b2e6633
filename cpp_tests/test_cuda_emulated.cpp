// The CUDA kernels and their launchers (csrc/cuda/*_kernels.cuh), run on the CPU by
// cuda_emulator.h, against the CPU kernel cores and float64 references: NF4 bytes and dequantized
// values bit for bit, the small-M linear forward (CUDA cores and tensor cores) and backward within
// float32 rounding. Every buffer lies between guard pages, flush against the one after it and, in a
// second pass over the cases, the one before it, so that a read or write past either end stops the
// test with the kernel, block and thread that made it. Built with UBSan (CMakeLists.txt), the test
// also stops at a misaligned vector access, which faults on a GPU and passes on a CPU. Every launch
// runs twice, its threads and blocks in reverse order and in order, and must leave the same bytes
// both times: a race shows as a difference (cuda_emulator.h). What a GPU adds (timing, the
// hardware's memory model and its rounding inside mma) is bench/gpu_check.sh's job.
//
//   test_cuda_emulated               the fixed cases (ctest)
//   test_cuda_emulated --random S    60 random shapes from seed S (about 25 s on 2 cores)
#include "cuda_emulator.h"  // first: it defines what the kernel headers expect from nvcc

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "../csrc/cuda/codec_kernels.cuh"
#include "../csrc/cuda/linear_kernels.cuh"
#include "check.h"

using namespace qlora;

namespace {

int64_t round_up_to(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Which inaccessible page the buffers made from now on lie flush against: the one after their
// end (an overrun faults) or the one before their start (an underrun faults). The fixed cases run
// once each way.
enum class GuardSide { kAfter, kBefore };
GuardSide& guard_side() {
  static GuardSide side = GuardSide::kAfter;
  return side;
}

// `n` elements of T in host memory between two inaccessible pages, flush against the one
// guard_side() says. The start is aligned as the kernels' vector accesses need (16 bytes, 32 for
// float), and the size is rounded up to that alignment only. Filled with 0xff bytes (NaN in every
// float type), so that an element no kernel wrote shows.
template <typename T>
class GuardedBuffer {
 public:
  explicit GuardedBuffer(int64_t n) : n_(n) {
    const int64_t align = std::max<int64_t>(16, 8 * sizeof(T));
    bytes_ = round_up_to(std::max<int64_t>(n, 1) * sizeof(T), align);
    const int64_t page = sysconf(_SC_PAGESIZE);
    map_bytes_ = page + round_up_to(bytes_, page) + page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<char*>(p);
    if (mprotect(base_, page, PROT_NONE) != 0) std::abort();
    if (mprotect(base_ + map_bytes_ - page, page, PROT_NONE) != 0) std::abort();
    data_ = reinterpret_cast<T*>(guard_side() == GuardSide::kAfter
                                     ? base_ + map_bytes_ - page - bytes_
                                     : base_ + page);
    poison();
  }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  ~GuardedBuffer() { munmap(base_, map_bytes_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return n_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
  void poison() { std::memset(static_cast<void*>(data_), 0xff, bytes_); }
  std::vector<uint8_t> bytes() const {
    const auto* p = reinterpret_cast<const uint8_t*>(data_);
    return {p, p + bytes_};
  }

 private:
  int64_t n_, bytes_, map_bytes_;
  char* base_;
  T* data_;
};

void on_fault(int) {
  qlora::emu::fail("memory access past either end of a buffer (a guard page) or outside any");
}

// The three element types as the CUDA code sees them, with the host's conversions.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr cpu::DType dtype = cpu::DType::kFloat32;
  static constexpr const char* name = "float32";
  static constexpr double rounding = 0.0;  // relative rounding of a result stored as T
  static float from(float v) { return v; }
  static float to_float(float v) { return v; }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr cpu::DType dtype = cpu::DType::kBFloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr double rounding = 1.0 / 256;
  static __nv_bfloat16 from(float v) {
    __nv_bfloat16_raw r;
    r.x = cpu::float_to_bf16(v);
    return __nv_bfloat16(r);
  }
  static float to_float(__nv_bfloat16 v) { return cpu::bf16_to_float(__nv_bfloat16_raw(v).x); }
};
template <>
struct Elem<__half> {
  static constexpr cpu::DType dtype = cpu::DType::kFloat16;
  static constexpr const char* name = "float16";
  static constexpr double rounding = 1.0 / 2048;
  static __half from(float v) {
    __half_raw r;
    r.x = cpu::float_to_fp16(v);
    return __half(r);
  }
  static float to_float(__half v) { return cpu::fp16_to_float(__half_raw(v).x); }
};

// Runs `launch` twice on `outputs` filled with 0xff bytes: with the emulator's threads and blocks
// in reverse order, then in order. Both runs must leave the same bytes in every output, or the
// kernels race (or depend on the order of blocks); the in-order results stay in the buffers.
template <typename Launch, typename... Buffers>
void run_in_both_orders(Launch launch, Buffers&... outputs) {
  emu::schedule() = emu::Schedule::kReversed;
  (outputs.poison(), ...);
  launch();
  const std::vector<std::vector<uint8_t>> reversed = {outputs.bytes()...};
  emu::schedule() = emu::Schedule::kInOrder;
  (outputs.poison(), ...);
  launch();
  const std::vector<std::vector<uint8_t>> in_order = {outputs.bytes()...};
  for (size_t i = 0; i < in_order.size(); ++i) {
    if (in_order[i] != reversed[i]) {
      std::fprintf(stderr, "  output %zu of %zu differs between the thread orders: a race\n", i + 1,
                   in_order.size());
    }
    CHECK(in_order[i] == reversed[i]);
  }
}

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Random weights as T: normal, each NF4 block with its own scale (absmax spanning decades), one
// block all zeros.
template <typename T>
std::vector<T> random_weights(int64_t numel, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> w(numel);
  for (int64_t b = 0; b < numel / kBlockSize; ++b) {
    const float scale = b == 1 ? 0.0f : 0.02f * std::exp(1.5f * normal(rng));
    for (int64_t i = 0; i < kBlockSize; ++i) {
      w[b * kBlockSize + i] = Elem<T>::from(scale * normal(rng));
    }
  }
  return w;
}

// An NF4 weight made by the CPU kernel cores, in guarded buffers, with its decoded float32 values.
struct Nf4Weight {
  int64_t numel, nblocks, groups;
  GuardedBuffer<uint8_t> packed, codes;
  GuardedBuffer<float> scales, offset;
  std::vector<float> dense;

  explicit Nf4Weight(const std::vector<float>& w)
      : numel(static_cast<int64_t>(w.size())),
        nblocks(numel / kBlockSize),
        groups((nblocks + kScalerBlockSize - 1) / kScalerBlockSize),
        packed(numel / 2),
        codes(nblocks),
        scales(groups),
        offset(1),
        dense(numel) {
    std::vector<float> absmax(nblocks);
    cpu::portable_kernels().quantize_blocks(w.data(), cpu::DType::kFloat32, 0, nblocks,
                                             packed.data(), absmax.data());
    test::double_quantize(absmax.data(), nblocks, offset.data(), codes.data(), scales.data());
    cpu::decode_range_f32(view(), 0, numel, dense.data());
  }
  Nf4View view() const { return {packed.data(), codes.data(), scales.data(), offset.data()}; }
};

std::vector<float> random_floats(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

template <typename T>
void copy_as(const std::vector<float>& from, GuardedBuffer<T>& to) {
  for (int64_t i = 0; i < to.size(); ++i) to[i] = Elem<T>::from(from[i]);
}

// |got - want| within float32 accumulation error of the terms' magnitudes (`abs_sum`) plus the
// rounding of a result stored as T; a NaN (an element nobody wrote) fails.
template <typename T>
bool close(T got, double want, double abs_sum) {
  const double g = Elem<T>::to_float(got);
  return std::isfinite(g) && std::abs(g - want) <= 2e-5 * abs_sum + 1e-30 +
                                                     Elem<T>::rounding * std::abs(want);
}

// ---- codec ------------------------------------------------------------------------------------

// What the quantize pipeline (launch_quantize_codes, then launch_quantize_absmax) makes of weights
// `w`, in both thread orders: its outputs and its scratch buffers (absmax, group sums).
struct Quantized {
  int64_t nblocks, groups;
  GuardedBuffer<uint8_t> packed, codes;
  GuardedBuffer<float> absmax, scales, offset;
  GuardedBuffer<double> sums;

  template <typename T>
  explicit Quantized(const std::vector<T>& w)
      : nblocks(static_cast<int64_t>(w.size()) / kBlockSize),
        groups((nblocks + kScalerBlockSize - 1) / kScalerBlockSize),
        packed(nblocks * kBlockSize / 2),
        codes(nblocks),
        absmax(nblocks),
        scales(groups),
        offset(1),
        sums(groups) {
    GuardedBuffer<T> dw(static_cast<int64_t>(w.size()));
    std::memcpy(static_cast<void*>(dw.data()), w.data(), w.size() * sizeof(T));
    run_in_both_orders(
        [&] {
          cuda::launch_quantize_codes<T>(dw.data(), nblocks,
                                         reinterpret_cast<uint32_t*>(packed.data()), absmax.data(),
                                         sums.data(), offset.data(), nullptr);
          cuda::launch_quantize_absmax(absmax.data(), nblocks, offset.data(), codes.data(),
                                       scales.data(), nullptr);
        },
        packed, absmax, sums, offset, codes, scales);
  }
};

// Quantize: the four-kernel pipeline gives the CPU cores' bytes exactly (packed codes, absmax
// codes, scales, offset), over partial groups of 256 blocks and a partial last CTA.
template <typename T>
void quantize_matches_cpu() {
  for (const int64_t nblocks : {1, 7, 256, 300, 513}) {
    const std::vector<T> w = random_weights<T>(nblocks * kBlockSize, 7 + nblocks);
    const Quantized q(w);
    const int64_t groups = q.groups;

    std::vector<uint8_t> ref_packed(nblocks * kBlockSize / 2), ref_codes(nblocks);
    std::vector<float> ref_absmax(nblocks), ref_scales(groups);
    float ref_offset;
    cpu::portable_kernels().quantize_blocks(w.data(), Elem<T>::dtype, 0, nblocks,
                                             ref_packed.data(), ref_absmax.data());
    test::double_quantize(ref_absmax.data(), nblocks, &ref_offset, ref_codes.data(),
                          ref_scales.data());
    CHECK(same_bits(q.offset[0], ref_offset));
    for (int64_t g = 0; g < groups; ++g) CHECK(same_bits(q.scales[g], ref_scales[g]));
    CHECK(std::memcmp(q.packed.data(), ref_packed.data(), ref_packed.size()) == 0);
    CHECK(std::memcmp(q.codes.data(), ref_codes.data(), ref_codes.size()) == 0);
  }
}

// Quantize at and around every NF4 midpoint (ties go to the lower code), which random weights
// hardly ever hit: blocks of absmax 1, so that the scaled values are the weights themselves.
void quantize_codes_at_midpoints() {
  const CodeTables& t = code_tables();
  std::vector<float> block = {1.0f, -0.0f, 1e-30f};
  for (int i = 0; i < 15; ++i) {
    const float mid = t.nf4_mid[i];
    block.insert(block.end(), {mid, std::nextafter(mid, 2.0f), std::nextafter(mid, -2.0f)});
  }
  block.insert(block.end(), t.nf4, t.nf4 + 16);
  CHECK_EQ(static_cast<int64_t>(block.size()), kBlockSize);
  std::vector<float> w;
  for (int copy = 0; copy < 3; ++copy) w.insert(w.end(), block.begin(), block.end());
  std::reverse(w.begin() + kBlockSize, w.begin() + 2 * kBlockSize);  // other positions in a word
  const Quantized q(w);
  std::vector<uint8_t> ref_packed(w.size() / 2);
  std::vector<float> ref_absmax(3);
  cpu::portable_kernels().quantize_blocks(w.data(), Elem<float>::dtype, 0, 3, ref_packed.data(),
                                          ref_absmax.data());
  CHECK(std::memcmp(q.packed.data(), ref_packed.data(), ref_packed.size()) == 0);
  CHECK_EQ(even_code(q.packed[(3 + 3 * 3) / 2]), 3);  // element 12 of block 0: midpoint 3, a tie
  CHECK_EQ(odd_code(q.packed[(4 + 3 * 3) / 2]), 4);   // element 13: just above it
}

// A NaN or Inf weight makes the offset non-finite, which is how the op detects it (one value
// read back instead of a scan of the weight).
template <typename T>
void quantize_flags_non_finite() {
  const int64_t nblocks = 300;
  for (const float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<T> w = random_weights<T>(nblocks * kBlockSize, 11);
    w[299 * kBlockSize + 5] = Elem<T>::from(bad);
    CHECK(!std::isfinite(Quantized(w).offset[0]));
  }
}

// Dequantize (the whole weight as one row, as the op does) gives the CPU cores' values exactly.
template <typename T>
void dequantize_matches_cpu() {
  for (const int64_t nblocks : {1, 7, 300, 513}) {
    const Nf4Weight w(random_floats(nblocks * kBlockSize, 40 + nblocks));
    GuardedBuffer<T> out(w.numel);
    run_in_both_orders(
        [&] {
          cuda::launch_dequantize_tile<T>(w.view(), w.numel, 0, 1, 0, w.numel, out.data(), nullptr);
        },
        out);
    std::vector<T> ref(w.numel);
    cpu::portable_kernels().dequantize_blocks(w.view(), 0, nblocks, ref.data(), Elem<T>::dtype);
    int64_t wrong = 0;
    for (int64_t i = 0; i < w.numel; ++i) wrong += !same_bits(out[i], ref[i]);
    CHECK_EQ(wrong, 0);
  }
}

// The tiles the large-M linear path decodes (rows of W for the forward, columns for the backward,
// tile_extent apart), and tiles whose columns are not whole 8-weight words (the scalar kernel):
// each equals its slice of the decoded weight.
struct LinearShape {
  int64_t N, K;
};

void report(const char* what, const char* dtype, LinearShape s, int64_t a, int64_t b,
            int64_t wrong) {
  if (wrong == 0) return;
  std::fprintf(stderr, "  %s %s N=%lld K=%lld (%lld, %lld): %lld wrong\n", what, dtype,
               static_cast<long long>(s.N), static_cast<long long>(s.K), static_cast<long long>(a),
               static_cast<long long>(b), static_cast<long long>(wrong));
}

// Rows [row0, row0 + rows) x columns [col0, col0 + cols) of W decoded to T equal that slice of
// the decoded weight.
template <typename T>
void check_tile(const Nf4Weight& w, LinearShape s, int64_t row0, int64_t rows, int64_t col0,
                int64_t cols) {
  GuardedBuffer<T> out(rows * cols);
  run_in_both_orders(
      [&] {
        cuda::launch_dequantize_tile<T>(w.view(), s.K, row0, rows, col0, cols, out.data(), nullptr);
      },
      out);
  int64_t wrong = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const T want = Elem<T>::from(w.dense[(row0 + r) * s.K + col0 + c]);
      wrong += !same_bits(out[r * cols + c], want);
    }
  }
  report("tile at (row, col)", Elem<T>::name, s, row0, col0, wrong);
  CHECK_EQ(wrong, 0);
}

template <typename T>
void dequantize_tiles_match_slices() {
  for (const LinearShape s : {LinearShape{40, 64}, {130, 200}, {16, 36}, {9, 512}}) {
    const Nf4Weight w(random_floats(s.N * s.K, 60 + s.N));
    for (const int64_t tiles : {2, 3, 4}) {
      const int64_t rows = cuda::tile_extent(s.N, tiles);
      for (int64_t n0 = 0; n0 < s.N; n0 += rows) {
        check_tile<T>(w, s, n0, std::min(rows, s.N - n0), 0, s.K);
      }
      const int64_t cols = cuda::tile_extent(s.K, tiles);
      for (int64_t k0 = 0; k0 < s.K; k0 += cols) {
        check_tile<T>(w, s, 0, s.N, k0, std::min(cols, s.K - k0));
      }
    }
    check_tile<T>(w, s, 1, s.N - 2, 3, s.K - 5);  // odd columns: one thread per weight
  }
}

// ---- linear -----------------------------------------------------------------------------------

// y = x W^T (+ bias) by the CUDA-core forward (gemv_rows: every MAXM instantiation, 16-byte steps
// of codes where K % 32 == 0, 4-byte ones for K = 8 and 200) and, for bf16/fp16 with K % 64 == 0,
// by the tensor-core one (launch_gemv_rows_mma, whose weights are rounded to T before the product,
// as its registers hold them).
template <typename T, bool tensor_cores>
void check_forward(const Nf4Weight& w, LinearShape s, int M, bool with_bias, unsigned seed) {
  GuardedBuffer<T> x(M * s.K), bias(s.N), y(M * s.N);
  copy_as(random_floats(M * s.K, seed), x);
  copy_as(random_floats(s.N, seed + 1), bias);
  const T* b = with_bias ? bias.data() : nullptr;
  run_in_both_orders(
      [&] {
        if constexpr (tensor_cores) {
          cuda::launch_gemv_rows_mma<T>(w.view(), s.N, s.K, x.data(), M, b, y.data(), nullptr);
        } else {
          cuda::gemv_rows<T>(w.view(), s.N, s.K, x.data(), M, b, y.data(), nullptr);
        }
      },
      y);
  int64_t wrong = 0;
  for (int m = 0; m < M; ++m) {
    for (int64_t n = 0; n < s.N; ++n) {
      double sum = with_bias ? Elem<T>::to_float(bias[n]) : 0.0, abs_sum = std::abs(sum);
      for (int64_t k = 0; k < s.K; ++k) {
        float wv = w.dense[n * s.K + k];
        if (tensor_cores) wv = Elem<T>::to_float(Elem<T>::from(wv));
        const double term = static_cast<double>(Elem<T>::to_float(x[m * s.K + k])) * wv;
        sum += term;
        abs_sum += std::abs(term);
      }
      wrong += !close(y[m * s.N + n], sum, abs_sum);
    }
  }
  report(tensor_cores ? "forward on tensor cores (M, bias)" : "forward (M, bias)", Elem<T>::name,
         s, M, with_bias, wrong);
  CHECK_EQ(wrong, 0);
}

template <typename T, bool tensor_cores>
void gemv_rows_matches_float64() {
  // one row; one word per row (K = 8: a single lane works); odd N; fewer NF4 blocks along K than
  // the tensor-core kernel's 16 warps (9), and more (40: each warp prefetches its next block); more
  // 16-byte chunks per row than the CUDA-core kernel loads ahead (K = 11008: 344 > 4 x 32)
  const LinearShape shapes[] = {{1, 64},   {8, 8},     {37, 64}, {45, 200},
                                {33, 576}, {19, 2560}, {5, 11008}};
  for (const LinearShape s : shapes) {
    if (tensor_cores && s.K % kBlockSize != 0) continue;
    const Nf4Weight w(random_floats(s.N * s.K, 80 + s.N));
    for (const int M : {1, 2, 3, 4, 5, 8, 9, 12, 16}) {
      check_forward<T, tensor_cores>(w, s, M, M % 2 == 1, 90 + M);
    }
  }
}

// gx = gy W by the backward (gemv_cols: passes of 8 rows of gy, slices of W's rows summed in
// order), including more slices than kMaxSlices would allow at kRowsPerSlice rows each.
template <typename T>
void check_backward(const Nf4Weight& w, LinearShape s, int M, unsigned seed) {
  GuardedBuffer<T> gy(M * s.N), gx(M * s.K);
  copy_as(random_floats(M * s.N, seed), gy);
  GuardedBuffer<float> partial(cuda::cols_slices(s.N).slices * M * s.K);
  run_in_both_orders(
      [&] {
        cuda::gemv_cols<T>(w.view(), s.N, s.K, gy.data(), M, gx.data(), partial.data(), nullptr);
      },
      gx, partial);
  int64_t wrong = 0;
  for (int m = 0; m < M; ++m) {
    for (int64_t k = 0; k < s.K; ++k) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t n = 0; n < s.N; ++n) {
        const double term =
            static_cast<double>(Elem<T>::to_float(gy[m * s.N + n])) * w.dense[n * s.K + k];
        sum += term;
        abs_sum += std::abs(term);
      }
      wrong += !close(gx[m * s.K + k], sum, abs_sum);
    }
  }
  report("backward (M, -)", Elem<T>::name, s, M, 0, wrong);
  CHECK_EQ(wrong, 0);
}

template <typename T>
void gemv_cols_matches_float64() {
  struct Case {
    LinearShape shape;
    std::vector<int> ms;
  };
  const Case cases[] = {{{1, 64}, {1, 3}},
                        {{8, 8}, {2, 16}},
                        {{37, 64}, {1, 2, 3, 5, 8, 9, 13, 16}},
                        {{300, 200}, {1, 4, 11}},
                        {{45, 1024}, {2, 16}},
                        {{33000, 64}, {2}}};
  for (const Case& c : cases) {
    const Nf4Weight w(random_floats(c.shape.N * c.shape.K, 120 + c.shape.N));
    for (const int M : c.ms) check_backward<T>(w, c.shape, M, 130 + M);
  }
}

// `count` random cases from `seed`: a shape (N * K a multiple of 64, K a multiple of 8), then a
// tile, the forward (and on tensor cores where K % 64 == 0) and the backward at a random M.
template <typename T>
void random_cases(int count, unsigned seed) {
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int i = 0; i < count; ++i) {
    guard_side() = i % 2 == 0 ? GuardSide::kAfter : GuardSide::kBefore;
    LinearShape s;
    do {  // one shape in four has long rows (up to Llama-2-70B's 28672), and fewer of them
      s = uniform(0, 3) == 0 ? LinearShape{uniform(1, 24), 8 * uniform(1, 3584)}
                             : LinearShape{uniform(1, 400), 8 * uniform(1, 200)};
    } while ((s.N * s.K) % kBlockSize != 0);
    const Nf4Weight w(random_floats(s.N * s.K, static_cast<unsigned>(rng())));
    const int64_t row0 = uniform(0, s.N - 1), col0 = uniform(0, s.K - 1);
    check_tile<T>(w, s, row0, uniform(1, s.N - row0), col0, uniform(1, s.K - col0));
    const int M = static_cast<int>(uniform(1, cuda::kMaxFusedRows));
    check_forward<T, false>(w, s, M, uniform(0, 1) == 1, static_cast<unsigned>(rng()));
    if constexpr (!std::is_same_v<T, float>) {
      if (s.K % kBlockSize == 0) {
        check_forward<T, true>(w, s, M, uniform(0, 1) == 1, static_cast<unsigned>(rng()));
      }
    }
    check_backward<T>(w, s, M, static_cast<unsigned>(rng()));
  }
}

// ---- host logic -------------------------------------------------------------------------------

// The large-M path's tile count: 2 to 4 for any shape, and the wave arithmetic of its comment (at
// M = 2048 on 132 SMs, 3 tiles of 4096 columns would be GEMMs of 1.33 waves).
void large_m_tiles_choice() {
  for (const int64_t M : {17, 256, 2048, 8192}) {
    for (const int64_t cols : {16, 64, 4096, 11008, 32000}) {
      for (const int sms : {108, 132}) {
        const int tiles = cuda::large_m_tiles(M, cols, sms);
        CHECK(tiles >= cuda::kMinTiles && tiles <= cuda::kMaxTiles);
      }
    }
  }
  CHECK_EQ(cuda::large_m_tiles(2048, 4096, 132), 2);
  CHECK_EQ(cuda::large_m_tiles(2048, 11008, 132), 2);
  CHECK_EQ(cuda::large_m_tiles(2048, 5120, 132), 3);  // 13B's width: halves lose more than thirds
  CHECK_EQ(cuda::large_m_tiles(256, 4096, 132), 2);  // under a wave whatever the split: fewest
}

template <typename T>
void run(const char* what, void (*f)()) {
  const int before = test::failures();
  f();
  std::printf("%-6s %-8s %s\n", test::failures() == before ? "ok" : "FAIL", Elem<T>::name, what);
}

template <typename T>
void run_all() {
  run<T>("quantize: the CPU cores' bytes", quantize_matches_cpu<T>);
  run<T>("quantize: a NaN or Inf weight gives a non-finite offset", quantize_flags_non_finite<T>);
  if constexpr (std::is_same_v<T, float>) {
    run<T>("quantize: codes at and around every NF4 midpoint", quantize_codes_at_midpoints);
  }
  run<T>("dequantize: the CPU cores' values", dequantize_matches_cpu<T>);
  run<T>("dequantize tiles: slices of the weight", dequantize_tiles_match_slices<T>);
  run<T>("gemv_rows (forward): float64 product", gemv_rows_matches_float64<T, false>);
  if constexpr (!std::is_same_v<T, float>) {
    run<T>("gemv_rows_mma (tensor cores): float64 product", gemv_rows_matches_float64<T, true>);
  }
  run<T>("gemv_cols (backward): float64 product", gemv_cols_matches_float64<T>);
}

}  // namespace

int main(int argc, char** argv) {
  // The fault handler runs on a stack of its own: a fault may come from an exhausted thread stack.
  static std::vector<char> handler_stack(1 << 16);
  stack_t ss{};
  ss.ss_sp = handler_stack.data();
  ss.ss_size = handler_stack.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  // Without them the per-block poisoning of shared memory would silently do nothing.
  std::printf("%zu __shared__ variables found (filled with 0xff before each block)\n",
              emu::shared_variables().size());
  CHECK(!emu::shared_variables().empty());
  if (argc == 3 && std::strcmp(argv[1], "--random") == 0) {  // --random SEED: more cases, any time
    const unsigned seed = static_cast<unsigned>(std::strtoul(argv[2], nullptr, 10));
    random_cases<float>(20, seed);
    random_cases<__nv_bfloat16>(20, seed + 1);
    random_cases<__half>(20, seed + 2);
  } else {
    const int before = test::failures();
    large_m_tiles_choice();
    std::printf("%-6s %-8s %s\n", test::failures() == before ? "ok" : "FAIL", "host",
                "large-M tile count: 2 to 4, the fewest of the least wave loss");
    for (const GuardSide side : {GuardSide::kAfter, GuardSide::kBefore}) {
      guard_side() = side;
      std::printf("-- buffers flush against a guard page %s them\n",
                  side == GuardSide::kAfter ? "after" : "before");
      run_all<float>();
      run_all<__nv_bfloat16>();
      run_all<__half>();
    }
  }
  std::printf("%d failure(s)\n", test::failures());
  return test::failures() == 0 ? 0 : 1;
}
