// covfast._cuda: CUDA kernels. Bindings take plain device pointers (as integers), sizes, strides and a
// cudaStream_t handle (as an integer), never torch types. Kernels run on the given stream of the current device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/coach_mask.h"
#include "cuda/infection_ratio.h"
#include "cuda/reverse_attention.h"
#include "cuda/roi_align.h"

namespace py = pybind11;

using Strides = std::array<int64_t, 3>;

static int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

static int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// Every entry point starts here: a clear error on a machine without a usable GPU.
static void require_device() {
  if (device_count() == 0) throw std::runtime_error("covfast._cuda: no CUDA device is available");
}

static cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
static T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

static void infection_ratio(uintptr_t lung, const Strides& lung_strides, uintptr_t infection,
                            const Strides& infection_strides, int infection_type, int64_t depth, int64_t height,
                            int64_t width, float threshold, uintptr_t lung_voxels, uintptr_t infected_voxels,
                            uintptr_t soft_sum, uintptr_t bad_class_flag, uintptr_t stream) {
  require_device();
  covfast::InfectionRatioCudaParams p{ptr<const void>(lung),
                                      ptr<const void>(infection),
                                      {lung_strides[0], lung_strides[1], lung_strides[2]},
                                      {infection_strides[0], infection_strides[1], infection_strides[2]},
                                      depth,
                                      height,
                                      width,
                                      ptr<int64_t>(lung_voxels),
                                      ptr<int64_t>(infected_voxels),
                                      ptr<double>(soft_sum),
                                      ptr<int>(bad_class_flag)};
  py::gil_scoped_release release;
  covfast::infection_ratio_cuda(p, infection_type, threshold, as_stream(stream));
}

static covfast::ReverseAttentionParams ra_params(int64_t batch, int channels, int height, int width,
                                                 int side_height, int side_width) {
  if (batch < 0 || channels < 0 || height < 0 || width < 0 || side_height < 0 || side_width < 0)
    throw std::invalid_argument("reverse_attention: negative size");
  const float scale_h = height ? static_cast<float>(side_height) / static_cast<float>(height) : 0.f;
  const float scale_w = width ? static_cast<float>(side_width) / static_cast<float>(width) : 0.f;
  return {batch, channels, height, width, side_height, side_width, scale_h, scale_w, 0};
}

static void reverse_attention_fwd(uintptr_t x, uintptr_t side, uintptr_t out, int dtype, int64_t batch, int channels,
                                  int height, int width, int side_height, int side_width, uintptr_t stream) {
  require_device();
  const auto p = ra_params(batch, channels, height, width, side_height, side_width);
  py::gil_scoped_release release;
  covfast::reverse_attention_fwd_cuda(p, dtype, ptr<const void>(x), ptr<const void>(side), ptr<void>(out),
                                      as_stream(stream));
}

static void reverse_attention_bwd(uintptr_t grad, uintptr_t x, uintptr_t side, uintptr_t grad_x,
                                  uintptr_t grad_side_f32, int dtype, int64_t batch, int channels, int height,
                                  int width, int side_height, int side_width, uintptr_t stream) {
  require_device();
  const auto p = ra_params(batch, channels, height, width, side_height, side_width);
  py::gil_scoped_release release;
  covfast::reverse_attention_bwd_cuda(p, dtype, ptr<const void>(grad), ptr<const void>(x), ptr<const void>(side),
                                      ptr<void>(grad_x), ptr<float>(grad_side_f32), as_stream(stream));
}

static void coach_mask(uintptr_t score, uintptr_t mask, uintptr_t thresholds, uintptr_t histograms, int dtype,
                       int64_t batch, int64_t pixels, int64_t k, float alpha, uintptr_t stream) {
  require_device();
  const covfast::CoachMaskParams p{batch, pixels, k, alpha};
  py::gil_scoped_release release;
  covfast::coach_mask_cuda(p, dtype, ptr<const void>(score), ptr<void>(mask), ptr<float>(thresholds),
                           ptr<uint32_t>(histograms), as_stream(stream));
}

// sizes: (B, C1, C2, H, W, he, we, h, w) of x [B,C1,H,W], edge [B,C2,he,we], side [B,1,h,w].
static covfast::ReverseAttentionParams ra_concat_params(const std::array<int64_t, 9>& sizes) {
  for (int64_t size : sizes)
    if (size < 0 || size > 0x7fffffff) throw std::invalid_argument("reverse_attention_concat: size out of range");
  auto p = ra_params(sizes[0], static_cast<int>(sizes[1]), static_cast<int>(sizes[3]), static_cast<int>(sizes[4]),
                     static_cast<int>(sizes[7]), static_cast<int>(sizes[8]));
  p.edge_channels = static_cast<int>(sizes[2]);
  p.edge_height = static_cast<int>(sizes[5]);
  p.edge_width = static_cast<int>(sizes[6]);
  p.edge_scale_h = sizes[3] ? static_cast<float>(sizes[5]) / static_cast<float>(sizes[3]) : 0.f;
  p.edge_scale_w = sizes[4] ? static_cast<float>(sizes[6]) / static_cast<float>(sizes[4]) : 0.f;
  return p;
}

static void reverse_attention_concat_fwd(uintptr_t x, uintptr_t edge, uintptr_t side, uintptr_t out, int dtype,
                                         const std::array<int64_t, 9>& sizes, uintptr_t stream) {
  require_device();
  const auto p = ra_concat_params(sizes);
  py::gil_scoped_release release;
  covfast::reverse_attention_concat_fwd_cuda(p, dtype, ptr<const void>(x), ptr<const void>(edge),
                                             ptr<const void>(side), ptr<void>(out), as_stream(stream));
}

static void reverse_attention_concat_bwd(uintptr_t grad, uintptr_t x, uintptr_t edge, uintptr_t side,
                                         uintptr_t grad_x, uintptr_t grad_edge_f32, uintptr_t grad_side_f32, int dtype,
                                         const std::array<int64_t, 9>& sizes, uintptr_t stream) {
  require_device();
  const auto p = ra_concat_params(sizes);
  py::gil_scoped_release release;
  covfast::reverse_attention_concat_bwd_cuda(p, dtype, ptr<const void>(grad), ptr<const void>(x),
                                             ptr<const void>(edge), ptr<const void>(side), ptr<void>(grad_x),
                                             ptr<float>(grad_edge_f32), ptr<float>(grad_side_f32), as_stream(stream));
}

using Shape4 = std::array<int64_t, 4>;

static covfast::RoiAlignCudaParams roi_align_params(const Shape4& features_shape, const Shape4& strides,
                                                    int64_t num_rois, int pooled_height, int pooled_width,
                                                    double spatial_scale, int sampling_ratio, bool aligned) {
  for (int64_t size : features_shape)
    if (size < 0) throw std::invalid_argument("roi_align: negative feature size");
  if (num_rois < 0 || pooled_height < 1 || pooled_width < 1)
    throw std::invalid_argument("roi_align: need num_rois >= 0 and a positive output size");
  return {features_shape[0], features_shape[1], features_shape[2], features_shape[3],
          {strides[0], strides[1], strides[2], strides[3]},
          num_rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned};
}

static void roi_align_forward(uintptr_t features, const Shape4& features_shape, const Shape4& features_strides,
                              uintptr_t rois, int64_t num_rois, int pooled_height, int pooled_width,
                              double spatial_scale, int sampling_ratio, bool aligned, int dtype, uintptr_t output,
                              uintptr_t stream) {
  require_device();
  const auto p = roi_align_params(features_shape, features_strides, num_rois, pooled_height, pooled_width,
                                  spatial_scale, sampling_ratio, aligned);
  py::gil_scoped_release release;
  covfast::roi_align_forward_cuda(p, dtype, ptr<const void>(features), ptr<const void>(rois), ptr<void>(output),
                                  as_stream(stream));
}

static void roi_align_backward(uintptr_t grad, const Shape4& grad_strides, uintptr_t rois, int64_t num_rois,
                               const Shape4& features_shape, int pooled_height, int pooled_width,
                               double spatial_scale, int sampling_ratio, bool aligned, int dtype,
                               uintptr_t grad_features, uintptr_t stream) {
  require_device();
  const auto p = roi_align_params(features_shape, grad_strides, num_rois, pooled_height, pooled_width,
                                  spatial_scale, sampling_ratio, aligned);
  py::gil_scoped_release release;
  covfast::roi_align_backward_cuda(p, dtype, ptr<const void>(grad), ptr<const void>(rois), ptr<void>(grad_features),
                                   as_stream(stream));
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "covfast CUDA kernels";
  m.def("device_count", &device_count, "Number of CUDA devices visible to the CUDA runtime (0 when none).");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with.");
  m.def("infection_ratio", &infection_ratio,
        "Per-slice counts of [D,H,W] device volumes (element strides) into zeroed int64 [D,2], int64 [D,2,2], "
        "float64 [D,2] outputs and an int32 flag set when a class exceeds 2. infection_type: 0 uint8, "
        "1 float16, 2 float32, 4 bfloat16.");
  m.def("reverse_attention_fwd", &reverse_attention_fwd,
        "out = x * (1 - sigmoid(bilinear(side))) for contiguous x [B,C,H,W], side [B,1,h,w]; dtype 0 float32, "
        "1 float16, 2 bfloat16.");
  m.def("reverse_attention_bwd", &reverse_attention_bwd,
        "grad_x [B,C,H,W] and grad_side accumulated into a zeroed float32 [B,1,h,w] workspace.");
  m.def("coach_mask", &coach_mask,
        "mask = sigmoid(alpha * (score - t)), t = k-th largest of each contiguous [B,1,H,W] image by radix "
        "select; writes float32 thresholds [B]; histograms: zeroed uint32 [4,B,256] workspace.");
  m.def("reverse_attention_concat_fwd", &reverse_attention_concat_fwd,
        "out [B,C1+C2,H,W] = cat([x, up(edge)], 1) * (1 - sigmoid(up(side))) for contiguous x [B,C1,H,W], "
        "edge [B,C2,he,we], side [B,1,h,w]; sizes (B, C1, C2, H, W, he, we, h, w); dtype 0 float32, 1 float16, "
        "2 bfloat16.");
  m.def("reverse_attention_concat_bwd", &reverse_attention_concat_bwd,
        "grad_x [B,C1,H,W], and grad_edge / grad_side accumulated into zeroed float32 workspaces.");
  m.def("roi_align_forward", &roi_align_forward,
        "RoIAlign of device features [B,C,H,W] (element strides) over contiguous rois [K,5] (float32; float64 for "
        "float64 features) into a contiguous [K,C,PH,PW] output; dtype 0 float32, 1 float16, 2 bfloat16, 3 float64.");
  m.def("roi_align_backward", &roi_align_backward,
        "Adds the RoIAlign gradient of grad [K,C,PH,PW] (element strides) into a zero-filled contiguous float32 "
        "(float64 for dtype 3) grad_features [B,C,H,W] with atomics; dtype as for roi_align_forward.");
}
