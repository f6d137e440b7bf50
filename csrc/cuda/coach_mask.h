// covfast::coach_mask on CUDA (see coach_mask.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace covfast {

struct CoachMaskParams {
  int64_t batch;
  int64_t pixels;  // H * W per image; score and mask are contiguous [B, 1, H, W]
  int64_t k;       // the threshold is the k-th largest score of each image, 1 <= k <= pixels
  float alpha;
};

// histograms: uint32 [4, B, 256] workspace, zero-initialized by the caller. thresholds: float32 [B] output (the
// selected t per image). dtype: covfast::FloatType.
void coach_mask_cuda(const CoachMaskParams& p, int dtype, const void* score, void* mask, float* thresholds,
                     uint32_t* histograms, cudaStream_t stream);

}  // namespace covfast
