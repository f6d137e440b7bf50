// covfast::reverse_attention on CUDA (Fan et al., Inf-Net, IEEE TMI 2020, eq. 3):
//   out = x * (1 - sigmoid(up(side)))     up: bilinear, align_corners=False, side [B,1,h,w] -> [B,1,H,W]
//
// reverse_attention_concat: out = cat([x, up(edge)], 1) * (1 - sigmoid(up(side))), the same kernels with
// edge_channels > 0 (reverse_attention is the case edge_channels = 0).
//
// Forward: thread (b, y, x) of a channel group computes its gate once from 4 side values (read through the cache,
// side is small) and applies it to the channels of its group: one read of x and one write of out per element; edge
// channels are resampled from 4 edge values with taps computed once per thread, so neither the resized edge nor the
// concatenation is stored. Backward, same layout: grad_x = g * (1 - s), the edge channels' g * (1 - s) scattered
// with atomics into the float32 grad_edge workspace (adjoint of the edge resize), and the group's partial
// sum_c g * cat, times -s * (1 - s), scattered with atomics into the float32 grad_side workspace.
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

// Adjoint of upsampled: value spread by the 4 bilinear weights into the float32 plane dst.
__device__ __forceinline__ void atomic_scatter(float* dst, int w_in, Tap ty, Tap tx, float value) {
  atomicAdd(dst + ty.i0 * w_in + tx.i0, value * ty.w0 * tx.w0);
  atomicAdd(dst + ty.i0 * w_in + tx.i1, value * ty.w0 * tx.w1);
  atomicAdd(dst + ty.i1 * w_in + tx.i0, value * ty.w1 * tx.w0);
  atomicAdd(dst + ty.i1 * w_in + tx.i1, value * ty.w1 * tx.w1);
}

// What every thread of both kernels needs: its pixel, taps into side (and edge), its channel range.
struct PixelWork {
  int64_t b, yx;
  Tap ty, tx, ey, ex;
  int c_begin, c_end;
};

__device__ __forceinline__ bool pixel_work(const ReverseAttentionParams& p, PixelWork& w) {
  const int64_t plane = static_cast<int64_t>(p.height) * p.width;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // index in B * H * W
  if (pixel >= p.batch * plane) return false;
  w.b = pixel / plane;
  w.yx = pixel - w.b * plane;
  const int y = static_cast<int>(w.yx / p.width), x = static_cast<int>(w.yx - static_cast<int64_t>(y) * p.width);
  w.ty = tap(y, p.scale_h, p.side_height);
  w.tx = tap(x, p.scale_w, p.side_width);
  if (p.edge_channels > 0) {
    w.ey = tap(y, p.edge_scale_h, p.edge_height);
    w.ex = tap(x, p.edge_scale_w, p.edge_width);
  }
  w.c_begin = blockIdx.y * p.channels_per_group;
  w.c_end = min(p.channels + p.edge_channels, w.c_begin + p.channels_per_group);
  return true;
}

template <typename T>
__global__ void reverse_attention_fwd_kernel(ReverseAttentionParams p, const T* __restrict__ x,
                                             const T* __restrict__ edge, const T* __restrict__ side,
                                             T* __restrict__ out) {
  PixelWork w;
  if (!pixel_work(p, w)) return;
  const int64_t plane = static_cast<int64_t>(p.height) * p.width;
  const int64_t edge_plane = static_cast<int64_t>(p.edge_height) * p.edge_width;
  const float up = upsampled(side + w.b * p.side_height * p.side_width, p.side_width, w.ty, w.tx);
  const float gate = 1.f - 1.f / (1.f + __expf(-up));
  const int total = p.channels + p.edge_channels;
  for (int c = w.c_begin; c < w.c_end; ++c) {
    const float value = c < p.channels
                            ? to_float(x[(w.b * p.channels + c) * plane + w.yx])  // x[b, c, y, x]
                            : upsampled(edge + (w.b * p.edge_channels + c - p.channels) * edge_plane, p.edge_width,
                                        w.ey, w.ex);  // up(edge)[b, c - C, y, x]
    out[(w.b * total + c) * plane + w.yx] = from_float<T>(value * gate);
  }
}

template <typename T>
__global__ void reverse_attention_bwd_kernel(ReverseAttentionParams p, const T* __restrict__ grad,
                                             const T* __restrict__ x, const T* __restrict__ edge,
                                             const T* __restrict__ side, T* __restrict__ grad_x,
                                             float* __restrict__ grad_edge, float* __restrict__ grad_side) {
  PixelWork w;
  if (!pixel_work(p, w)) return;
  const int64_t plane = static_cast<int64_t>(p.height) * p.width;
  const int64_t edge_plane = static_cast<int64_t>(p.edge_height) * p.edge_width;
  const float s = 1.f / (1.f + __expf(-upsampled(side + w.b * p.side_height * p.side_width, p.side_width, w.ty,
                                                  w.tx)));
  const int total = p.channels + p.edge_channels;
  float dot = 0.f;
  for (int c = w.c_begin; c < w.c_end; ++c) {
    const float g = to_float(grad[(w.b * total + c) * plane + w.yx]);
    if (c < p.channels) {
      const int64_t offset = (w.b * p.channels + c) * plane + w.yx;
      dot += g * to_float(x[offset]);
      grad_x[offset] = from_float<T>(g * (1.f - s));
    } else {
      const int64_t edge_offset = (w.b * p.edge_channels + c - p.channels) * edge_plane;
      dot += g * upsampled(edge + edge_offset, p.edge_width, w.ey, w.ex);
      atomic_scatter(grad_edge + edge_offset, p.edge_width, w.ey, w.ex, g * (1.f - s));
    }
  }
  atomic_scatter(grad_side + w.b * p.side_height * p.side_width, p.side_width, w.ty, w.tx,
                    -dot * s * (1.f - s));
}

// Channel groups so that a big GPU is filled even for small planes (deep decoder stages are 11 x 11 with 2048
// channels), while each thread still amortizes its gate over at least kMinGroup channels (the backward's atomics
// into grad_side scale with the number of groups).
constexpr int kMinGroup = 16;

ReverseAttentionParams with_groups(ReverseAttentionParams p) {
  const int64_t pixels = p.batch * static_cast<int64_t>(p.height) * p.width;
  const int64_t want_threads = 132LL * 2048 * 2;
  int64_t groups = (want_threads + pixels - 1) / pixels;
  const int64_t channels = p.channels + p.edge_channels;
  const int64_t max_groups = (channels + kMinGroup - 1) / kMinGroup;
  groups = groups < 1 ? 1 : (groups > max_groups ? max_groups : groups);
  p.channels_per_group = static_cast<int>((channels + groups - 1) / groups);
  return p;
}

dim3 grid_of(const ReverseAttentionParams& p) {
  const int64_t pixels = p.batch * static_cast<int64_t>(p.height) * p.width;
  return dim3(static_cast<unsigned>((pixels + kThreads - 1) / kThreads),
              static_cast<unsigned>((p.channels + p.edge_channels + p.channels_per_group - 1) / p.channels_per_group));
}

void check(const ReverseAttentionParams& p) {
  if (p.side_height <= 0 || p.side_width <= 0) throw std::invalid_argument("reverse_attention: empty side");
  if (p.edge_channels > 0 && (p.edge_height <= 0 || p.edge_width <= 0))
    throw std::invalid_argument("reverse_attention_concat: empty edge");
  if ((p.batch * static_cast<int64_t>(p.height) * p.width + kThreads - 1) / kThreads > 0x7fffffff)
    throw std::invalid_argument("reverse_attention: input too large");
}

template <typename T>
void launch_fwd(const ReverseAttentionParams& p, const void* x, const void* edge, const void* side, void* out,
                cudaStream_t stream) {
  reverse_attention_fwd_kernel<T><<<grid_of(p), kThreads, 0, stream>>>(
      p, static_cast<const T*>(x), static_cast<const T*>(edge), static_cast<const T*>(side), static_cast<T*>(out));
}

template <typename T>
void launch_bwd(const ReverseAttentionParams& p, const void* grad, const void* x, const void* edge, const void* side,
                void* grad_x, float* grad_edge, float* grad_side, cudaStream_t stream) {
  reverse_attention_bwd_kernel<T><<<grid_of(p), kThreads, 0, stream>>>(
      p, static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(edge),
      static_cast<const T*>(side), static_cast<T*>(grad_x), grad_edge, grad_side);
}

bool empty_output(const ReverseAttentionParams& p) {
  return p.batch == 0 || p.channels + p.edge_channels == 0 || p.height == 0 || p.width == 0;
}

}  // namespace

void reverse_attention_concat_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* edge,
                                       const void* side, void* out, cudaStream_t stream) {
  if (empty_output(p)) return;
  check(p);
  p = with_groups(p);
  switch (static_cast<FloatType>(dtype)) {
    case FloatType::kFloat32:
      launch_fwd<float>(p, x, edge, side, out, stream);
      break;
    case FloatType::kFloat16:
      launch_fwd<__half>(p, x, edge, side, out, stream);
      break;
    case FloatType::kBFloat16:
      launch_fwd<__nv_bfloat16>(p, x, edge, side, out, stream);
      break;
    default:
      throw std::invalid_argument("reverse_attention: unsupported dtype");
  }
  COVFAST_CHECK_LAUNCH();
}

void reverse_attention_concat_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                       const void* edge, const void* side, void* grad_x, float* grad_edge,
                                       float* grad_side, cudaStream_t stream) {
  if (empty_output(p)) return;
  check(p);
  p = with_groups(p);
  switch (static_cast<FloatType>(dtype)) {
    case FloatType::kFloat32:
      launch_bwd<float>(p, grad, x, edge, side, grad_x, grad_edge, grad_side, stream);
      break;
    case FloatType::kFloat16:
      launch_bwd<__half>(p, grad, x, edge, side, grad_x, grad_edge, grad_side, stream);
      break;
    case FloatType::kBFloat16:
      launch_bwd<__nv_bfloat16>(p, grad, x, edge, side, grad_x, grad_edge, grad_side, stream);
      break;
    default:
      throw std::invalid_argument("reverse_attention: unsupported dtype");
  }
  COVFAST_CHECK_LAUNCH();
}

void reverse_attention_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* side, void* out,
                                cudaStream_t stream) {
  p.edge_channels = 0;
  reverse_attention_concat_fwd_cuda(p, dtype, x, nullptr, side, out, stream);
}

void reverse_attention_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                const void* side, void* grad_x, float* grad_side, cudaStream_t stream) {
  p.edge_channels = 0;
  reverse_attention_concat_bwd_cuda(p, dtype, grad, x, nullptr, side, grad_x, nullptr, grad_side, stream);
}

}  // namespace covfast
