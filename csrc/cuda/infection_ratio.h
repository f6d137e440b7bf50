// covfast::infection_ratio on CUDA (see infection_ratio.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace covfast {

struct InfectionRatioCudaParams {
  const void* lung;       // [D, H, W] uint8 labels
  const void* infection;  // [D, H, W] uint8 classes or float16/bfloat16/float32 probabilities
  int64_t lung_stride[3], infection_stride[3];  // in elements
  int64_t depth, height, width;
  int64_t* lung_voxels;      // [D, 2], zero-initialized by the caller
  int64_t* infected_voxels;  // [D, 2, 2], zero-initialized
  double* soft_sum;          // [D, 2], zero-initialized
  int* bad_class_flag;       // [1], zero-initialized; set to 1 when a class value exceeds 2
};

// infection_type: 0 uint8 classes, 1 float16, 2 float32, 4 bfloat16 (3, float64, is not supported on CUDA).
// threshold: the largest float32 <= the user's threshold, so that float32 `p > threshold` is exact.
void infection_ratio_cuda(const InfectionRatioCudaParams& p, int infection_type, float threshold,
                          cudaStream_t stream);

}  // namespace covfast
