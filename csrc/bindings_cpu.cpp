// covfast._C: C++/OpenMP CPU kernels. Bindings take plain pointers (as integers), sizes and strides,
// never torch types, so the extension builds without torch and survives torch upgrades.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/coach_mask.h"
#include "cpu/infection_ratio.h"
#include "cpu/reverse_attention.h"
#include "cpu/roi_align.h"

#ifdef COVFAST_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static int max_threads() {
#ifdef COVFAST_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

using Strides = std::array<int64_t, 3>;

static covfast::Volume3d volume(uintptr_t ptr, const Strides& strides) {
  return {reinterpret_cast<const void*>(ptr), strides[0], strides[1], strides[2]};
}

// Returns false when uint8 class input holds a value greater than 2.
static bool infection_ratio(uintptr_t lung_ptr, const Strides& lung_strides, uintptr_t infection_ptr,
                            const Strides& infection_strides, int infection_type, int64_t depth, int64_t height,
                            int64_t width, double threshold, uintptr_t lung_voxels_ptr,
                            uintptr_t infected_voxels_ptr, uintptr_t soft_sum_ptr) {
  if (depth < 0 || height < 0 || width < 0) throw std::invalid_argument("infection_ratio: negative size");
  if (infection_type < 0 || infection_type > 3) throw std::invalid_argument("infection_ratio: unknown infection type");
  covfast::InfectionRatioParams p{volume(lung_ptr, lung_strides),
                                  volume(infection_ptr, infection_strides),
                                  static_cast<covfast::InfectionType>(infection_type),
                                  depth,
                                  height,
                                  width,
                                  threshold,
                                  reinterpret_cast<int64_t*>(lung_voxels_ptr),
                                  reinterpret_cast<int64_t*>(infected_voxels_ptr),
                                  reinterpret_cast<double*>(soft_sum_ptr)};
  if (depth == 0) return true;
  py::gil_scoped_release release;
  return covfast::infection_ratio_cpu(p);
}

using Strides4 = std::array<int64_t, 4>;

static covfast::RoiAlignParams roi_align_params(int dtype, const Strides4& features_shape, int64_t num_rois,
                                                int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                                                int64_t sampling_ratio, bool aligned) {
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("roi_align: dtype must be 0 (float32) or 1 (float64)");
  for (int64_t size : features_shape)
    if (size < 0) throw std::invalid_argument("roi_align: negative feature size");
  if (num_rois < 0 || pooled_height < 1 || pooled_width < 1)
    throw std::invalid_argument("roi_align: need num_rois >= 0 and a positive output size");
  return {static_cast<covfast::RoiAlignType>(dtype), features_shape[0], features_shape[1], features_shape[2],
          features_shape[3], num_rois, pooled_height, pooled_width, spatial_scale, sampling_ratio, aligned};
}

static void check_roi_batch_indices(const covfast::RoiAlignParams& p, uintptr_t rois_ptr) {
  const int64_t bad = covfast::roi_align_check_rois(p, reinterpret_cast<const void*>(rois_ptr));
  if (bad >= 0)
    throw std::invalid_argument("roi_align: RoI " + std::to_string(bad) + " has a batch index outside [0, " +
                                std::to_string(p.batch) + ")");
}

static void roi_align_forward(uintptr_t features_ptr, const Strides4& features_shape,
                              const Strides4& features_strides, uintptr_t rois_ptr, int64_t num_rois,
                              int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                              int64_t sampling_ratio, bool aligned, int dtype, uintptr_t output_ptr,
                              uintptr_t slot_offsets_ptr, uintptr_t slot_rows_ptr, int64_t num_rows) {
  const auto p = roi_align_params(dtype, features_shape, num_rois, pooled_height, pooled_width, spatial_scale,
                                  sampling_ratio, aligned);
  check_roi_batch_indices(p, rois_ptr);
  const covfast::RoiSlots slots{reinterpret_cast<const int64_t*>(slot_offsets_ptr),
                                reinterpret_cast<const int64_t*>(slot_rows_ptr), num_rows};
  if (slot_offsets_ptr) {  // every output row must be inside the output, or the kernel would write out of bounds
    if (slots.offsets[0] != 0) throw std::invalid_argument("roi_align: slot offsets must start at 0");
    for (int64_t k = 0; k < num_rois; ++k)
      if (slots.offsets[k + 1] < slots.offsets[k]) throw std::invalid_argument("roi_align: decreasing slot offsets");
    for (int64_t i = 0; i < slots.offsets[num_rois]; ++i)
      if (slots.rows[i] < 0 || slots.rows[i] >= num_rows)
        throw std::invalid_argument("roi_align: slot row out of range");
  }
  if (p.num_rois == 0 || p.channels == 0) return;
  if (p.height == 0 || p.width == 0) throw std::invalid_argument("roi_align: empty feature map");
  const covfast::Strides4d strides{features_strides[0], features_strides[1], features_strides[2], features_strides[3]};
  py::gil_scoped_release release;
  covfast::roi_align_forward_cpu(p, reinterpret_cast<const void*>(features_ptr), strides,
                                 reinterpret_cast<const void*>(rois_ptr), reinterpret_cast<void*>(output_ptr),
                                 slot_offsets_ptr ? &slots : nullptr);
}

static void roi_align_backward(uintptr_t grad_ptr, const Strides4& grad_strides, uintptr_t rois_ptr,
                               int64_t num_rois, const Strides4& features_shape, int64_t pooled_height,
                               int64_t pooled_width, double spatial_scale, int64_t sampling_ratio, bool aligned,
                               int dtype, uintptr_t grad_features_ptr) {
  const auto p = roi_align_params(dtype, features_shape, num_rois, pooled_height, pooled_width, spatial_scale,
                                  sampling_ratio, aligned);
  check_roi_batch_indices(p, rois_ptr);
  if (p.num_rois == 0 || p.channels == 0 || p.height == 0 || p.width == 0) return;
  const covfast::Strides4d strides{grad_strides[0], grad_strides[1], grad_strides[2], grad_strides[3]};
  py::gil_scoped_release release;
  covfast::roi_align_backward_cpu(p, reinterpret_cast<const void*>(grad_ptr), strides,
                                  reinterpret_cast<const void*>(rois_ptr), reinterpret_cast<void*>(grad_features_ptr));
}

using ReverseAttentionSizes = std::array<int64_t, 9>;  // B, C1, C2, H, W, he, we, h, w

static covfast::ReverseAttentionShape reverse_attention_shape(int dtype, const ReverseAttentionSizes& sizes) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("reverse_attention: dtype must be 0 (float32) or 1 (float64)");
  for (int64_t size : sizes)
    if (size < 0) throw std::invalid_argument("reverse_attention: negative size");
  const covfast::ReverseAttentionShape s{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                                         sizes[5], sizes[6], sizes[7], sizes[8]};
  const bool empty_output = s.batch * (s.channels + s.edge_channels) * s.height * s.width == 0;
  if (!empty_output && s.side_height * s.side_width == 0) throw std::invalid_argument("reverse_attention: empty side");
  if (!empty_output && s.edge_channels > 0 && s.edge_height * s.edge_width == 0)
    throw std::invalid_argument("reverse_attention: empty edge");
  return s;
}

// Calls fn with a null T* (T = float for dtype 0, double for 1) whose type selects the kernel instantiation.
template <typename Fn>
static void with_float_type(int dtype, Fn&& fn) {
  if (dtype == 0)
    fn(static_cast<float*>(nullptr));
  else
    fn(static_cast<double*>(nullptr));
}

static void reverse_attention_concat_fwd(uintptr_t x, uintptr_t edge, uintptr_t side, uintptr_t out, int dtype,
                                         const ReverseAttentionSizes& sizes) {
  const auto s = reverse_attention_shape(dtype, sizes);
  py::gil_scoped_release release;
  with_float_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    covfast::reverse_attention_concat_fwd_cpu(s, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(edge),
                                              reinterpret_cast<const T*>(side), reinterpret_cast<T*>(out));
  });
}

static void reverse_attention_concat_bwd(uintptr_t grad, uintptr_t x, uintptr_t edge, uintptr_t side,
                                         uintptr_t grad_x, uintptr_t grad_edge, uintptr_t grad_side, int dtype,
                                         const ReverseAttentionSizes& sizes) {
  const auto s = reverse_attention_shape(dtype, sizes);
  py::gil_scoped_release release;
  with_float_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    covfast::reverse_attention_concat_bwd_cpu(s, reinterpret_cast<const T*>(grad), reinterpret_cast<const T*>(x),
                                              reinterpret_cast<const T*>(edge), reinterpret_cast<const T*>(side),
                                              reinterpret_cast<T*>(grad_x), reinterpret_cast<T*>(grad_edge),
                                              reinterpret_cast<T*>(grad_side));
  });
}

static void coach_threshold(uintptr_t score, uintptr_t thresholds, int dtype, int64_t batch, int64_t pixels,
                            int64_t k) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("coach_threshold: dtype must be 0 (float32) or 1 (float64)");
  if (batch < 0 || pixels < 1 || k < 1 || k > pixels)
    throw std::invalid_argument("coach_threshold: need batch >= 0, pixels >= 1 and 1 <= k <= pixels");
  py::gil_scoped_release release;
  with_float_type(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    covfast::coach_threshold_cpu(reinterpret_cast<const T*>(score), reinterpret_cast<T*>(thresholds), batch,
                                 pixels, k);
  });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "covfast C++ CPU kernels";
  m.def("openmp_max_threads", &max_threads, "Number of OpenMP threads the kernels use (1 without OpenMP).");
  m.def("infection_ratio", &infection_ratio, py::arg("lung_ptr"), py::arg("lung_strides"), py::arg("infection_ptr"),
        py::arg("infection_strides"), py::arg("infection_type"), py::arg("depth"), py::arg("height"),
        py::arg("width"), py::arg("threshold"), py::arg("lung_voxels_ptr"), py::arg("infected_voxels_ptr"),
        py::arg("soft_sum_ptr"),
        "Per-slice lung/infection counts of [D,H,W] volumes given as data pointers and element strides. "
        "infection_type: 0 uint8 classes, 1 float16, 2 float32, 3 float64. Outputs: int64 [D,2], int64 [D,2,2], "
        "float64 [D,2], written through the given pointers. Returns False if a class value exceeds 2.");
  m.def("coach_threshold", &coach_threshold, py::arg("score_ptr"), py::arg("thresholds_ptr"), py::arg("dtype"),
        py::arg("batch"), py::arg("pixels"), py::arg("k"),
        "Coach mask threshold of contiguous scores [batch, pixels]: thresholds [batch] = the k-th largest score of "
        "each image (radix select; equals torch.kthvalue, ties and NaN included); dtype 0 float32, 1 float64.");
  m.def("roi_align_forward", &roi_align_forward, py::arg("features_ptr"), py::arg("features_shape"),
        py::arg("features_strides"), py::arg("rois_ptr"), py::arg("num_rois"), py::arg("pooled_height"),
        py::arg("pooled_width"), py::arg("spatial_scale"), py::arg("sampling_ratio"), py::arg("aligned"),
        py::arg("dtype"), py::arg("output_ptr"), py::arg("slot_offsets_ptr") = 0, py::arg("slot_rows_ptr") = 0,
        py::arg("num_rows") = 0,
        "RoIAlign of features [B,C,H,W] (element strides) over contiguous rois [K,5] into a contiguous "
        "[K,C,PH,PW] output; dtype 0 float32, 1 float64 (all three tensors). With slots (int64 CSR: offsets [K+1], "
        "rows), RoI k is pooled once and written to output rows rows[offsets[k]:offsets[k+1]] of a [num_rows,C,PH,PW] "
        "output. Raises ValueError on a RoI whose batch index is outside [0, B) or a bad slot.");
  m.def("roi_align_backward", &roi_align_backward, py::arg("grad_ptr"), py::arg("grad_strides"),
        py::arg("rois_ptr"), py::arg("num_rois"), py::arg("features_shape"), py::arg("pooled_height"),
        py::arg("pooled_width"), py::arg("spatial_scale"), py::arg("sampling_ratio"), py::arg("aligned"),
        py::arg("dtype"), py::arg("grad_features_ptr"),
        "Adds the RoIAlign gradient of grad [K,C,PH,PW] (element strides) into a zero-filled contiguous "
        "grad_features [B,C,H,W]; dtype 0 float32, 1 float64.");
  m.def("reverse_attention_concat_fwd", &reverse_attention_concat_fwd, py::arg("x_ptr"), py::arg("edge_ptr"),
        py::arg("side_ptr"), py::arg("out_ptr"), py::arg("dtype"), py::arg("sizes"),
        "out = cat([x, up(edge)], 1) * (1 - sigmoid(up(side))) for contiguous x [B,C1,H,W], edge [B,C2,he,we], "
        "side [B,1,h,w], out [B,C1+C2,H,W]; sizes (B, C1, C2, H, W, he, we, h, w); dtype 0 float32, 1 float64. "
        "C2 = 0 gives reverse_attention.");
  m.def("reverse_attention_concat_bwd", &reverse_attention_concat_bwd, py::arg("grad_ptr"), py::arg("x_ptr"),
        py::arg("edge_ptr"), py::arg("side_ptr"), py::arg("grad_x_ptr"), py::arg("grad_edge_ptr"),
        py::arg("grad_side_ptr"), py::arg("dtype"), py::arg("sizes"),
        "Gradients of reverse_attention_concat_fwd written into contiguous grad_x, grad_edge, grad_side "
        "(no zero-filling needed); same sizes and dtype codes.");
}
