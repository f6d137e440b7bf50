// Per-slice lung and infection voxel counts (covfast::infection_ratio), C++/OpenMP.
#pragma once

#include <cstdint>

namespace covfast {

// Element type of the infection volume.
enum class InfectionType : int { kClassesU8 = 0, kFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// A [D, H, W] volume: data pointer and strides in elements.
struct Volume3d {
  const void* data;
  int64_t stride_d, stride_h, stride_w;
};

struct InfectionRatioParams {
  Volume3d lung;       // uint8 labels: 1 right, 2 left, anything else outside the lung
  Volume3d infection;  // probabilities or uint8 classes (0, 1, 2)
  InfectionType type;
  int64_t depth, height, width;
  // Probabilities p count as infected when p > threshold. For float16/float32 input the caller passes the
  // largest float32 <= the user's threshold, which makes the float32 comparison exact.
  double threshold;
  int64_t* lung_voxels;      // [D, 2] (right, left)
  int64_t* infected_voxels;  // [D, 2, 2] (right, left) x (class 1, class 2)
  double* soft_sum;          // [D, 2]
};

// Fills the three outputs. Returns false when uint8 class input holds a value greater than 2 (outputs are then
// unspecified).
bool infection_ratio_cpu(const InfectionRatioParams& p);

}  // namespace covfast
