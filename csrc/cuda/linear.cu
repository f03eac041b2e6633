// CUDA linear_nf4 and its backward.
//
// M <= 16 rows (bandwidth-bound: the 4-bit weight is the traffic): fused kernels read the packed
// codes straight from global memory, one 32-bit word (8 weights) per lane and step, decode both
// absmax levels in-kernel with the tables in shared memory, and accumulate in float32.
// M > 16 rows (compute-bound): W is decoded a quarter at a time into a workspace of x's dtype and
// multiplied by cuBLAS (at::mm_out into the matching slice of the output); no whole dense W.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../op_checks.h"
#include "launchers.h"
#include "nf4_device.cuh"

namespace qlora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxFusedRows = 16;  // M above this takes the tiled cuBLAS path
constexpr int kColsRows = 8;           // rows of grad_y per backward pass (8 x 8 accumulators)
constexpr int64_t kRowsPerSlice = 128; // rows of W one backward thread walks before a partial sum
constexpr int kTiles = 4;              // the large-M path decodes W in this many tiles

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

// partial[slice, m, k] = sum over the slice's rows n of gy[m, n] W[n, k], for MAXM rows of gy
// (m < M) and the 8 columns k of this thread; slices of kRowsPerSlice rows give parallelism over
// N, and sum_slices_kernel adds them up in a fixed order.
template <typename T, int MAXM>
__global__ void gemv_cols_kernel(Nf4View w, int64_t N, int64_t K, const T* __restrict__ gy,
                                 int64_t ldgy, int M, float* __restrict__ partial,
                                 int64_t ld_slice) {
  __shared__ CodeTables tables;
  load_tables<false>(tables);
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= K / 8) return;
  const int64_t k = t * 8;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kRowsPerSlice;
  const int64_t n1 = min(N, n0 + kRowsPerSlice);
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

template <typename T, int MAXM>
void launch_gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t ldgy, int M,
                      float* partial, int64_t ld_slice, cudaStream_t stream) {
  const dim3 grid(ceil_div(K / 8, kThreads), ceil_div(N, kRowsPerSlice));
  gemv_cols_kernel<T, MAXM><<<grid, kThreads, 0, stream>>>(w, N, K, gy, ldgy, M, partial, ld_slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gemv_cols(const Nf4View& w, int64_t N, int64_t K, const T* gy, int64_t M, T* gx,
               const at::TensorOptions& float_options, cudaStream_t stream) {
  const int64_t slices = ceil_div(N, kRowsPerSlice);
  const int64_t ld_slice = M * K;
  at::Tensor partial = at::empty({slices * ld_slice}, float_options);
  float* p = partial.mutable_data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kColsRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kColsRows, M - m0));
    const T* g = gy + m0 * N;
    float* out = p + m0 * K;
    if (rows <= 1) launch_gemv_cols<T, 1>(w, N, K, g, N, rows, out, ld_slice, stream);
    else if (rows <= 2) launch_gemv_cols<T, 2>(w, N, K, g, N, rows, out, ld_slice, stream);
    else if (rows <= 4) launch_gemv_cols<T, 4>(w, N, K, g, N, rows, out, ld_slice, stream);
    else launch_gemv_cols<T, 8>(w, N, K, g, N, rows, out, ld_slice, stream);
  }
  sum_slices_kernel<T><<<ceil_div(ld_slice, kThreads), kThreads, 0, stream>>>(p, slices, ld_slice,
                                                                             ld_slice, gx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

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

  const at::Tensor x2 = contiguous_aligned(x.reshape({-1, K}), 32);  // [M, K]
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x2.options());  // [M, N]
  if (M > 0 && M <= kMaxFusedRows && K % 8 == 0) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      gemv_rows<T>(w, N, K, reinterpret_cast<const T*>(x2.const_data_ptr()), static_cast<int>(M),
                   b.defined() ? reinterpret_cast<const T*>(b.const_data_ptr()) : nullptr,
                   reinterpret_cast<T*>(y.mutable_data_ptr()), stream);
    });
  } else if (M > 0) {
    const int64_t rows = std::min(N, round_up(ceil_div(N, kTiles), 64));
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
    const int64_t cols = std::min(K, round_up(ceil_div(K, kTiles), 64));
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
