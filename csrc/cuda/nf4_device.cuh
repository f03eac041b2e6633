// Device-side pieces shared by the CUDA kernels: the code tables in shared memory, 8-element
// loads and stores of float32 / bf16 / fp16 (one 16- or 32-byte access each), the decode of one
// packed 32-bit word (8 weights), and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../nf4_format.h"

namespace qlora::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// The tables' bit patterns, in global memory rather than __constant__: a warp reading 32
// different entries of a __constant__ array is served one address at a time; from global memory
// it is one or two cached transactions.
static __device__ const uint32_t g_nf4_bits[16] = QLORA_NF4_BITS;
static __device__ const uint32_t g_map_bits[256] = QLORA_ABSMAX_MAP_BITS;

// NF4 midpoint i, rounded as on the host, (a + b) / 2 in float32: halving by multiplying by 0.5f
// gives the same correctly rounded value, without a division.
__device__ __forceinline__ float nf4_midpoint(int i) {
  return __fmul_rn(__fadd_rn(__uint_as_float(__ldg(&g_nf4_bits[i])),
                             __uint_as_float(__ldg(&g_nf4_bits[i + 1]))),
                   0.5f);
}

// Fills the tables from the bit patterns. Call with the whole CTA (any blockDim.x), then
// __syncthreads(). The midpoints and NF4 buckets are for the quantize kernels (decoding needs
// none); a bucket needs all 15 NF4 midpoints, which its thread computes itself rather than wait
// for the shared copy.
template <bool kMidpoints>
__device__ inline void load_tables(CodeTables& t) {
  if (kMidpoints) {
    for (int j = threadIdx.x; j < kNf4Buckets; j += blockDim.x) {
      t.nf4_bucket[j] = make_nf4_bucket(j, nf4_midpoint);
    }
  }
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    const float a = __uint_as_float(__ldg(&g_map_bits[i]));
    t.map[i] = a;
    if (kMidpoints) {
      const float next = i < 255 ? __uint_as_float(__ldg(&g_map_bits[i + 1])) : a;
      t.map_mid[i] = i < 255 ? __fmul_rn(__fadd_rn(a, next), 0.5f) : a;
    }
    if (i < 16) {
      const float n = __uint_as_float(__ldg(&g_nf4_bits[i]));
      t.nf4[i] = n;
      if (kMidpoints) t.nf4_mid[i] = i < 15 ? nf4_midpoint(i) : n;
    }
  }
}

// 8 consecutive elements <-> float. Pointers are 16-byte aligned (8 elements of 2 bytes) or
// 32-byte aligned (float32); the launchers check.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store8(__half* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The 8 weights of one packed 32-bit word (bytes in memory order, the even element in the high
// nibble), each times the block's absmax.
__device__ __forceinline__ void decode8(uint32_t word, float absmax, const float* nf4,
                                        float (&w)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = (word >> (8 * j)) & 0xffu;
    w[2 * j] = __fmul_rn(nf4[byte >> 4], absmax);
    w[2 * j + 1] = __fmul_rn(nf4[byte & 15u], absmax);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The XOR butterfly that butterfly_sum() in kernels_common.cpp reproduces on the host.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qlora::cuda
