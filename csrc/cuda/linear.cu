// CUDA linear_nf4 and its backward.
//
// M <= 16 rows (bandwidth-bound: the 4-bit weight is the traffic): fused kernels read the packed
// codes straight from global memory, decode both absmax levels in-kernel with the tables in
// shared memory, and accumulate in float32. The forward for bf16/fp16 x with at least
// mma_min_rows() rows (in_features % 64 == 0, sm_80+) runs on tensor cores: W decoded to x's type
// in registers, mma.m16n8k16 against up to 16 rows of x. A float32 FMA per weight and row of x
// would cost more than reading the weight once M reaches a few rows; the tensor cores do not.
// Fewer rows, float32 x and the backward use CUDA-core kernels, one 32-bit word (8 weights) per
// lane and step.
// M > 16 rows (compute-bound): W is decoded a half to a quarter at a time into a workspace of x's
// dtype and multiplied by cuBLAS (at::mm_out into the matching slice of the output); no whole
// dense W (see large_m_tiles).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "../op_checks.h"
#include "launchers.h"
#include "nf4_device.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxFusedRows = 16;  // M above this takes the tiled cuBLAS path
constexpr int kColsRows = 8;           // rows of grad_y per backward pass (8 x 8 accumulators)
constexpr int64_t kRowsPerSlice = 128; // rows of W one backward thread walks before a partial sum
constexpr int64_t kMaxSlices = 256;    // more rows per slice beyond this: the partial sums' buffer
                                       // stays at most 256 x M x K floats (64 MB at M 16, K 4096)
constexpr int kMaxTiles = 4;           // the large-M path decodes W in 2 to this many tiles
constexpr int kMmaMinRows = 5;         // default of mma_min_rows(); untuned (no GPU measured yet)
constexpr int kMmaRows = 32;           // rows of W per CTA of the tensor-core kernel (two A tiles)
constexpr int kMmaWarps = 8;           // its warps, which split the reduction (every 8th block)

// ---- kernels --------------------------------------------------------------------------------

// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < M <= MAXM: one warp per row n of W.
template <typename T, int MAXM>
__global__ void gemv_rows_kernel(Nf4View w, int64_t N, int64_t K, const T* __restrict__ x, int M,
                                 const T* __restrict__ bias, T* __restrict__ y) {
  __shared__ CodeTables tables;
  load_tables<false>(tables);
  __syncthreads();
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;  // whole warps leave together
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  float acc[MAXM] = {};
  for (int64_t k = lane * 8; k < K; k += kWarp * 8) {
    const int64_t e = n * K + k;
    float wv[8];
    decode8(words[e / 8], block_absmax(w, e / kBlockSize, tables), tables.nf4, wv);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        float xv[8];
        load8(x + m * K + k, xv);
        // The 8 products of a step are summed first: the chain into acc[m] is K / 256 long
        // (not K / 32), which keeps float32 rounding error near cuBLAS's.
        float step = xv[0] * wv[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) step = fmaf(xv[j], wv[j], step);
        acc[m] += step;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0 && m < M) y[m * N + n] = from_float<T>(bias ? s + to_float(bias[n]) : s);
  }
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

template <typename T, int MT>
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
        st.absmax[a][h] = block_absmax(w, (n * K) / kBlockSize + block, tables);
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
// of W, its warps taking every kMmaWarps-th block of the reduction, summed in a fixed order.
template <typename T, int MT>
__global__ void __launch_bounds__(kMmaWarps * kWarp) gemv_rows_mma_kernel(
    Nf4View w, int64_t N, int64_t K, const T* __restrict__ x, int M, const T* __restrict__ bias,
    T* __restrict__ y) {
  __shared__ CodeTables tables;
  __shared__ float partial[kMmaWarps][2][MT][4][kWarp];  // [warp][A tile][m tile][d][lane]
  load_tables<false>(tables);
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t blocks = K / kBlockSize;

  float acc[2][MT][4] = {};
  MmaStage<MT> cur{};
  if (warp < blocks) load_mma_stage<T, MT>(cur, w, N, K, n_base, warp, x, M, tables, g, t);
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

// gx[i] = sum over slices s (in order) of partial[s * ld_slice + i], for i < count.
template <typename T>
__global__ void sum_slices_kernel(const float* __restrict__ partial, int64_t slices,
                                  int64_t ld_slice, int64_t count, T* __restrict__ gx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float s = 0.0f;
  for (int64_t sl = 0; sl < slices; ++sl) s += partial[sl * ld_slice + i];
  gx[i] = from_float<T>(s);
}

// ---- launchers ------------------------------------------------------------------------------

template <typename T, int MAXM>
void launch_gemv_rows(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias,
                      T* y, cudaStream_t stream) {
  gemv_rows_kernel<T, MAXM><<<ceil_div(N * kWarp, kThreads), kThreads, 0, stream>>>(w, N, K, x, M,
                                                                                    bias, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// The smallest M whose bf16/fp16 small-M forward takes the tensor-core kernel: kMmaMinRows, or
// the environment's QLORA_CUDA_MMA_MIN_ROWS (read once; 17 or more: never), for measuring the
// crossover with bench/linear.py on a GPU.
int mma_min_rows() {
  static const int rows = [] {
    const char* s = std::getenv("QLORA_CUDA_MMA_MIN_ROWS");
    if (s == nullptr || *s == '\0') return static_cast<int>(kMmaMinRows);
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && v >= 1 && v <= 1000000,
                      "qlora: environment variable QLORA_CUDA_MMA_MIN_ROWS must be a whole number "
                      ">= 1 (17 or more: no tensor-core kernel); got '", s, "'");
    return static_cast<int>(v);
  }();
  return rows;
}

// Whether the code of the tensor-core kernel that runs on the current GPU was compiled for
// compute_80 or newer: a build for an older arch holds only a trap, also when the driver JITs its
// PTX for a newer GPU (so the PTX version counts, not the binary's).
template <typename T, int MT>
bool mma_kernel_runs() {
  const bool no_earlier_error = cudaPeekAtLastError() == cudaSuccess;
  cudaFuncAttributes attrs{};
  if (cudaFuncGetAttributes(&attrs, gemv_rows_mma_kernel<T, MT>) != cudaSuccess) {
    // No image for this GPU: clear our error, or the next launch check would report it (an
    // earlier one is left for its own check).
    if (no_earlier_error) (void)cudaGetLastError();
    return false;
  }
  return attrs.ptxVersion >= 80;
}

// mma_kernel_runs, asked once per device: one process may drive GPUs of different archs, and a
// build for "75;90" runs the trap on a T4 and the kernel on an H100.
template <typename T, int MT>
bool mma_kernel_runs_on_current_device() {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int8_t>, kDevices> known{};  // 0 not asked yet, 1 runs, 2 not
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kDevices) return mma_kernel_runs<T, MT>();
  int8_t state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    state = mma_kernel_runs<T, MT>() ? 1 : 2;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

template <typename T, int MT>
bool launch_gemv_rows_mma(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias,
                          T* y, cudaStream_t stream) {
  if (!mma_kernel_runs_on_current_device<T, MT>()) return false;
  gemv_rows_mma_kernel<T, MT><<<ceil_div(N, kMmaRows), kMmaWarps * kWarp, 0, stream>>>(w, N, K, x,
                                                                                     M, bias, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The tensor-core forward where it applies (see the file comment); false: use gemv_rows.
template <typename T>
bool gemv_rows_mma(const Nf4View& w, int64_t N, int64_t K, const T* x, int M, const T* bias, T* y,
                   cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    if (M < mma_min_rows() || K % kBlockSize != 0) return false;
    if (M <= 8) return launch_gemv_rows_mma<T, 1>(w, N, K, x, M, bias, y, stream);
    return launch_gemv_rows_mma<T, 2>(w, N, K, x, M, bias, y, stream);
  }
}

template <typename T, int MAXM>
void launch_gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t ldgy, int M,
                      int64_t rows_per_slice, float* partial, int64_t ld_slice,
                      cudaStream_t stream) {
  const dim3 grid(ceil_div(K / 8, kThreads), ceil_div(N, rows_per_slice));
  gemv_cols_kernel<T, MAXM><<<grid, kThreads, 0, stream>>>(w, N, K, gy, ldgy, M, rows_per_slice,
                                                           partial, ld_slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t M, T* gx,
               const at::TensorOptions& float_options, cudaStream_t stream) {
  // A vocabulary-sized N (128256 rows) would otherwise need 1002 slices: 262 MB at M 16, K 4096.
  const int64_t rows_per_slice = std::max(kRowsPerSlice, ceil_div(N, kMaxSlices));
  const int64_t slices = ceil_div(N, rows_per_slice);
  const int64_t ld_slice = M * K;
  at::Tensor partial = at::empty({slices * ld_slice}, float_options);
  float* p = partial.mutable_data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kColsRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kColsRows, M - m0));
    const T* g = gy + m0 * N;
    float* out = p + m0 * K;
    const int64_t rps = rows_per_slice;
    if (rows <= 1) launch_gemv_cols<T, 1>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else if (rows <= 2) launch_gemv_cols<T, 2>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else if (rows <= 4) launch_gemv_cols<T, 4>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
    else launch_gemv_cols<T, 8>(w, N, K, g, N, rows, rps, out, ld_slice, stream);
  }
  sum_slices_kernel<T><<<ceil_div(ld_slice, kThreads), kThreads, 0, stream>>>(p, slices, ld_slice,
                                                                             ld_slice, gx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Rows (forward) or columns (backward) of W per tile of the large-M path, for `tiles` tiles over
// `extent`: multiples of 64 for the GEMMs; a weight under 128 along it goes in multiples of 8
// (the decoder's word), so that it too is decoded in two tiles, not whole, from 16 up.
int64_t tile_extent(int64_t extent, int64_t tiles) {
  return std::min(extent, round_up(ceil_div(extent, tiles), extent >= 128 ? 64 : 8));
}

// How many tiles the large-M path decodes W in, for an [M, out_cols] product: as few as leave
// each tile's cuBLAS call about a wave of 128 x 128 output tiles on this GPU's SMs (a GEMM on a
// quarter of the columns at M = 512 would fill a quarter of an H100), at least 2 (never the whole
// dense W) and at most kMaxTiles (a smaller workspace, which stays in L2 between the decode and
// the GEMM). Untuned: no GPU has run it yet.
int64_t large_m_tiles(int64_t M, int64_t out_cols) {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::clamp<int64_t>(ceil_div(M, 128) * ceil_div(out_cols, 128) / sms, 2, kMaxTiles);
}

// ---- ops ------------------------------------------------------------------------------------

at::Tensor linear_nf4(const at::Tensor& x, const at::Tensor& packed,
                      const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                      const at::Tensor& absmax_offset, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  const int64_t K = check_linear_args(x, packed, absmax_codes, absmax_scales, absmax_offset,
                                      out_features, bias);
  const int64_t N = out_features;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor p = contiguous_aligned(packed, 4), c = absmax_codes.contiguous(),
                   s = absmax_scales.contiguous(), o = absmax_offset.contiguous();
  const Nf4View w = nf4_view(p, c, s, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // [M, K], rows 8-element aligned for the small-M kernels' vector loads when K % 8 == 0
  const at::Tensor x2 = contiguous_aligned(x.reshape({-1, K}), 8 * x.element_size());
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N]
  if (M > 0 && M <= kMaxFusedRows && K % 8 == 0) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const T* xp = reinterpret_cast<const T*>(x2.const_data_ptr());
      const T* bp = b.defined() ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr;
      T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
      if (!gemv_rows_mma<T>(w, N, K, xp, static_cast<int>(M), bp, yp, stream)) {
        gemv_rows<T>(w, N, K, xp, static_cast<int>(M), bp, yp, stream);
      }
    });
  } else if (M > 0) {
    const int64_t rows = tile_extent(N, large_m_tiles(M, N));
    at::Tensor tile = at::empty({rows, K}, x2.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n = std::min(rows, N - n0);
      dispatch_float(x.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        launch_dequantize_tile<T>(w, K, n0, n, 0, K, reinterpret_cast<T*>(tile.mutable_data_ptr()),
                                  stream);
      });
      at::Tensor y_cols = y.narrow(1, n0, n);
      if (bias.has_value()) {  // bias added in cuBLAS's float32 epilogue: one rounding, as F.linear
        at::addmm_out(y_cols, bias->narrow(0, n0, n), x2, tile.narrow(0, 0, n).t());
      } else {
        at::mm_out(y_cols, x2, tile.narrow(0, 0, n).t());
      }
    }
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.reshape(out_shape);
}

at::Tensor linear_nf4_grad_input(const at::Tensor& grad_y, const at::Tensor& packed,
                                 const at::Tensor& absmax_codes, const at::Tensor& absmax_scales,
                                 const at::Tensor& absmax_offset, int64_t in_features) {
  const int64_t N = check_grad_input_args(grad_y, packed, absmax_codes, absmax_scales,
                                          absmax_offset, in_features);
  const int64_t K = in_features;
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor p = contiguous_aligned(packed, 4), c = absmax_codes.contiguous(),
                   s = absmax_scales.contiguous(), o = absmax_offset.contiguous();
  const Nf4View w = nf4_view(p, c, s, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor g2 = grad_y.reshape({-1, N}).contiguous();  // [M, N]
  const int64_t M = g2.size(0);
  at::Tensor gx = at::empty({M, K}, g2.options());  // [M, K]
  if (M > 0 && M <= kMaxFusedRows && K % 8 == 0) {
    dispatch_float(grad_y.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      gemv_cols<T>(w, N, K, reinterpret_cast<const T*>(g2.const_data_ptr()), M,
                   reinterpret_cast<T*>(gx.mutable_data_ptr()), g2.options().dtype(at::kFloat),
                   stream);
    });
  } else if (M > 0) {
    const int64_t cols = tile_extent(K, large_m_tiles(M, K));
    at::Tensor storage = at::empty({N * cols}, g2.options());
    for (int64_t k0 = 0; k0 < K; k0 += cols) {
      const int64_t k = std::min(cols, K - k0);
      at::Tensor tile = storage.narrow(0, 0, N * k).view({N, k});
      dispatch_float(grad_y.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        launch_dequantize_tile<T>(w, K, 0, N, k0, k, reinterpret_cast<T*>(tile.mutable_data_ptr()),
                                  stream);
      });
      at::Tensor gx_cols = gx.narrow(1, k0, k);
      at::mm_out(gx_cols, g2, tile);
    }
  }
  std::vector<int64_t> out_shape(grad_y.sizes().begin(), grad_y.sizes().end());
  out_shape.back() = K;
  return gx.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("linear_nf4", &linear_nf4);
  m.impl("linear_nf4_grad_input", &linear_nf4_grad_input);
}

}  // namespace qlora::cuda
