// RoIAlign forward and backward (covfast::roi_align), C++/OpenMP, torchvision's semantics.
#pragma once

#include <cstdint>

namespace covfast {

// Element type of features, rois, output and gradients.
enum class RoiAlignType : int { kFloat32 = 0, kFloat64 = 1 };

struct RoiAlignParams {
  RoiAlignType type;
  int64_t batch, channels, height, width;  // features [B, C, H, W]
  int64_t num_rois;                        // rois [K, 5] contiguous: (batch index, x1, y1, x2, y2)
  int64_t pooled_height, pooled_width;     // PH, PW
  double spatial_scale;
  int64_t sampling_ratio;  // samples per bin side; <= 0: ceil(roi size / pooled size) per RoI
  bool aligned;            // half-pixel offset; when false RoI sizes are clamped to at least 1
};

// Strides in elements of a [B, C, H, W] tensor.
struct Strides4d {
  int64_t b, c, h, w;
};

// Returns the index of the first RoI whose batch index is outside [0, B) (nothing is written then), or -1.
int64_t roi_align_check_rois(const RoiAlignParams& p, const void* rois);

// Output rows of each RoI, as compressed sparse rows: RoI k is written to output rows
// rows[offsets[k]] ... rows[offsets[k + 1] - 1]. Lets many slices share one call with repeated RoIs pooled once.
struct RoiSlots {
  const int64_t* offsets;  // [K + 1], offsets[0] = 0
  const int64_t* rows;     // [offsets[K]], each in [0, num_rows)
  int64_t num_rows;
};

// output: contiguous [K, C, PH, PW], or [slots->num_rows, C, PH, PW] when slots is given; the caller zero-fills
// rows that no RoI names.
void roi_align_forward_cpu(const RoiAlignParams& p, const void* features, const Strides4d& feature_strides,
                           const void* rois, void* output, const RoiSlots* slots = nullptr);

// grad_output: [K, C, PH, PW] with the given strides; grad_features: contiguous [B, C, H, W], zero-filled by the
// caller (the kernel adds into it).
void roi_align_backward_cpu(const RoiAlignParams& p, const void* grad_output, const Strides4d& grad_strides,
                            const void* rois, void* grad_features);

}  // namespace covfast
