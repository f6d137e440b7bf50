// covfast::coach_mask on CUDA (the coach network's soft top-k mask, Zhou et al., ECCV 2020):
//   mask = sigmoid(alpha * (score - t)),  t = k-th largest score of each image.
//
// t comes from a radix select, not a sort: scores map to order-preserving uint32 keys, and 4 passes each
// histogram the next 8 bits of the keys that share the digits chosen so far (grid (G, B): G blocks per image,
// shared-memory histograms added atomically into a global [4, B, 256] table). At the start of every pass, and of
// the final mask pass, each block re-derives the chosen digits from the earlier histograms with one warp, so no
// host round trip or extra launch is needed. The key found is exactly a score of the image, so t equals
// torch.kthvalue on the same data, ties included.
#include <cstdint>

#include "cuda/coach_mask.h"
#include "cuda/common.cuh"

namespace covfast {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 256;

__device__ __forceinline__ uint32_t to_key(float v) {
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_key(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

struct SelectState {
  uint32_t prefix, prefix_mask;
  uint32_t k;  // rank of the target among keys that match the prefix, 1 = largest
};

// Replays the digit choices of passes [0, passes) for image b; every thread gets the state. Warp 0 does the work:
// lane L owns bins [8L, 8L + 8), a suffix scan over lanes finds the lane whose bins hold the k-th largest key.
__device__ SelectState derive_state(const uint32_t* histograms, int64_t batch, int64_t b, int passes, uint32_t k) {
  __shared__ SelectState state;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    SelectState s{0u, 0u, k};
    for (int pass = 0; pass < passes; ++pass) {
      const uint32_t* hist = histograms + (pass * batch + b) * kBins + lane * 8;
      uint32_t bins[8], own = 0;
      for (int j = 0; j < 8; ++j) own += (bins[j] = hist[j]);
      uint32_t suffix = own;  // inclusive sum over lanes >= lane
      for (int offset = 1; offset < 32; offset <<= 1) {
        const uint32_t other = __shfl_down_sync(0xffffffffu, suffix, offset);
        if (lane + offset < 32) suffix += other;
      }
      const uint32_t above = suffix - own;
      const bool mine = above < s.k && s.k <= suffix;
      uint32_t digit = 0, k_next = 0;
      if (mine) {
        uint32_t cumulative = above;
        for (int j = 7; j >= 0; --j) {
          if (cumulative + bins[j] >= s.k) {
            digit = lane * 8 + j;
            k_next = s.k - cumulative;
            break;
          }
          cumulative += bins[j];
        }
      }
      const int owner = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
      digit = __shfl_sync(0xffffffffu, digit, owner);
      k_next = __shfl_sync(0xffffffffu, k_next, owner);
      const int shift = 24 - 8 * pass;
      s.prefix |= digit << shift;
      s.prefix_mask |= 0xffu << shift;
      s.k = k_next;
    }
    if (lane == 0) state = s;
  }
  __syncthreads();
  return state;
}

template <typename T>
__global__ void coach_histogram_kernel(CoachMaskParams p, const T* __restrict__ score, uint32_t* histograms,
                                       int pass) {
  __shared__ uint32_t local[kBins];
  const int64_t b = blockIdx.y;
  const SelectState s = derive_state(histograms, p.batch, b, pass, static_cast<uint32_t>(p.k));
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const int shift = 24 - 8 * pass;
  const T* image = score + b * p.pixels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.pixels;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint32_t key = to_key(to_float(image[i]));
    if ((key & s.prefix_mask) == s.prefix) atomicAdd(&local[(key >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  uint32_t* hist = histograms + (pass * p.batch + b) * kBins;
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    if (local[i]) atomicAdd(&hist[i], local[i]);
  }
}

template <typename T>
__global__ void coach_apply_kernel(CoachMaskParams p, const T* __restrict__ score, T* __restrict__ mask,
                                   float* thresholds, const uint32_t* histograms) {
  const int64_t b = blockIdx.y;
  const SelectState s = derive_state(histograms, p.batch, b, 4, static_cast<uint32_t>(p.k));
  const float t = from_key(s.prefix);
  if (blockIdx.x == 0 && threadIdx.x == 0) thresholds[b] = t;
  const int64_t base = b * p.pixels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.pixels;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float z = p.alpha * (to_float(score[base + i]) - t);
    mask[base + i] = from_float<T>(1.f / (1.f + __expf(-z)));
  }
}

template <typename T>
void launch(const CoachMaskParams& p, const T* score, T* mask, float* thresholds, uint32_t* histograms,
            cudaStream_t stream) {
  // about 16 elements per thread, at most 64 blocks per image
  int64_t per_image = (p.pixels + kThreads * 16 - 1) / (kThreads * 16);
  per_image = per_image < 1 ? 1 : (per_image > 64 ? 64 : per_image);
  const dim3 grid(static_cast<unsigned>(per_image), static_cast<unsigned>(p.batch));
  for (int pass = 0; pass < 4; ++pass) {
    coach_histogram_kernel<T><<<grid, kThreads, 0, stream>>>(p, score, histograms, pass);
    COVFAST_CHECK_LAUNCH();
  }
  coach_apply_kernel<T><<<grid, kThreads, 0, stream>>>(p, score, mask, thresholds, histograms);
  COVFAST_CHECK_LAUNCH();
}

}  // namespace

void coach_mask_cuda(const CoachMaskParams& p, int dtype, const void* score, void* mask, float* thresholds,
                     uint32_t* histograms, cudaStream_t stream) {
  if (p.batch == 0 || p.pixels == 0) return;
  if (p.k < 1 || p.k > p.pixels) throw std::invalid_argument("coach_mask: k out of range");
  if (p.batch > 65535) throw std::invalid_argument("coach_mask: batch larger than 65535");
  if (p.pixels > 0xffffffffLL) throw std::invalid_argument("coach_mask: image too large");
  switch (static_cast<FloatType>(dtype)) {
    case FloatType::kFloat32:
      launch(p, static_cast<const float*>(score), static_cast<float*>(mask), thresholds, histograms, stream);
      break;
    case FloatType::kFloat16:
      launch(p, static_cast<const __half*>(score), static_cast<__half*>(mask), thresholds, histograms, stream);
      break;
    case FloatType::kBFloat16:
      launch(p, static_cast<const __nv_bfloat16*>(score), static_cast<__nv_bfloat16*>(mask), thresholds,
             histograms, stream);
      break;
    default:
      throw std::invalid_argument("coach_mask: unsupported dtype");
  }
}

}  // namespace covfast
