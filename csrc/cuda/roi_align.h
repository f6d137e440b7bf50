// covfast::roi_align on CUDA (see roi_align.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace covfast {

// Element type of features / rois / output / grad: the covfast::FloatType codes, plus 3 for float64.
enum class RoiAlignCudaType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct RoiAlignCudaParams {
  int64_t batch, channels, height, width;  // features [B, C, H, W]
  int64_t feature_stride[4];               // element strides of features (forward) or of grad (backward)
  int64_t num_rois;                        // rois [K, 5] contiguous, float32 (float64 for float64 features)
  int pooled_height, pooled_width;
  double spatial_scale;  // cast to the arithmetic type, as torchvision does
  int sampling_ratio;  // <= 0: adaptive, ceil(roi size / pooled size)
  bool aligned;
};

// output: contiguous [K, C, PH, PW] of the features' type. rois are float32, or float64 for float64 features.
void roi_align_forward_cuda(const RoiAlignCudaParams& p, int dtype, const void* features, const void* rois,
                            void* output, cudaStream_t stream);

// grad: [K, C, PH, PW] with p.feature_stride as its strides; grad_features: contiguous [B, C, H, W] workspace,
// float32 (float64 for float64 grad), zero-filled by the caller (atomics add into it).
void roi_align_backward_cuda(const RoiAlignCudaParams& p, int dtype, const void* grad, const void* rois,
                             void* grad_features, cudaStream_t stream);

}  // namespace covfast
