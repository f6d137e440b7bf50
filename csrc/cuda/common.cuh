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

// Sum over the block; the result is valid in thread 0. `scratch` holds one T per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? scratch[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return v;
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535LL * 64) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace covfast
