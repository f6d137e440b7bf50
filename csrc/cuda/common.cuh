// Shared helpers of the covfast CUDA kernels: error checks, element loads in float, block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace covfast {

#define COVFAST_CUDA_CHECK(expr)                                                                        \
  do {                                                                                                  \
    cudaError_t covfast_err_ = (expr);                                                                  \
    if (covfast_err_ != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string(#expr " failed: ") + cudaGetErrorString(covfast_err_));      \
  } while (0)

// After a launch: configuration errors surface here, asynchronous faults at the caller's next sync.
#define COVFAST_CHECK_LAUNCH() COVFAST_CUDA_CHECK(cudaGetLastError())

// Element type codes shared with Python (covfast/ops): the dtype of float inputs.
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace covfast
