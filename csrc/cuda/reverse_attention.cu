// covfast::reverse_attention on CUDA (Fan et al., Inf-Net, IEEE TMI 2020, eq. 3):
//   out = x * (1 - sigmoid(up(side)))     up: bilinear, align_corners=False, side [B,1,h,w] -> [B,1,H,W]
//
// Forward: thread (b, y, x) of a channel group computes its gate once from 4 side values (read through the cache,
// side is small) and applies it to the channels of its group: one read of x and one write of out per element.
// Backward, same layout: grad_x = g * (1 - s) and the group's partial sum_c g * x, times -s * (1 - s), scattered
// with atomics into the float32 grad_side workspace by the 4 bilinear weights (the adjoint of the upsample).
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/reverse_attention.h"

namespace covfast {
namespace {

constexpr int kThreads = 256;

// Source index and weights of one output coordinate, as PyTorch's upsample_bilinear2d (align_corners=False).
struct Tap {
  int i0, i1;
  float w0, w1;
};

__device__ __forceinline__ Tap tap(int out_index, float scale, int in_size) {
  float src = scale * (out_index + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  const int i0 = min(static_cast<int>(src), in_size - 1);
  const int i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const float frac = src - i0;
  return {i0, i1, 1.f - frac, frac};
}

template <typename T>
__device__ __forceinline__ float upsampled(const T* side_b, int w_in, Tap ty, Tap tx) {
  const float v00 = to_float(side_b[ty.i0 * w_in + tx.i0]), v01 = to_float(side_b[ty.i0 * w_in + tx.i1]);
  const float v10 = to_float(side_b[ty.i1 * w_in + tx.i0]), v11 = to_float(side_b[ty.i1 * w_in + tx.i1]);
  return ty.w0 * (tx.w0 * v00 + tx.w1 * v01) + ty.w1 * (tx.w0 * v10 + tx.w1 * v11);
}

template <typename T>
__global__ void reverse_attention_fwd_kernel(ReverseAttentionParams p, const T* __restrict__ x,
                                             const T* __restrict__ side, T* __restrict__ out) {
  const int64_t plane = static_cast<int64_t>(p.height) * p.width;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // index in B * H * W
  if (pixel >= p.batch * plane) return;
  const int64_t b = pixel / plane, yx = pixel - b * plane;
  const int y = static_cast<int>(yx / p.width), xw = static_cast<int>(yx - static_cast<int64_t>(y) * p.width);
  const float up = upsampled(side + b * p.side_height * p.side_width, p.side_width,
                             tap(y, p.scale_h, p.side_height), tap(xw, p.scale_w, p.side_width));
  const float gate = 1.f - 1.f / (1.f + __expf(-up));
  const int c_begin = blockIdx.y * p.channels_per_group;
  const int c_end = min(p.channels, c_begin + p.channels_per_group);
  int64_t offset = (b * p.channels + c_begin) * plane + yx;  // x[b, c, y, xw]
  for (int c = c_begin; c < c_end; ++c, offset += plane) out[offset] = from_float<T>(to_float(x[offset]) * gate);
}

template <typename T>
__global__ void reverse_attention_bwd_kernel(ReverseAttentionParams p, const T* __restrict__ grad,
                                             const T* __restrict__ x, const T* __restrict__ side,
                                             T* __restrict__ grad_x, float* __restrict__ grad_side) {
  const int64_t plane = static_cast<int64_t>(p.height) * p.width;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= p.batch * plane) return;
  const int64_t b = pixel / plane, yx = pixel - b * plane;
  const int y = static_cast<int>(yx / p.width), xw = static_cast<int>(yx - static_cast<int64_t>(y) * p.width);
  const Tap ty = tap(y, p.scale_h, p.side_height), tx = tap(xw, p.scale_w, p.side_width);
  const float up = upsampled(side + b * p.side_height * p.side_width, p.side_width, ty, tx);
  const float s = 1.f / (1.f + __expf(-up));
  const int c_begin = blockIdx.y * p.channels_per_group;
  const int c_end = min(p.channels, c_begin + p.channels_per_group);
  int64_t offset = (b * p.channels + c_begin) * plane + yx;
  float dot = 0.f;
  for (int c = c_begin; c < c_end; ++c, offset += plane) {
    const float g = to_float(grad[offset]);
    dot += g * to_float(x[offset]);
    grad_x[offset] = from_float<T>(g * (1.f - s));
  }
  const float grad_up = -dot * s * (1.f - s);
  float* gs = grad_side + b * p.side_height * p.side_width;
  atomicAdd(gs + ty.i0 * p.side_width + tx.i0, grad_up * ty.w0 * tx.w0);
  atomicAdd(gs + ty.i0 * p.side_width + tx.i1, grad_up * ty.w0 * tx.w1);
  atomicAdd(gs + ty.i1 * p.side_width + tx.i0, grad_up * ty.w1 * tx.w0);
  atomicAdd(gs + ty.i1 * p.side_width + tx.i1, grad_up * ty.w1 * tx.w1);
}

// Channel groups so that a big GPU is filled even for small planes (deep decoder stages are 11 x 11 with 2048
// channels), while each thread still amortizes its gate over at least kMinGroup channels (the backward's atomics
// into grad_side scale with the number of groups).
constexpr int kMinGroup = 16;

ReverseAttentionParams with_groups(ReverseAttentionParams p) {
  const int64_t pixels = p.batch * static_cast<int64_t>(p.height) * p.width;
  const int64_t want_threads = 132LL * 2048 * 2;
  int64_t groups = (want_threads + pixels - 1) / pixels;
  const int64_t max_groups = (p.channels + kMinGroup - 1) / kMinGroup;
  groups = groups < 1 ? 1 : (groups > max_groups ? max_groups : groups);
  p.channels_per_group = static_cast<int>((p.channels + groups - 1) / groups);
  return p;
}

dim3 grid_of(const ReverseAttentionParams& p) {
  const int64_t pixels = p.batch * static_cast<int64_t>(p.height) * p.width;
  return dim3(static_cast<unsigned>((pixels + kThreads - 1) / kThreads),
              static_cast<unsigned>((p.channels + p.channels_per_group - 1) / p.channels_per_group));
}

void check(const ReverseAttentionParams& p) {
  if (p.side_height <= 0 || p.side_width <= 0) throw std::invalid_argument("reverse_attention: empty side");
  if ((p.batch * static_cast<int64_t>(p.height) * p.width + kThreads - 1) / kThreads > 0x7fffffff)
    throw std::invalid_argument("reverse_attention: input too large");
}

}  // namespace

void reverse_attention_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* side, void* out,
                                cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0 || p.height == 0 || p.width == 0) return;
  check(p);
  p = with_groups(p);
  const dim3 grid = grid_of(p);
  switch (static_cast<FloatType>(dtype)) {
    case FloatType::kFloat32:
      reverse_attention_fwd_kernel<float><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const float*>(x), static_cast<const float*>(side), static_cast<float*>(out));
      break;
    case FloatType::kFloat16:
      reverse_attention_fwd_kernel<__half><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const __half*>(x), static_cast<const __half*>(side), static_cast<__half*>(out));
      break;
    case FloatType::kBFloat16:
      reverse_attention_fwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(side),
          static_cast<__nv_bfloat16*>(out));
      break;
    default:
      throw std::invalid_argument("reverse_attention: unsupported dtype");
  }
  COVFAST_CHECK_LAUNCH();
}

void reverse_attention_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                const void* side, void* grad_x, float* grad_side, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0 || p.height == 0 || p.width == 0) return;
  check(p);
  p = with_groups(p);
  const dim3 grid = grid_of(p);
  switch (static_cast<FloatType>(dtype)) {
    case FloatType::kFloat32:
      reverse_attention_bwd_kernel<float><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const float*>(grad), static_cast<const float*>(x), static_cast<const float*>(side),
          static_cast<float*>(grad_x), grad_side);
      break;
    case FloatType::kFloat16:
      reverse_attention_bwd_kernel<__half><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const __half*>(grad), static_cast<const __half*>(x), static_cast<const __half*>(side),
          static_cast<__half*>(grad_x), grad_side);
      break;
    case FloatType::kBFloat16:
      reverse_attention_bwd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          p, static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(x),
          static_cast<const __nv_bfloat16*>(side), static_cast<__nv_bfloat16*>(grad_x), grad_side);
      break;
    default:
      throw std::invalid_argument("reverse_attention: unsupported dtype");
  }
  COVFAST_CHECK_LAUNCH();
}

}  // namespace covfast
