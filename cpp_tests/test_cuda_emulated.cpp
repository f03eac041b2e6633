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
//   test_cuda_emulated --extended [P] edge shapes and values (about 60 s on 2 cores; ctest), or
//                                    only the cases whose "dtype name" contains P
//   test_cuda_emulated --random S    60 random shapes from seed S (about 25 s on 2 cores)
// Built with -fsanitize=address, every buffer is an exact heap block instead (see GuardedBuffer).
#include "cuda_emulator.h"  // first: it defines what the kernel headers expect from nvcc

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
// float), or `phase` bytes past such an address (a pointer the host passes with less alignment,
// e.g. packed codes only 4-byte aligned), and the end lies at most that alignment before the
// page. Filled with 0xff bytes (NaN in every float type), so that an element no kernel wrote
// shows. Built with AddressSanitizer (-fsanitize=address), the buffer is instead a heap block of
// exactly n elements (plus `phase` bytes before them): ASan's redzones then catch an access even
// one byte past the end, which the alignment slack before a guard page hides.
template <typename T>
class GuardedBuffer {
 public:
  explicit GuardedBuffer(int64_t n, int64_t phase = 0) : n_(n) {
    const int64_t align = std::max<int64_t>(16, 8 * sizeof(T));
    bytes_ = std::max<int64_t>(n, 1) * sizeof(T);
#if defined(__SANITIZE_ADDRESS__)
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes_ + phase) != 0) std::abort();
    base_ = static_cast<char*>(p);
    map_bytes_ = 0;
    data_ = reinterpret_cast<T*>(base_ + phase);
#else
    const int64_t page = sysconf(_SC_PAGESIZE);
    const int64_t span = round_up_to(bytes_ + phase, align);
    map_bytes_ = page + round_up_to(span, page) + page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<char*>(p);
    if (mprotect(base_, page, PROT_NONE) != 0) std::abort();
    if (mprotect(base_ + map_bytes_ - page, page, PROT_NONE) != 0) std::abort();
    data_ = reinterpret_cast<T*>(guard_side() == GuardSide::kAfter
                                     ? base_ + map_bytes_ - page - span + phase
                                     : base_ + page + phase);
#endif
    poison();
  }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
#if defined(__SANITIZE_ADDRESS__)
  ~GuardedBuffer() { std::free(base_); }
#else
  ~GuardedBuffer() { munmap(base_, map_bytes_); }
#endif

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

// Where the components of an NF4 weight start relative to an aligned address: the ops pass the
// packed codes 4-byte aligned (contiguous_aligned(packed, 4)), the absmax codes at any byte, the
// scales and offset 4-byte aligned.
struct Phases {
  int64_t packed = 0, codes = 0, scales = 0, offset = 0;
};

// An NF4 weight made by the CPU kernel cores, in guarded buffers, with its decoded float32 values.
struct Nf4Weight {
  int64_t numel, nblocks, groups;
  GuardedBuffer<uint8_t> packed, codes;
  GuardedBuffer<float> scales, offset;
  std::vector<float> dense;

  explicit Nf4Weight(const std::vector<float>& w, Phases ph = {})
      : numel(static_cast<int64_t>(w.size())),
        nblocks(numel / kBlockSize),
        groups((nblocks + kScalerBlockSize - 1) / kScalerBlockSize),
        packed(numel / 2, ph.packed),
        codes(nblocks, ph.codes),
        scales(groups, ph.scales),
        offset(1, ph.offset),
        dense(numel) {
    if (numel % kBlockSize != 0) {  // the ops refuse such a weight; its last weights have no absmax
      std::fprintf(stderr, "test error: an NF4 weight of %lld elements, not whole blocks of 64\n",
                   static_cast<long long>(numel));
      std::abort();
    }
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
// (plus half the spacing of T's subnormals: float16 results under 6.1e-5 round to 6e-8 steps).
template <typename T>
bool close(T got, double want, double abs_sum) {
  const double g = Elem<T>::to_float(got);
  const double subnormal_half_step = std::is_same_v<T, __half> ? std::ldexp(1.0, -25) : 0.0;
  return std::isfinite(g) && std::abs(g - want) <= 2e-5 * abs_sum + 1e-30 + subnormal_half_step +
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

// The large-M paths of linear.cu, emulated: W decoded in tiles of tile_extent(extent, tiles) rows
// (forward) or columns (backward), for each tile count large_m_tiles can choose, into slices of
// one workspace of the first tile's size; each tile must equal its slice of the decoded weight.
template <typename T>
void check_large_m_tiles(const Nf4Weight& w, LinearShape s) {
  for (int64_t tiles = cuda::kMinTiles; tiles <= cuda::kMaxTiles; ++tiles) {
    const int64_t rows = cuda::tile_extent(s.N, tiles);
    for (int64_t n0 = 0; n0 < s.N; n0 += rows) {
      check_tile<T>(w, s, n0, std::min(rows, s.N - n0), 0, s.K);
    }
    const int64_t cols = cuda::tile_extent(s.K, tiles);
    for (int64_t k0 = 0; k0 < s.K; k0 += cols) {
      check_tile<T>(w, s, 0, s.N, k0, std::min(cols, s.K - k0));
    }
  }
}

template <typename T>
void dequantize_tiles_match_slices() {
  for (const LinearShape s : {LinearShape{40, 64}, {136, 200}, {16, 36}, {9, 512}}) {
    const Nf4Weight w(random_floats(s.N * s.K, 60 + s.N));
    check_large_m_tiles<T>(w, s);
    check_tile<T>(w, s, 1, s.N - 2, 3, s.K - 5);  // odd columns: one thread per weight
  }
}

// ---- linear -----------------------------------------------------------------------------------

// y = x W^T (+ bias) by the CUDA-core forward (gemv_rows: every MAXM instantiation, 16-byte steps
// of codes where K % 32 == 0, 4-byte ones for K = 8 and 200) and, for bf16/fp16 with K % 64 == 0,
// by the tensor-core one (launch_gemv_rows_mma, whose weights are rounded to T before the product,
// as its registers hold them).
template <typename T, bool tensor_cores>
void check_forward(const Nf4Weight& w, LinearShape s, int M, bool with_bias, unsigned seed,
                   int64_t bias_phase = 0) {
  GuardedBuffer<T> x(M * s.K), bias(s.N, bias_phase), y(M * s.N);
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
  const LinearShape shapes[] = {{1, 64},   {8, 8},     {37, 64}, {40, 200},
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
void check_backward(const Nf4Weight& w, LinearShape s, int M, unsigned seed, int64_t gy_phase = 0) {
  GuardedBuffer<T> gy(M * s.N, gy_phase), gx(M * s.K);
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
      const bool ok = close(gx[m * s.K + k], sum, abs_sum);
      if (!ok && wrong < 5) {
        std::fprintf(stderr, "    gx[%d, %lld] = %.9g, want %.9g (sum |terms| %.9g)\n", m,
                     static_cast<long long>(k), Elem<T>::to_float(gx[m * s.K + k]), sum, abs_sum);
      }
      wrong += !ok;
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
                        {{296, 200}, {1, 4, 11}},
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

// ---- extended cases (--extended) ---------------------------------------------------------------
// Edge shapes and values on top of the fixed cases: block counts at the edges of a group of 256
// blocks and of a CTA, all-zero, subnormal and huge blocks, NaN and Inf of every kind, every M of
// the small-M linear paths, the large-M path's tile loops for every tile count, rows that are not
// whole NF4 blocks (the scalar decoder), and components at the least alignment the ops pass.

enum class Kind { kRandom, kAllZero, kZeroBlocks, kOneHuge, kSubnormal, kMixed };
constexpr Kind kKinds[] = {Kind::kRandom,    Kind::kAllZero,   Kind::kZeroBlocks,
                           Kind::kOneHuge,   Kind::kSubnormal, Kind::kMixed};
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kRandom: return "random";
    case Kind::kAllZero: return "all-zero";
    case Kind::kZeroBlocks: return "zero-blocks";
    case Kind::kOneHuge: return "one-huge";
    case Kind::kSubnormal: return "subnormal";
    case Kind::kMixed: return "mixed";
  }
  return "?";
}

// The largest finite value of T, and a scale whose normal multiples are subnormal in T.
template <typename T>
float max_finite() {
  if constexpr (std::is_same_v<T, __half>) return 65504.0f;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return cpu::bf16_to_float(0x7f7f);
  else return std::numeric_limits<float>::max();
}
template <typename T>
float subnormal_scale() {
  return std::is_same_v<T, __half> ? 1e-6f : 1e-40f;
}

// `nblocks` NF4 blocks of weights of kind `kind` as T; one-huge blocks hold `huge` (with a random
// sign) at a random position among small normal values.
template <typename T>
std::vector<T> special_weights(Kind kind, int64_t nblocks, unsigned seed, float huge) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> position(0, kBlockSize - 1);
  std::vector<T> w(nblocks * kBlockSize);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int mixed = static_cast<int>(b % 4);
    const bool zero = kind == Kind::kAllZero || (kind == Kind::kZeroBlocks && b % 3 != 0) ||
                      (kind == Kind::kMixed && mixed == 0);
    const bool tiny = kind == Kind::kSubnormal || (kind == Kind::kMixed && mixed == 1);
    const bool with_huge = kind == Kind::kOneHuge || (kind == Kind::kMixed && mixed == 3);
    for (int64_t i = 0; i < kBlockSize; ++i) {
      const float v = zero ? 0.0f : (tiny ? subnormal_scale<T>() : 0.02f) * normal(rng);
      w[b * kBlockSize + i] = Elem<T>::from(v);
    }
    if (with_huge) {
      w[b * kBlockSize + position(rng)] = Elem<T>::from(rng() % 2 ? huge : -huge);
    }
  }
  return w;
}

template <typename T>
std::vector<float> as_floats(const std::vector<T>& w) {
  std::vector<float> f(w.size());
  for (size_t i = 0; i < w.size(); ++i) f[i] = Elem<T>::to_float(w[i]);
  return f;
}

// The quantize pipeline against the CPU cores, byte for byte; returns the number of mismatching
// components (offset, scales, packed, codes) and reports them.
template <typename T>
int quantize_mismatches(const std::vector<T>& w, const char* what) {
  const int64_t nblocks = static_cast<int64_t>(w.size()) / kBlockSize;
  const Quantized q(w);
  const int64_t groups = q.groups;
  std::vector<uint8_t> ref_packed(nblocks * kBlockSize / 2), ref_codes(nblocks);
  std::vector<float> ref_absmax(nblocks), ref_scales(groups);
  float ref_offset;
  cpu::portable_kernels().quantize_blocks(w.data(), Elem<T>::dtype, 0, nblocks, ref_packed.data(),
                                          ref_absmax.data());
  test::double_quantize(ref_absmax.data(), nblocks, &ref_offset, ref_codes.data(),
                        ref_scales.data());
  int64_t bad_scales = 0, bad_packed = 0, bad_codes = 0;
  for (int64_t g = 0; g < groups; ++g) bad_scales += !same_bits(q.scales[g], ref_scales[g]);
  for (size_t i = 0; i < ref_packed.size(); ++i) bad_packed += q.packed[i] != ref_packed[i];
  for (int64_t i = 0; i < nblocks; ++i) bad_codes += q.codes[i] != ref_codes[i];
  const bool bad_offset = !same_bits(q.offset[0], ref_offset);
  const int bad = bad_offset + (bad_scales > 0) + (bad_packed > 0) + (bad_codes > 0);
  if (bad > 0) {
    std::fprintf(stderr,
                 "  quantize %s %s nblocks=%lld: offset %s (%.9g vs %.9g), %lld scales, %lld "
                 "packed bytes, %lld absmax codes differ\n",
                 Elem<T>::name, what, static_cast<long long>(nblocks),
                 bad_offset ? "differs" : "same", q.offset[0], ref_offset,
                 static_cast<long long>(bad_scales), static_cast<long long>(bad_packed),
                 static_cast<long long>(bad_codes));
  }
  return bad;
}

constexpr int64_t kEdgeBlockCounts[] = {1, 2, 31, 32, 33, 255, 256, 257, 511, 512, 513};

template <typename T>
void ext_quantize() {
  for (const int64_t nblocks : kEdgeBlockCounts) {
    for (const Kind kind : kKinds) {
      const std::vector<T> w =
          special_weights<T>(kind, nblocks, 1000 + static_cast<unsigned>(nblocks),
                             max_finite<T>());
      CHECK_EQ(quantize_mismatches(w, kind_name(kind)), 0);
    }
  }
  // every block at the largest finite value, or at its negation: a finite offset and scale 0
  for (const float v : {max_finite<T>(), -max_finite<T>(), subnormal_scale<T>()}) {
    const std::vector<T> w(257 * kBlockSize, Elem<T>::from(v));
    CHECK_EQ(quantize_mismatches(w, "constant"), 0);
  }
}

// NaN (quiet, negative, signalling) and Inf of either sign at the first, a middle and the last
// element: the CPU's scan sees a non-finite value, and the CUDA offset is not finite.
template <typename T>
void ext_quantize_non_finite() {
  std::vector<uint16_t> bits16;
  std::vector<uint32_t> bits32;
  if constexpr (std::is_same_v<T, float>) {
    bits32 = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7f800000u, 0xff800000u};
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    bits16 = {0x7fc0, 0xffc0, 0x7f81, 0xff81, 0x7f80, 0xff80};
  } else {
    bits16 = {0x7e00, 0xfe00, 0x7c01, 0xfc01, 0x7c00, 0xfc00};
  }
  const size_t patterns = std::is_same_v<T, float> ? bits32.size() : bits16.size();
  int64_t missed = 0, cpu_missed = 0, cases = 0;
  for (const int64_t nblocks : {1, 256, 257}) {
    for (const int64_t at : {int64_t{0}, nblocks * kBlockSize / 2 + 3, nblocks * kBlockSize - 1}) {
      for (size_t p = 0; p < patterns; ++p) {
        std::vector<T> w = special_weights<T>(p % 2 ? Kind::kAllZero : Kind::kMixed, nblocks,
                                              2000 + static_cast<unsigned>(p), max_finite<T>());
        if constexpr (std::is_same_v<T, float>) {
          std::memcpy(&w[at], &bits32[p], 4);
        } else {
          std::memcpy(&w[at], &bits16[p], 2);
        }
        std::vector<uint8_t> packed(nblocks * kBlockSize / 2);
        std::vector<float> absmax(nblocks);
        const uint32_t seen = cpu::portable_kernels().quantize_blocks(
            w.data(), Elem<T>::dtype, 0, nblocks, packed.data(), absmax.data());
        cpu_missed += seen < kNonFiniteBits;
        const Quantized q(w);
        if (std::isfinite(q.offset[0])) {
          ++missed;
          std::fprintf(stderr, "  %s nblocks=%lld: pattern %zu at %lld gives a finite offset %g\n",
                       Elem<T>::name, static_cast<long long>(nblocks), p,
                       static_cast<long long>(at), q.offset[0]);
        }
        ++cases;
      }
    }
  }
  CHECK_EQ(cpu_missed, 0);
  CHECK_EQ(missed, 0);
  std::printf("         (%lld non-finite cases)\n", static_cast<long long>(cases));
}

// Dequantize (the op: the whole weight as one row) of special weights, with the packed codes 4, 8
// or 12 bytes past 16-byte alignment and the absmax codes at any byte: the CPU cores' values.
template <typename T>
void ext_dequantize() {
  int variant = 0;
  for (const int64_t nblocks : kEdgeBlockCounts) {
    for (const Kind kind : kKinds) {
      const Phases ph{4 * (variant % 4), variant % 3, 4 * (variant % 2), 4 * (variant % 2)};
      ++variant;
      const Nf4Weight w(
          as_floats(special_weights<float>(kind, nblocks, 3000 + static_cast<unsigned>(nblocks),
                                           max_finite<float>() / 2)),
          ph);
      GuardedBuffer<T> out(w.numel);
      run_in_both_orders(
          [&] {
            cuda::launch_dequantize_tile<T>(w.view(), w.numel, 0, 1, 0, w.numel, out.data(),
                                            nullptr);
          },
          out);
      std::vector<T> ref(w.numel);
      cpu::portable_kernels().dequantize_blocks(w.view(), 0, nblocks, ref.data(), Elem<T>::dtype);
      int64_t wrong = 0;
      for (int64_t i = 0; i < w.numel; ++i) wrong += !same_bits(out[i], ref[i]);
      if (wrong != 0) {
        std::fprintf(stderr, "  dequantize %s %s nblocks=%lld packed phase %lld: %lld wrong\n",
                     Elem<T>::name, kind_name(kind), static_cast<long long>(nblocks),
                     static_cast<long long>(ph.packed), static_cast<long long>(wrong));
      }
      CHECK_EQ(wrong, 0);
    }
  }
}

// Shapes for the linear paths: N not a multiple of 8 or 32 (a CTA's rows of gemv_rows and of the
// tensor-core kernel), K = 64, 72 (not whole 32-weight chunks), 4104 (8 past a multiple of 64),
// 4160 (more 16-byte chunks per lane than are loaded ahead, with the packed codes at each
// phase: 16-byte aligned takes the wide kernel), K % 32 == 0 but not 64, and N around the
// backward's 128-row slices. The phases of the components go round with the shapes.
const LinearShape kExtShapes[] = {{1, 64},  {3, 64},   {33, 64},  {65, 64},   {129, 64},
                                  {2, 96},  {16, 40},  {8, 72},   {40, 72},   {136, 72},
                                  {100, 192}, {31, 128}, {7, 320}, {8, 4104}, {1, 4160},
                                  {2, 4160}, {5, 4160}};
// Rows that are not whole multiples of 8 weights: the linear ops take the tile path at any M.
const LinearShape kOddShapes[] = {{16, 36}, {16, 100}, {16, 4100}, {64, 1}, {32, 6}};

template <typename T>
void ext_linear() {
  int variant = 0;
  for (const LinearShape s : kExtShapes) {
    const Kind kind = kKinds[variant % 6];
    const Phases ph{4 * (variant % 4), variant % 3, 4 * (variant % 2), 0};
    ++variant;
    const std::vector<float> dense = as_floats(special_weights<float>(
        kind == Kind::kOneHuge || kind == Kind::kMixed ? kind : Kind::kRandom,
        s.N * s.K / kBlockSize, 4000 + static_cast<unsigned>(s.N + s.K), 2000.0f));
    const Nf4Weight w(dense, ph);
    // every M on the small shapes; on the others each template's edges (MAXM 1, 2, 4, 8, 16, the
    // tensor-core kernel's 8-row m tiles, the backward's passes of 8 rows) and two more in turn
    std::vector<int> ms = {1, 2, 3, 4, 5, 8, 9, 16, 6 + variant % 2, 10 + variant % 6};
    if (s.N * s.K <= 2048) {
      ms.clear();
      for (int M = 1; M <= cuda::kMaxFusedRows; ++M) ms.push_back(M);
    }
    for (const int M : ms) {
      const bool with_bias = (M + variant) % 2 == 0;
      const int64_t bias_phase = M % 3 == 0 ? static_cast<int64_t>(sizeof(T)) : 0;
      // (one warp per row of W: the long shapes' forward is the costly part, and they are here
      // for the backward's slices; the CUDA-core forward takes its MAXM edges there only). The
      // forward runs in the pass with guard pages after the buffers (it indexes up from them).
      const bool forward = guard_side() == GuardSide::kAfter;
      if (forward && (s.N < 100 || M == 1 || M == 2 || M == 8 || M == 16)) {
        check_forward<T, false>(w, s, M, with_bias, 500 + M, bias_phase);
      }
      if constexpr (!std::is_same_v<T, float>) {
        if (forward && s.K % kBlockSize == 0) {
          check_forward<T, true>(w, s, M, !with_bias, 600 + M, bias_phase);
        }
      }
      check_backward<T>(w, s, M, 700 + M, 4 * (M % 4));
    }
    if (guard_side() == GuardSide::kAfter && s.K % 32 == 0 && ph.packed % 16 != 0) {  // the wide CUDA-core forward too
      const Nf4Weight aligned(dense);
      for (const int M : {1, 3, 16}) check_forward<T, false>(aligned, s, M, M == 3, 800 + M);
    }
    check_large_m_tiles<T>(w, s);
  }
  for (const LinearShape s : kOddShapes) {
    const Nf4Weight w(random_floats(s.N * s.K, 4500 + static_cast<unsigned>(s.K)), Phases{4, 1, 4, 0});
    check_large_m_tiles<T>(w, s);
  }
  // the tile count stays 2 to 4 for every M of the large-M path on these shapes
  for (const LinearShape s : kExtShapes) {
    for (int64_t M = 17; M <= 130; M = M == 20 ? 64 : M + 1) {
      for (const int sms : {108, 132}) {
        for (const int64_t cols : {s.N, s.K}) {
          const int tiles = cuda::large_m_tiles(M, cols, sms);
          CHECK(tiles >= cuda::kMinTiles && tiles <= cuda::kMaxTiles);
        }
      }
    }
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

// `--extended PATTERN`: only the cases whose "dtype name" contains PATTERN (e.g. "float16 ext"
// or "quantize"), for a run under valgrind.
const char*& case_filter() {
  static const char* pattern = nullptr;
  return pattern;
}

template <typename T>
void run(const char* what, void (*f)()) {
  if (case_filter() != nullptr &&
      (std::string(Elem<T>::name) + " " + what).find(case_filter()) == std::string::npos) {
    return;
  }
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

template <typename T>
void run_extended() {
  run<T>("extended quantize: edge block counts x special weights", ext_quantize<T>);
  run<T>("extended quantize: NaN / Inf of every kind", ext_quantize_non_finite<T>);
  run<T>("extended dequantize: edge block counts, special weights, offsets", ext_dequantize<T>);
  run<T>("extended linear: M 1..16 fwd (+mma) / bwd, large-M tiles", ext_linear<T>);
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
  if ((argc == 2 || argc == 3) && std::strcmp(argv[1], "--extended") == 0) {  // edge cases
    if (argc == 3) case_filter() = argv[2];
    for (const GuardSide side : {GuardSide::kAfter, GuardSide::kBefore}) {
      guard_side() = side;
      std::printf("-- buffers flush against a guard page %s them\n",
                  side == GuardSide::kAfter ? "after" : "before");
      run_extended<float>();
      run_extended<__nv_bfloat16>();
      run_extended<__half>();
    }
  } else if (argc == 3 && std::strcmp(argv[1], "--random") == 0) {  // --random SEED: more cases, any time
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
