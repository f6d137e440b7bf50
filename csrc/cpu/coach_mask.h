// Threshold of the coach top-k mask (covfast::coach_mask), C++/OpenMP: per-image radix select of the k-th largest
// score. The mask itself, sigmoid(alpha * (score - t)), is one vectorised elementwise pass that torch does well.
#pragma once

#include <cstdint>

namespace covfast {

// score: contiguous [batch, pixels]; thresholds: [batch], the k-th largest score of each image, equal to
// torch.kthvalue(score, pixels - k + 1) (NaN counted as the largest value, as torch does). Requires 1 <= k <= pixels.
template <typename T>
void coach_threshold_cpu(const T* score, T* thresholds, int64_t batch, int64_t pixels, int64_t k);

}  // namespace covfast
