// The CUDA kernels of the NF4 codec and their launchers, on raw pointers (no torch): codec.cu
// wraps them as the quantize_nf4 / dequantize_nf4 ops, linear.cu decodes tiles with
// launch_dequantize_tile, and cpp_tests/test_cuda_emulated.cpp runs the same code on the CPU
// (cpp_tests/cuda_emulator.h). The includer first declares
//   template <typename... P, typename... A>
//   void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args);
// (launchers.h on a GPU, the emulator in the tests).
#pragma once

#include <cstdint>

#include "nf4_device.cuh"

namespace qlora::cuda {

constexpr int kCodecThreads = 256;
constexpr int kPartsPerBlock = kBlockSize / 8;  // threads per NF4 block, 8 weights each
constexpr int kWordsPerThread = 4;              // dequantize: 32-bit code words per thread

// ---- kernels --------------------------------------------------------------------------------

// One thread per 8 weights: NF4 codes of its 8 weights (one 32-bit word of `packed`), with the
// block's absmax found across the 8 threads of the block as a max of |w| bit patterns (exact;
// NaN and Inf order above all numbers and surface as a non-finite offset later). The weights are
// loaded and their absmax found before the tables are loaded, which only the codes need.
template <typename T>
__global__ void quantize_blocks_kernel(const T* __restrict__ w, int64_t nblocks,
                                       uint32_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ CodeTables tables;
  const int64_t part = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = part < nblocks * kPartsPerBlock;  // whole NF4 blocks per warp: no mixing
  float v[8] = {};
  uint32_t bits = 0;
  if (active) {
    load8(w + part * 8, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) bits = max(bits, __float_as_uint(v[i]) & 0x7fffffffu);
  }
#pragma unroll
  for (int o = kPartsPerBlock / 2; o > 0; o >>= 1) bits = max(bits, __shfl_xor_sync(kFullMask, bits, o));
  load_tables<true>(tables);
  __syncthreads();
  if (!active) return;
  const float amax = __uint_as_float(bits);
  const float inv = inverse_absmax(amax);
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c0 = nf4_code_by_bucket(clamp_unit(__fmul_rn(v[2 * j], inv)), tables.nf4_bucket);
    const int c1 = nf4_code_by_bucket(clamp_unit(__fmul_rn(v[2 * j + 1], inv)), tables.nf4_bucket);
    word |= static_cast<uint32_t>(pack_codes(c0, c1)) << (8 * j);
  }
  packed[part] = word;
  if (part % kPartsPerBlock == 0) absmax[part / kPartsPerBlock] = amax;
}

// One warp per group of 256 blocks: lane l adds blocks l, l + 32, ... in float64, then the
// butterfly.
__global__ void group_sums_kernel(const float* __restrict__ absmax, int64_t nblocks,
                                  int64_t groups, double* __restrict__ sums) {
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (g >= groups) return;  // whole warps leave together
  double acc = 0.0;
  for (int j = 0; j < kScalerBlockSize / kWarp; ++j) {
    const int64_t i = g * kScalerBlockSize + j * kWarp + lane;
    if (i < nblocks) acc += static_cast<double>(absmax[i]);
  }
  acc = warp_sum(acc);
  if (lane == 0) sums[g] = acc;
}

// A single warp: lane l adds group sums l, l + 32, ...; butterfly; mean as float32.
__global__ void offset_kernel(const double* __restrict__ sums, int64_t groups, int64_t nblocks,
                              float* __restrict__ offset) {
  double acc = 0.0;
  // One warp alone, with a load per step (1024 groups for a 4096 x 4096 weight): unrolled, several
  // loads are in flight at once; the additions keep their order.
#pragma unroll 8
  for (int64_t g = threadIdx.x; g < groups; g += kWarp) acc += sums[g];
  acc = warp_sum(acc);
  if (threadIdx.x == 0) *offset = static_cast<float>(acc / static_cast<double>(nblocks));
}

// One warp per group of 256 blocks: scale = max |absmax - offset|, then 8-bit nearest codes.
__global__ void absmax_codes_kernel(const float* __restrict__ absmax, int64_t nblocks,
                                    int64_t groups, const float* __restrict__ offset,
                                    uint8_t* __restrict__ codes, float* __restrict__ scales) {
  __shared__ CodeTables tables;
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const bool active = g < groups;  // whole warps
  constexpr int kPerLane = kScalerBlockSize / kWarp;
  float centered[kPerLane] = {};
  float m = 0.0f;
  if (active) {  // the group's scale, before the tables are loaded: only the codes need them
    const float off = *offset;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = g * kScalerBlockSize + j * kWarp + lane;
      centered[j] = i < nblocks ? __fsub_rn(absmax[i], off) : 0.0f;
      m = fmaxf(m, fabsf(centered[j]));
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  }
  load_tables<true>(tables);
  __syncthreads();
  if (!active) return;
  if (lane == 0) scales[g] = m;
  const float inv = inverse_absmax(m);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t i = g * kScalerBlockSize + j * kWarp + lane;
    if (i < nblocks) {
      codes[i] = static_cast<uint8_t>(absmax_code(clamp_unit(__fmul_rn(centered[j], inv)), tables.map_mid));
    }
  }
}

// Rows [0, rows) x columns [col0, col0 + cols) of a [*, K] NF4 weight (starting at row0) into a
// dense [rows, cols] tile; 8 weights (one 32-bit word) per thread and step, kWordsPerThread steps
// a CTA apart, so that the CTA's table setup and barrier serve 8 KB of codes, not 2 KB. A thread
// issues all its loads (codes, absmax codes and scales) before the tables are loaded, so that
// their round trip and the barrier do not come first. Needs K, col0 and cols multiples of 8, so
// that 8 weights share a block and a word.
template <typename T>
__global__ void dequantize_tile_kernel(Nf4View w, int64_t K, int64_t row0, int64_t rows,
                                       int64_t col0, int64_t cols, T* __restrict__ out) {
  __shared__ CodeTables tables;
  const int64_t words_per_row = cols / 8;
  const int64_t words = rows * words_per_row;
  const bool narrow = words <= UINT32_MAX;  // 32-bit division (the usual case) is far cheaper
  const int64_t first =
      static_cast<int64_t>(blockIdx.x) * blockDim.x * kWordsPerThread + threadIdx.x;
  // Word t of the tile: its row r and column c in the tile (computed twice rather than held in
  // registers across the barrier).
  const auto row_of = [&](int64_t t) -> int64_t {
    return rows == 1 ? 0
           : narrow  ? static_cast<uint32_t>(t) / static_cast<uint32_t>(words_per_row)
                     : t / words_per_row;
  };
  uint32_t word[kWordsPerThread] = {}, code[kWordsPerThread] = {};
  float scale[kWordsPerThread] = {};
#pragma unroll
  for (int i = 0; i < kWordsPerThread; ++i) {
    const int64_t t = first + static_cast<int64_t>(i) * blockDim.x;  // a warp: consecutive words
    if (t >= words) break;
    const int64_t r = row_of(t), c = (t - r * words_per_row) * 8;
    const int64_t e = (row0 + r) * K + col0 + c;  // flat index of the first of the 8 weights
    word[i] = reinterpret_cast<const uint32_t*>(w.packed)[e / 8];
    code[i] = w.absmax_codes[e / kBlockSize];
    scale[i] = w.absmax_scales[e / kBlockSize / kScalerBlockSize];
  }
  const float offset = *w.absmax_offset;
  load_tables<false>(tables);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kWordsPerThread; ++i) {
    const int64_t t = first + static_cast<int64_t>(i) * blockDim.x;
    if (t >= words) return;
    const int64_t r = row_of(t), c = (t - r * words_per_row) * 8;
    float v[8];
    decode8(word[i], decode_absmax(tables.map[code[i]], scale[i], offset), tables.nf4, v);
    store8(out + r * cols + c, v);
  }
}

// The same for any K and range, one thread per weight (the slow path).
template <typename T>
__global__ void dequantize_tile_scalar_kernel(Nf4View w, int64_t K, int64_t row0, int64_t rows,
                                              int64_t col0, int64_t cols, T* __restrict__ out) {
  __shared__ CodeTables tables;
  load_tables<false>(tables);
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * cols) return;
  const int64_t e = (row0 + t / cols) * K + col0 + t % cols;
  const uint8_t byte = w.packed[e / 2];
  const int code = e % 2 == 0 ? even_code(byte) : odd_code(byte);
  out[t] = from_float<T>(__fmul_rn(tables.nf4[code], block_absmax(w, e / kBlockSize, tables)));
}

// ---- launchers ------------------------------------------------------------------------------

// Quantizing `nblocks` NF4 blocks of w (8-element aligned) takes two launchers, in order on one
// stream; between them the op copies the offset back to check it, while the second runs.
// First: packed codes and float32 absmax per block, the group sums of the absmax in float64
// (`sums`, one per group of 256 blocks) and their mean (`offset`, one float), which is not finite
// when a weight is NaN or Inf. Three kernels.
template <typename T>
void launch_quantize_codes(const T* w, int64_t nblocks, uint32_t* packed, float* absmax,
                           double* sums, float* offset, cudaStream_t stream) {
  const int64_t groups = ceil_div(nblocks, kScalerBlockSize);
  launch(quantize_blocks_kernel<T>, ceil_div(nblocks * kPartsPerBlock, kCodecThreads),
         kCodecThreads, stream, w, nblocks, packed, absmax);
  const int64_t group_blocks = ceil_div(groups * kWarp, kCodecThreads);  // a warp per group
  launch(group_sums_kernel, group_blocks, kCodecThreads, stream, absmax, nblocks, groups, sums);
  launch(offset_kernel, 1, kWarp, stream, sums, groups, nblocks, offset);
}

// Second: the double-quantized absmax (8-bit codes, a float32 scale per group of 256 blocks), from
// the first's absmax and offset. One kernel.
inline void launch_quantize_absmax(const float* absmax, int64_t nblocks, const float* offset,
                                   uint8_t* absmax_codes, float* absmax_scales,
                                   cudaStream_t stream) {
  const int64_t groups = ceil_div(nblocks, kScalerBlockSize);
  launch(absmax_codes_kernel, ceil_div(groups * kWarp, kCodecThreads), kCodecThreads, stream,
         absmax, nblocks, groups, offset, absmax_codes, absmax_scales);
}

template <typename T>
void launch_dequantize_tile(const Nf4View& w, int64_t K, int64_t row0, int64_t rows,
                            int64_t col0, int64_t cols, T* out, cudaStream_t stream) {
  const bool by_words = K % 8 == 0 && col0 % 8 == 0 && cols % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(w.packed) % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(out) % (8 * sizeof(T)) == 0;
  if (by_words) {
    const int64_t words = rows * (cols / 8);
    launch(dequantize_tile_kernel<T>, ceil_div(words, kCodecThreads * kWordsPerThread),
           kCodecThreads, stream, w, K, row0, rows, col0, cols, out);
  } else {
    launch(dequantize_tile_scalar_kernel<T>, ceil_div(rows * cols, kCodecThreads), kCodecThreads,
           stream, w, K, row0, rows, col0, cols, out);
  }
}

}  // namespace qlora::cuda
