// covfast::roi_align on CUDA (He et al., Mask R-CNN, ICCV 2017), with torchvision's semantics:
//   out[k, c, ph, pw] = 1 / max(gh * gw, 1) * sum_{iy < gh, ix < gw} bilinear(features[b_k, c], y, x)
//   y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,  x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
// (x1, y1, x2, y2) = box * spatial_scale (- 0.5 when aligned); gh = sampling_ratio, or ceil(roi_h / PH) when
// sampling_ratio <= 0; samples outside [-1, H] x [-1, W] contribute 0, the rest are clamped to the border.
//
// Forward: one thread per output element (k, c, ph, pw); neighbouring threads share (k, c) and read neighbouring
// feature pixels. Backward: one thread per gradient element, scattering grad / count * weight into the 4 neighbours
// of each sample with atomicAdd into a float32 (float64) workspace. Arithmetic in float (double for float64).
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/roi_align.h"

namespace covfast {
namespace {

constexpr int kThreads = 256;

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T>
__device__ __forceinline__ float to_acc(T v) {
  return to_float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return from_float<T>(v);
  }
}

// IEEE division even under --use_fast_math (which CMake passes): an approximate roi_h / PH can land just above an
// integer, and ceil() would then take one more sample row than torchvision.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

template <typename A>
struct Geometry {
  int64_t batch_index;
  A x1, y1, bin_h, bin_w, count;
  int grid_h, grid_w;
};

template <typename A>
__device__ Geometry<A> geometry(const RoiAlignCudaParams& p, const A* roi) {
  const A offset = p.aligned ? A(0.5) : A(0);
  const A scale = static_cast<A>(p.spatial_scale);
  Geometry<A> g;
  g.batch_index = static_cast<int64_t>(roi[0]);
  g.x1 = roi[1] * scale - offset;
  g.y1 = roi[2] * scale - offset;
  A roi_w = roi[3] * scale - offset - g.x1;
  A roi_h = roi[4] * scale - offset - g.y1;
  if (!p.aligned) {  // malformed boxes are forced to 1 x 1 (torchvision's legacy behaviour)
    roi_w = max(roi_w, A(1));
    roi_h = max(roi_h, A(1));
  }
  g.bin_h = div_rn(roi_h, static_cast<A>(p.pooled_height));
  g.bin_w = div_rn(roi_w, static_cast<A>(p.pooled_width));
  g.grid_h = p.sampling_ratio > 0 ? p.sampling_ratio : static_cast<int>(ceil(g.bin_h));  // ceil(roi_h / PH)
  g.grid_w = p.sampling_ratio > 0 ? p.sampling_ratio : static_cast<int>(ceil(g.bin_w));
  g.count = static_cast<A>(max(g.grid_h * g.grid_w, 1));
  return g;
}

// Bilinear neighbours (element offsets y * stride_h + x * stride_w) and weights of one sample; false when the
// sample is outside [-1, H] x [-1, W].
template <typename A>
__device__ bool bilinear(A y, A x, int64_t height, int64_t width, int64_t stride_h, int64_t stride_w,
                         int64_t offset[4], A weight[4]) {
  if (y < A(-1) || y > static_cast<A>(height) || x < A(-1) || x > static_cast<A>(width)) return false;
  y = max(y, A(0));
  x = max(x, A(0));
  int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x), y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = static_cast<A>(y_low);
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = static_cast<A>(x_low);
  } else {
    x_high = x_low + 1;
  }
  const A ly = y - static_cast<A>(y_low), lx = x - static_cast<A>(x_low);
  const A hy = A(1) - ly, hx = A(1) - lx;
  offset[0] = y_low * stride_h + x_low * stride_w;
  offset[1] = y_low * stride_h + x_high * stride_w;
  offset[2] = y_high * stride_h + x_low * stride_w;
  offset[3] = y_high * stride_h + x_high * stride_w;
  weight[0] = hy * hx;
  weight[1] = hy * lx;
  weight[2] = ly * hx;
  weight[3] = ly * lx;
  return true;
}

// Output element index -> (k, c, ph, pw) of the [K, C, PH, PW] output (forward) or gradient (backward).
struct Bin {
  int64_t k, c;
  int ph, pw;
};

__device__ __forceinline__ Bin bin_of(const RoiAlignCudaParams& p, int64_t index) {
  Bin b;
  b.pw = static_cast<int>(index % p.pooled_width);
  b.ph = static_cast<int>((index / p.pooled_width) % p.pooled_height);
  b.c = (index / p.pooled_width / p.pooled_height) % p.channels;
  b.k = index / p.pooled_width / p.pooled_height / p.channels;
  return b;
}

// Calls visit(offset, weight) for every sample of bin (ph, pw) inside [-1, H] x [-1, W].
template <typename A, typename Visit>
__device__ __forceinline__ void for_each_sample(const RoiAlignCudaParams& p, const Geometry<A>& g, int ph, int pw,
                                                int64_t stride_h, int64_t stride_w, Visit visit) {
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const A y = g.y1 + ph * g.bin_h + div_rn((iy + A(0.5)) * g.bin_h, static_cast<A>(g.grid_h));
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const A x = g.x1 + pw * g.bin_w + div_rn((ix + A(0.5)) * g.bin_w, static_cast<A>(g.grid_w));
      int64_t offset[4];
      A weight[4];
      if (bilinear(y, x, p.height, p.width, stride_h, stride_w, offset, weight)) visit(offset, weight);
    }
  }
}

template <typename T>
__global__ void roi_align_fwd_kernel(RoiAlignCudaParams p, const T* __restrict__ features,
                                     const Acc<T>* __restrict__ rois, T* __restrict__ output) {
  using A = Acc<T>;
  const int64_t total = p.num_rois * p.channels * p.pooled_height * p.pooled_width;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Bin b = bin_of(p, index);  // output is contiguous: element index is its offset
    const Geometry<A> g = geometry(p, rois + b.k * 5);
    const T* plane = features + g.batch_index * p.feature_stride[0] + b.c * p.feature_stride[1];
    A sum = 0;
    for_each_sample(p, g, b.ph, b.pw, p.feature_stride[2], p.feature_stride[3],
                    [&](const int64_t* offset, const A* weight) {
                      sum += weight[0] * to_acc(plane[offset[0]]) + weight[1] * to_acc(plane[offset[1]]) +
                             weight[2] * to_acc(plane[offset[2]]) + weight[3] * to_acc(plane[offset[3]]);
                    });
    output[index] = from_acc<T>(div_rn(sum, g.count));
  }
}

template <typename T>
__global__ void roi_align_bwd_kernel(RoiAlignCudaParams p, const T* __restrict__ grad,
                                     const Acc<T>* __restrict__ rois, Acc<T>* __restrict__ grad_features) {
  using A = Acc<T>;
  const int64_t total = p.num_rois * p.channels * p.pooled_height * p.pooled_width;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Bin b = bin_of(p, index);  // grad may be strided: p.feature_stride holds its strides
    const Geometry<A> g = geometry(p, rois + b.k * 5);
    const A g_bin = div_rn(to_acc(grad[b.k * p.feature_stride[0] + b.c * p.feature_stride[1] +
                                       b.ph * p.feature_stride[2] + b.pw * p.feature_stride[3]]),
                           g.count);
    A* plane = grad_features + (g.batch_index * p.channels + b.c) * p.height * p.width;
    for_each_sample(p, g, b.ph, b.pw, p.width, int64_t{1}, [&](const int64_t* offset, const A* weight) {
      for (int n = 0; n < 4; ++n) atomicAdd(plane + offset[n], g_bin * weight[n]);
    });
  }
}

unsigned blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride loop covers the rest
}

template <typename T>
void launch_forward(const RoiAlignCudaParams& p, const void* features, const void* rois, void* output,
                    cudaStream_t stream) {
  const int64_t total = p.num_rois * p.channels * p.pooled_height * p.pooled_width;
  roi_align_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      p, static_cast<const T*>(features), static_cast<const Acc<T>*>(rois), static_cast<T*>(output));
  COVFAST_CHECK_LAUNCH();
}

template <typename T>
void launch_backward(const RoiAlignCudaParams& p, const void* grad, const void* rois, void* grad_features,
                     cudaStream_t stream) {
  const int64_t total = p.num_rois * p.channels * p.pooled_height * p.pooled_width;
  roi_align_bwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
      p, static_cast<const T*>(grad), static_cast<const Acc<T>*>(rois), static_cast<Acc<T>*>(grad_features));
  COVFAST_CHECK_LAUNCH();
}

// Calls launch(T{}) with T the element type of the RoiAlignCudaType code dtype.
template <typename Launch>
void with_type(int dtype, Launch launch) {
  switch (static_cast<RoiAlignCudaType>(dtype)) {
    case RoiAlignCudaType::kFloat32:
      return launch(float{});
    case RoiAlignCudaType::kFloat16:
      return launch(__half{});
    case RoiAlignCudaType::kBFloat16:
      return launch(__nv_bfloat16{});
    case RoiAlignCudaType::kFloat64:
      return launch(double{});
  }
  throw std::invalid_argument("roi_align: unsupported dtype");
}

bool empty(const RoiAlignCudaParams& p) {
  return p.num_rois == 0 || p.channels == 0 || p.pooled_height == 0 || p.pooled_width == 0;
}

}  // namespace

void roi_align_forward_cuda(const RoiAlignCudaParams& p, int dtype, const void* features, const void* rois,
                            void* output, cudaStream_t stream) {
  if (empty(p)) return;
  if (p.height <= 0 || p.width <= 0) throw std::invalid_argument("roi_align: empty feature map");
  with_type(dtype, [&](auto tag) { launch_forward<decltype(tag)>(p, features, rois, output, stream); });
}

void roi_align_backward_cuda(const RoiAlignCudaParams& p, int dtype, const void* grad, const void* rois,
                             void* grad_features, cudaStream_t stream) {
  if (empty(p) || p.height <= 0 || p.width <= 0) return;
  with_type(dtype, [&](auto tag) { launch_backward<decltype(tag)>(p, grad, rois, grad_features, stream); });
}

}  // namespace covfast
