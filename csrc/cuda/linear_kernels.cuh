// The CUDA kernels of linear_nf4 (forward) and linear_nf4_grad_input (backward) for small M, and
// their launchers, on raw pointers (no torch): linear.cu wraps them as the ops (and picks the
// path per call, see its comment), cpp_tests/test_cuda_emulated.cpp runs the same code on the CPU
// (cpp_tests/cuda_emulator.h). The includer first declares launch() (see codec_kernels.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "nf4_device.cuh"

namespace qlora::cuda {

constexpr int kLinearThreads = 256;
constexpr int64_t kMaxFusedRows = 16;  // M above this takes the tiled cuBLAS path
constexpr int kColsRows = 8;           // rows of grad_y per backward pass (8 x 8 accumulators)
constexpr int64_t kRowsPerSlice = 128; // rows of W one backward thread walks before a partial sum
constexpr int64_t kMaxSlices = 256;    // more rows per slice beyond this: the partial sums' buffer
                                       // stays at most 256 x M x K floats (64 MB at M 16, K 4096)
constexpr int kMmaRows = 32;           // rows of W per CTA of the tensor-core kernel (two A tiles)
// Its warps, which split the reduction (every 16th NF4 block each): at N = 4096 the kernel has 128
// CTAs, one per SM, so the loads in flight per SM (which set the speed at small M) are those of one
// CTA's warps; 16 keep twice the bytes in flight of 8. Untuned: no GPU measured yet.
constexpr int kMmaWarps = 16;

// ---- kernels --------------------------------------------------------------------------------

// acc[m] += x[m, k .. k + 8) . wv for m < M. The 8 products of a step are summed first: the
// chain into acc[m] is K / 256 long (not K / 32), which keeps float32 rounding error near cuBLAS's.
template <typename T, int MAXM>
__device__ __forceinline__ void accumulate8(float (&acc)[MAXM], const float (&wv)[8], const T* x,
                                            int64_t K, int64_t k, int M) {
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m < M) {
      float xv[8];
      load8(x + m * K + k, xv);
      float step = xv[0] * wv[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) step = fmaf(xv[j], wv[j], step);
      acc[m] += step;
    }
  }
}

// y[m, n] = the sum of acc[m] over the warp (+ bias[n]), for m < M; lane 0 writes.
template <typename T, int MAXM>
__device__ __forceinline__ void store_warp_sums(const float (&acc)[MAXM], int lane, int64_t n,
                                                int64_t N, int M, const T* bias, T* y) {
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0 && m < M) y[m * N + n] = from_float<T>(bias ? s + to_float(bias[n]) : s);
  }
}

// Chunk c of row n of W as the wide forward reads it: 16 bytes of codes (32 weights, half an NF4
// block) and the block's absmax code and scale, loaded from global memory in one go.
struct WideChunk {
  uint4 codes;
  uint32_t absmax_code;
  float scale;
};

__device__ __forceinline__ WideChunk load_chunk(const Nf4View& w, int64_t n, int64_t K, int64_t c) {
  const int64_t b = (n * K + c * 32) / kBlockSize;
  return {reinterpret_cast<const uint4*>(w.packed + n * K / 2)[c], w.absmax_codes[b],
          w.absmax_scales[b / kScalerBlockSize]};
}

// acc[m] += x[m, 32 c .. 32 c + 32) . (the chunk's weights) for m < M.
template <typename T, int MAXM>
__device__ __forceinline__ void accumulate_chunk(float (&acc)[MAXM], const WideChunk& chunk,
                                                 float offset, const CodeTables& tables,
                                                 const T* x, int64_t K, int64_t c, int M) {
  const float absmax = decode_absmax(tables.map[chunk.absmax_code], chunk.scale, offset);
  const uint32_t words[4] = {chunk.codes.x, chunk.codes.y, chunk.codes.z, chunk.codes.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float wv[8];
    decode8(words[i], absmax, tables.nf4, wv);
    accumulate8<T, MAXM>(acc, wv, x, K, c * 32 + i * 8, M);
  }
}

// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < M <= MAXM, K % 8 == 0: one warp per row n
// of W, one 32-bit word of codes (8 weights) per lane and step; with kWide (K % 32 == 0, 16-byte
// aligned codes) 16 bytes of codes (32 weights, half an NF4 block, one absmax) per lane and step.
// A GPU keeps only so many loads in flight per SM, and at M = 1 the bytes in flight set the speed:
// 16-byte loads carry four times those of 4-byte ones. And at M = 1 the kernel takes a few
// microseconds, so the wide one issues each lane's first kChunksAhead chunks (all of them for
// K = 4096) before it loads the tables: the round trip of the tables' loads and the barrier no
// longer comes before the first load of codes.
constexpr int kChunksAhead = 4;

template <typename T, int MAXM, bool kWide>
__global__ void gemv_rows_kernel(Nf4View w, int64_t N, int64_t K, const T* __restrict__ x, int M,
                                 const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ CodeTables tables;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  float acc[MAXM] = {};
  if constexpr (kWide) {
    const int64_t chunks = K / 32;
    WideChunk ahead[kChunksAhead] = {};
#pragma unroll
    for (int i = 0; i < kChunksAhead; ++i) {
      const int64_t c = lane + i * kWarp;
      if (n < N && c < chunks) ahead[i] = load_chunk(w, n, K, c);
    }
    const float offset = *w.absmax_offset;
    load_tables<false>(tables);
    __syncthreads();
    if (n >= N) return;  // whole warps leave together
#pragma unroll
    for (int i = 0; i < kChunksAhead; ++i) {
      const int64_t c = lane + i * kWarp;
      if (c < chunks) accumulate_chunk<T, MAXM>(acc, ahead[i], offset, tables, x, K, c, M);
    }
#pragma unroll 2
    for (int64_t c = lane + kChunksAhead * kWarp; c < chunks; c += kWarp) {
      accumulate_chunk<T, MAXM>(acc, load_chunk(w, n, K, c), offset, tables, x, K, c, M);
    }
  } else {
    load_tables<false>(tables);
    __syncthreads();
    if (n >= N) return;  // whole warps leave together
    const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
    for (int64_t k = lane * 8; k < K; k += kWarp * 8) {
      const int64_t e = n * K + k;
      float wv[8];
      decode8(words[e / 8], block_absmax(w, e / kBlockSize, tables), tables.nf4, wv);
      accumulate8<T, MAXM>(acc, wv, x, K, k, M);
    }
  }
  store_warp_sums<T, MAXM>(acc, lane, n, N, M, bias, y);
}

// ---- tensor-core forward for small M ---------------------------------------------------------
//
// y^T = W x^T in mma.m16n8k16 steps: A = 16 rows of W (16 x 16, decoded to T in registers),
// B = x^T (16 x 8: up to 8 rows of x), D in float32. The reduction index is permuted within each
// 64-weight NF4 block (the sum does not care about order, and A and B use the same permutation) so
// that every operand comes from whole loads: in k-step s (0..3) of a block, lane (g, t) =
// (lane / 4, lane % 4) puts in A columns 2t, 2t+1 the two weights of byte s of word t of the
// block's 32 code bytes (weights 8t + 2s, 8t + 2s + 1; the even one is the high nibble and the
// low half of the register) and in columns 2t+8, 2t+9 those of byte s of word t + 4 (weights
// 32 + 8t + 2s, +1). B's rows 2t, 2t+1 and 2t+8, 2t+9 are then 32-bit word s of the lane's 16-byte
// loads of x at weights 8t and 32 + 8t. A warp reads 32 whole rows' blocks (32 bytes each) and x's
// rows' 128 bytes per block.

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);  // low half: lo
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The two weights of byte `s` of `word`, times the block's absmax (as the dequantize op rounds
// them), as one register of two T.
template <typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, int s, float absmax,
                                                const float* nf4) {
  const uint32_t byte = (word >> (8 * s)) & 0xffu;
  return pack2<T>(__fmul_rn(nf4[byte >> 4], absmax), __fmul_rn(nf4[byte & 15u], absmax));
}

// d += A B for one m16n8k16 step, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(QLORA_CUDA_EMULATION)
  emulated_mma_m16n8k16<T>(d, a, b0, b1);  // the C++ tests on the CPU: cpp_tests/cuda_emulator.h
#else
  __trap();  // not built for this GPU: mma_kernel_runs() keeps the launcher away
#endif
}

// What a lane reads for one block: words t and t+4 of its four rows of W (two A tiles, rows g and
// g+8 of each) with their absmax, and its 16-byte pieces of x (row mt*8 + g of each m tile).
template <int MT>
struct MmaStage {
  uint32_t lo[2][2], hi[2][2];  // [A tile][row half]
  float absmax[2][2];
  uint4 x_lo[MT], x_hi[MT];
};

// kMapInGlobal: the absmax map is read from global memory (the block's first stage, loaded before
// its tables are in shared memory), else from the shared tables; the values are the same.
template <typename T, int MT, bool kMapInGlobal = false>
__device__ __forceinline__ void load_mma_stage(MmaStage<MT>& st, const Nf4View& w, int64_t N,
                                               int64_t K, int64_t n_base, int64_t block,
                                               const T* x, int M, const CodeTables& tables,
                                               int g, int t) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
#pragma unroll
  for (int a = 0; a < 2; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n_base + 16 * a + 8 * h + g;
      if (n < N) {
        const int64_t word0 = (n * K + block * kBlockSize) / 8;
        st.lo[a][h] = words[word0 + t];
        st.hi[a][h] = words[word0 + t + 4];
        const int64_t b = (n * K) / kBlockSize + block;
        const uint32_t code = w.absmax_codes[b];
        const float map =
            kMapInGlobal ? __uint_as_float(__ldg(&g_map_bits[code])) : tables.map[code];
        st.absmax[a][h] =
            decode_absmax(map, w.absmax_scales[b / kScalerBlockSize], *w.absmax_offset);
      } else {  // past the last row: zero weights, results not stored
        st.lo[a][h] = st.hi[a][h] = 0u;
        st.absmax[a][h] = 0.0f;
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = mt * 8 + g;
    if (m < M) {
      const T* p = x + m * K + block * kBlockSize + 8 * t;
      st.x_lo[mt] = *reinterpret_cast<const uint4*>(p);
      st.x_hi[mt] = *reinterpret_cast<const uint4*>(p + 32);
    } else {
      st.x_lo[mt] = st.x_hi[mt] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < M <= 8 * MT, K % 64 == 0: CTA = kMmaRows rows
// of W, its warps taking every kMmaWarps-th block of the reduction, summed in a fixed order. Each
// warp's first stage is loaded before the tables (as in gemv_rows_kernel).
template <typename T, int MT>
__global__ void __launch_bounds__(kMmaWarps * kWarp) gemv_rows_mma_kernel(
    Nf4View w, int64_t N, int64_t K, const T* __restrict__ x, int M, const T* __restrict__ bias,
    T* __restrict__ y) {
  __shared__ CodeTables tables;
  __shared__ float partial[kMmaWarps][2][MT][4][kWarp];  // [warp][A tile][m tile][d][lane]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t blocks = K / kBlockSize;

  float acc[2][MT][4] = {};
  MmaStage<MT> cur{};
  if (warp < blocks) load_mma_stage<T, MT, true>(cur, w, N, K, n_base, warp, x, M, tables, g, t);
  load_tables<false>(tables);
  __syncthreads();
  for (int64_t block = warp; block < blocks; block += kMmaWarps) {
    MmaStage<MT> next{};  // the next block's loads are in flight while this one is multiplied
    if (block + kMmaWarps < blocks) {
      load_mma_stage<T, MT>(next, w, N, K, n_base, block + kMmaWarps, x, M, tables, g, t);
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const uint32_t A[4] = {
            decode_pair<T>(cur.lo[a][0], s, cur.absmax[a][0], tables.nf4),   // row g, cols 2t..
            decode_pair<T>(cur.lo[a][1], s, cur.absmax[a][1], tables.nf4),   // row g + 8
            decode_pair<T>(cur.hi[a][0], s, cur.absmax[a][0], tables.nf4),   // row g, cols 2t+8..
            decode_pair<T>(cur.hi[a][1], s, cur.absmax[a][1], tables.nf4)};  // row g + 8
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t b_lo[4] = {cur.x_lo[mt].x, cur.x_lo[mt].y, cur.x_lo[mt].z, cur.x_lo[mt].w};
          const uint32_t b_hi[4] = {cur.x_hi[mt].x, cur.x_hi[mt].y, cur.x_hi[mt].z, cur.x_hi[mt].w};
          mma_m16n8k16<T>(acc[a][mt], A, b_lo[s], b_hi[s]);
        }
      }
    }
    cur = next;
  }

#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][a][mt][i][lane] = acc[a][mt][i];
  __syncthreads();
  // D element i of a lane: row g + 8 * (i / 2) of the A tile (a row n of W), column 2t + i % 2
  // of the m tile (a row m of x). Each thread of the CTA writes some of the 2 x MT x 4 x 32.
  for (int idx = threadIdx.x; idx < 2 * MT * 4 * kWarp; idx += blockDim.x) {
    const int l = idx % kWarp, i = (idx / kWarp) % 4, mt = (idx / (4 * kWarp)) % MT,
              a = idx / (4 * kWarp * MT);
    const int64_t n = n_base + 16 * a + 8 * (i / 2) + l / 4;
    const int m = mt * 8 + 2 * (l % 4) + i % 2;
    if (n >= N || m >= M) continue;
    float sum = 0.0f;
    for (int wi = 0; wi < kMmaWarps; ++wi) sum += partial[wi][a][mt][i][l];
    y[m * N + n] = from_float<T>(bias ? sum + to_float(bias[n]) : sum);
  }
}

// partial[slice, m, k] = sum over the slice's rows n of gy[m, n] W[n, k], for MAXM rows of gy
// (m < M) and the 8 columns k of this thread; slices of rows_per_slice rows give parallelism over
// N, and sum_slices_kernel adds them up in a fixed order.
template <typename T, int MAXM>
__global__ void gemv_cols_kernel(Nf4View w, int64_t N, int64_t K, const T* __restrict__ gy,
                                 int64_t ldgy, int M, int64_t rows_per_slice,
                                 float* __restrict__ partial, int64_t ld_slice) {
  __shared__ CodeTables tables;
  load_tables<false>(tables);
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= K / 8) return;
  const int64_t k = t * 8;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t n1 = min(N, n0 + rows_per_slice);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  float acc[MAXM][8] = {};
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t e = n * K + k;
    float wv[8];
    decode8(words[e / 8], block_absmax(w, e / kBlockSize, tables), tables.nf4, wv);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        const float g = to_float(gy[m * ldgy + n]);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][j] = fmaf(g, wv[j], acc[m][j]);
      }
    }
  }
  float* out = partial + blockIdx.y * ld_slice + k;
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m < M) store8(out + m * K, acc[m]);
  }
}

// gx[i] = sum over slices s (in order) of partial[s * ld_slice + i], for i < count. Summed in
// double: up to 256 slices in a row would otherwise add up to 255 roundings to each output, more
// than the blocked sums of cuBLAS (the tests' yardstick) make; the slices' reads dominate anyway.
template <typename T>
__global__ void sum_slices_kernel(const float* __restrict__ partial, int64_t slices,
                                  int64_t ld_slice, int64_t count, T* __restrict__ gx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  double s = 0.0;
  for (int64_t sl = 0; sl < slices; ++sl) s += partial[sl * ld_slice + i];
  gx[i] = from_float<T>(static_cast<float>(s));
}

// ---- launchers ------------------------------------------------------------------------------

template <typename T, int MAXM>
void launch_gemv_rows(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias,
                      T* y, cudaStream_t stream) {
  const bool wide = K % 32 == 0 && reinterpret_cast<uintptr_t>(w.packed) % 16 == 0;
  const auto kernel = wide ? gemv_rows_kernel<T, MAXM, true> : gemv_rows_kernel<T, MAXM, false>;
  launch(kernel, ceil_div(N * kWarp, kLinearThreads), kLinearThreads, stream, w, N, K, x, M, bias,
         y);
}

template <typename T>
void gemv_rows(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
               cudaStream_t stream) {
  if (M <= 1) return launch_gemv_rows<T, 1>(w, N, K, x, M, bias, y, stream);
  if (M <= 2) return launch_gemv_rows<T, 2>(w, N, K, x, M, bias, y, stream);
  if (M <= 4) return launch_gemv_rows<T, 4>(w, N, K, x, M, bias, y, stream);
  if (M <= 8) return launch_gemv_rows<T, 8>(w, N, K, x, M, bias, y, stream);
  return launch_gemv_rows<T, 16>(w, N, K, x, M, bias, y, stream);
}

// The tensor-core forward (M <= 16, K % 64 == 0, T bf16 or fp16), on a GPU of sm_80 or newer
// (linear.cu checks): its template for M rows of x is mma_m_tiles(M).
inline int mma_m_tiles(int M) { return M <= 8 ? 1 : 2; }

template <typename T>
void launch_gemv_rows_mma(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias,
                          T* y, cudaStream_t stream) {
  const auto kernel = mma_m_tiles(M) == 1 ? gemv_rows_mma_kernel<T, 1> : gemv_rows_mma_kernel<T, 2>;
  launch(kernel, ceil_div(N, kMmaRows), kMmaWarps * kWarp, stream, w, N, K, x, M, bias, y);
}

// The backward splits the N rows of W into slices, each summed by its own threads into a float32
// partial buffer of slices x M x K, then adds the slices up in order.
struct ColsSlices {
  int64_t rows_per_slice, slices;
};
inline ColsSlices cols_slices(int64_t N) {
  // A vocabulary-sized N (128256 rows) would otherwise need 1002 slices: 262 MB at M 16, K 4096.
  const int64_t rows_per_slice = std::max(kRowsPerSlice, ceil_div(N, kMaxSlices));
  return {rows_per_slice, ceil_div(N, rows_per_slice)};
}

template <typename T, int MAXM>
void launch_gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t ldgy, int M,
                      int64_t rows_per_slice, float* partial, int64_t ld_slice,
                      cudaStream_t stream) {
  const dim3 grid(ceil_div(K / 8, kLinearThreads), ceil_div(N, rows_per_slice));
  launch(gemv_cols_kernel<T, MAXM>, grid, kLinearThreads, stream, w, N, K, gy, ldgy, M,
         rows_per_slice, partial, ld_slice);
}

// gx = gy W for M <= kMaxFusedRows rows of gy ([M, N]), K % 8 == 0; `partial` holds
// cols_slices(N).slices * M * K floats.
template <typename T>
void gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t M, T* gx,
               float* partial, cudaStream_t stream) {
  const auto [rows_per_slice, slices] = cols_slices(N);
  const int64_t ld_slice = M * K;
  for (int64_t m0 = 0; m0 < M; m0 += kColsRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kColsRows, M - m0));
    const T* g = gy + m0 * N;
    float* out = partial + m0 * K;
    const int64_t rps = rows_per_slice;
    if (rows <= 1) launch_gemv_cols<T, 1>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else if (rows <= 2) launch_gemv_cols<T, 2>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else if (rows <= 4) launch_gemv_cols<T, 4>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else launch_gemv_cols<T, 8>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
  }
  launch(sum_slices_kernel<T>, ceil_div(ld_slice, kLinearThreads), kLinearThreads, stream, partial,
         slices, ld_slice, ld_slice, gx);
}

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Rows (forward) or columns (backward) of W per tile of the large-M path, for `tiles` tiles over
// `extent`: multiples of 64 for the GEMMs; a weight under 128 along it goes in multiples of 8
// (the decoder's word), so that it too is decoded in two tiles, not whole, from 16 up.
inline int64_t tile_extent(int64_t extent, int64_t tiles) {
  return std::min(extent, round_up(ceil_div(extent, tiles), extent >= 128 ? 64 : 8));
}

// How many tiles, kMinTiles to kMaxTiles, the large-M path decodes W in for an [M, out_cols]
// product on a GPU of `sms` SMs (never the whole dense W: the workspace is one tile, up to half of
// W, e.g. 0.98 GiB of bf16 for a 128256 x 8192 lm_head at 2 tiles): the count whose cuBLAS calls
// (one per tile) lose least to wave quantization, judged under both output tiles of cuBLAS's large
// kernels, 128 x 128 and 128 x 256 (a GEMM of 1.3 waves runs its last wave a third full); on a
// tie, fewer (larger) GEMMs. At M = 2048 on 132 SMs: 2 tiles for 4096 output columns (3 would be
// GEMMs of 1.33 waves) and for 11008. Untuned: no GPU has measured it (linear.cu lets
// QLORA_CUDA_LARGE_M_TILES override it for that).
constexpr int kMinTiles = 2, kMaxTiles = 4;

inline int large_m_tiles(int64_t M, int64_t out_cols, int sms) {
  int best = kMinTiles;
  double best_efficiency = -1.0;
  for (int tiles = kMinTiles; tiles <= kMaxTiles; ++tiles) {
    const int64_t cols = tile_extent(out_cols, tiles);
    double efficiency = 1.0;  // the lower of the two tile shapes': busy SM-waves / SM-waves
    for (const int64_t tile_n : {128, 256}) {
      double waves = 0.0, whole_waves = 0.0;
      for (int64_t c0 = 0; c0 < out_cols; c0 += cols) {
        const double w = static_cast<double>(ceil_div(M, 128) *
                                             ceil_div(std::min(cols, out_cols - c0), tile_n)) / sms;
        waves += w;
        whole_waves += std::ceil(w);
      }
      efficiency = std::min(efficiency, waves / whole_waves);
    }
    if (efficiency > best_efficiency + 1e-9) {
      best = tiles;
      best_efficiency = efficiency;
    }
  }
  return best;
}

}  // namespace qlora::cuda
