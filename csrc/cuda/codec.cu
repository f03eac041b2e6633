// CUDA quantize_nf4 / dequantize_nf4 (the kernels: codec_kernels.cuh). Bytes and values are
// identical to the CPU kernels: same float32 operations (no FMA where the format rounds twice),
// and the absmax mean reduced in the fixed float64 tree of absmax_mean() (kernels_common.cpp), one
// warp per group of 256 blocks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../op_checks.h"
#include "launchers.h"
// after launchers.h, which declares launch()
#include "codec_kernels.cuh"

namespace qlora::cuda {

template void launch_dequantize_tile<float>(const Nf4View&, int64_t, int64_t, int64_t, int64_t,
                                            int64_t, float*, cudaStream_t);
template void launch_dequantize_tile<__nv_bfloat16>(const Nf4View&, int64_t, int64_t, int64_t,
                                                    int64_t, int64_t, __nv_bfloat16*, cudaStream_t);
template void launch_dequantize_tile<__half>(const Nf4View&, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, __half*, cudaStream_t);

Nf4View nf4_view(const at::Tensor& packed, const at::Tensor& absmax_codes,
                 const at::Tensor& absmax_scales, const at::Tensor& absmax_offset) {
  TORCH_INTERNAL_ASSERT(packed.is_contiguous() && absmax_codes.is_contiguous() &&
                        absmax_scales.is_contiguous() && absmax_offset.is_contiguous());
  return {packed.const_data_ptr<uint8_t>(), absmax_codes.const_data_ptr<uint8_t>(),
          absmax_scales.const_data_ptr<float>(), absmax_offset.const_data_ptr<float>()};
}

namespace {

// An event recorded on `stream` at construction (ATen's CUDAEvent would pull in the CUDA library
// headers through CUDAContext.h); wait() blocks the host until the stream has reached it. Left
// without wait() (an exception in between), the destructor waits: the copy's pinned destination
// was not allocated through ATen's copy_, so its allocator would not know it is still in use.
class CopyDone {
 public:
  explicit CopyDone(cudaStream_t stream) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    const cudaError_t recorded = cudaEventRecord(event_, stream);
    if (recorded != cudaSuccess) {
      (void)cudaEventDestroy(event_);
      C10_CUDA_CHECK(recorded);
    }
  }
  CopyDone(const CopyDone&) = delete;
  CopyDone& operator=(const CopyDone&) = delete;
  ~CopyDone() {
    if (!waited_) (void)cudaEventSynchronize(event_);
    (void)cudaEventDestroy(event_);
  }
  void wait() {
    waited_ = true;
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
  }

 private:
  cudaEvent_t event_ = nullptr;
  bool waited_ = false;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight) {
  check_quantizable("quantize_nf4", "weight", weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  // before any allocation: a pinned one would break a capture in its default (global) mode
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "qlora: quantize_nf4 cannot run while a CUDA graph is being captured: it checks "
              "argument 'weight' for NaN/Inf on the host; quantize before capturing");
  const at::Tensor w = contiguous_aligned(weight, 32);  // 8-element vector loads
  const int64_t nblocks = w.numel() / kBlockSize;
  const int64_t groups = ceil_div(nblocks, kScalerBlockSize);
  const auto bytes = w.options().dtype(at::kByte);
  const auto floats = w.options().dtype(at::kFloat);
  at::Tensor packed = at::empty({nblocks * kBlockSize / 2}, bytes);
  at::Tensor absmax_codes = at::empty({nblocks}, bytes);
  at::Tensor absmax_scales = at::empty({groups}, floats);
  at::Tensor absmax_offset = at::empty({}, floats);
  at::Tensor absmax = at::empty({nblocks}, floats);
  at::Tensor sums = at::empty({groups}, w.options().dtype(at::kDouble));
  // allocated before the launches: a first pinned allocation may wait for the device
  at::Tensor offset_on_host = at::empty({}, floats.device(at::kCPU).pinned_memory(true));

  dispatch_float(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_quantize_codes<T>(reinterpret_cast<const T*>(w.const_data_ptr()), nblocks,
                             reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<uint8_t>()),
                             absmax.mutable_data_ptr<float>(), sums.mutable_data_ptr<double>(),
                             absmax_offset.mutable_data_ptr<float>(), stream);
  });
  // Any NaN or Inf weight makes the offset non-finite: it comes back to pinned memory and is
  // checked while the GPU goes on with the absmax codes, so the wait for it (a sync the error
  // needs) leaves less of the GPU idle than a copy after the last kernel would.
  C10_CUDA_CHECK(cudaMemcpyAsync(offset_on_host.mutable_data_ptr<float>(),
                                 absmax_offset.const_data_ptr<float>(), sizeof(float),
                                 cudaMemcpyDeviceToHost, stream));
  CopyDone offset_copied(stream);
  launch_quantize_absmax(absmax.const_data_ptr<float>(), nblocks,
                         absmax_offset.const_data_ptr<float>(),
                         absmax_codes.mutable_data_ptr<uint8_t>(),
                         absmax_scales.mutable_data_ptr<float>(), stream);
  offset_copied.wait();
  if (!std::isfinite(*offset_on_host.const_data_ptr<float>())) {
    fail_non_finite("quantize_nf4", "weight", weight);
  }
  return {packed, absmax_codes, absmax_scales, absmax_offset};
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax_codes,
                          const at::Tensor& absmax_scales, const at::Tensor& absmax_offset,
                          at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t numel =
      check_dequantize_args(packed, absmax_codes, absmax_scales, absmax_offset, shape, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = contiguous_aligned(packed, 4), c = absmax_codes.contiguous(),
                   s = contiguous_aligned(absmax_scales, 4), o = contiguous_aligned(absmax_offset, 4);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  const Nf4View view = nf4_view(p, c, s, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // The whole weight as one row: every word lies in one block since numel % 64 == 0.
    launch_dequantize_tile<T>(view, numel, 0, 1, 0, numel,
                              reinterpret_cast<T*>(out.mutable_data_ptr()), stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4);
  m.impl("dequantize_nf4", &dequantize_nf4);
}

}  // namespace qlora::cuda
