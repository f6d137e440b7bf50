// covfast::infection_ratio on CUDA: one pass over both volumes.
//
// Grid (chunks, D): block (c, d) reduces voxels [c * chunk, (c + 1) * chunk) of slice d (flat in-slice index
// i = h * W + w) into 6 counts, 2 soft sums and the largest class value, then adds them atomically into the
// zero-initialized per-slice outputs. Integer counts are exact; the float64 soft sums are added in a
// non-deterministic order (differences in the last bits only). Contiguous slices of float32 with 16-byte
// alignment take 4-wide vector loads.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/infection_ratio.h"

namespace covfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // voxels per block: 64 per thread

struct Counts {
  uint32_t lung_r = 0, lung_l = 0, c1_r = 0, c1_l = 0, c2_r = 0, c2_l = 0, max_class = 0;
  float soft_r = 0.f, soft_l = 0.f;

  // classes: value is 0/1/2 (class input); otherwise `positive` says p > threshold and value is p.
  __device__ __forceinline__ void add(uint8_t label, bool positive, bool class2, float soft) {
    const bool r = label == 1, l = label == 2;
    lung_r += r;
    lung_l += l;
    c1_r += r & positive;
    c1_l += l & positive;
    c2_r += r & class2;
    c2_l += l & class2;
    soft_r += r ? soft : 0.f;
    soft_l += l ? soft : 0.f;
  }
};

template <typename T>
__device__ __forceinline__ void add_voxel(Counts& c, uint8_t label, T value, float threshold) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    c.max_class = max(c.max_class, static_cast<uint32_t>(value));
    c.add(label, value == 1, value == 2, value != 0 ? 1.f : 0.f);
  } else {
    const float p = to_float(value);
    c.add(label, p > threshold, false, p);
  }
}

template <typename T, bool kContiguous, bool kVector>
__global__ void infection_ratio_kernel(InfectionRatioCudaParams p, float threshold) {
  __shared__ double scratch_f64[32];
  __shared__ unsigned long long scratch_u64[32];
  const int64_t d = blockIdx.y;
  const int64_t plane = p.height * p.width;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, plane);
  const auto* lung = static_cast<const uint8_t*>(p.lung) + d * p.lung_stride[0];
  const auto* values = static_cast<const T*>(p.infection) + d * p.infection_stride[0];
  Counts c;
  if constexpr (kVector) {
    // float32, contiguous slice, 16-byte aligned slice starts, plane % 4 == 0: 4 voxels per load
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kThreads) {
      const uchar4 labels = *reinterpret_cast<const uchar4*>(lung + i);
      const float4 probs = *reinterpret_cast<const float4*>(values + i);
      add_voxel(c, labels.x, probs.x, threshold);
      add_voxel(c, labels.y, probs.y, threshold);
      add_voxel(c, labels.z, probs.z, threshold);
      add_voxel(c, labels.w, probs.w, threshold);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      int64_t lung_offset = i, value_offset = i;
      if constexpr (!kContiguous) {
        const int64_t h = i / p.width, w = i - h * p.width;
        lung_offset = h * p.lung_stride[1] + w * p.lung_stride[2];
        value_offset = h * p.infection_stride[1] + w * p.infection_stride[2];
      }
      add_voxel(c, lung[lung_offset], values[value_offset], threshold);
    }
  }
  const uint32_t counts[6] = {c.lung_r, c.lung_l, c.c1_r, c.c1_l, c.c2_r, c.c2_l};
  // output slots: lung_voxels[d, side]; infected_voxels[d, side, class]
  unsigned long long* lung_out = reinterpret_cast<unsigned long long*>(p.lung_voxels) + d * 2;
  unsigned long long* infected_out = reinterpret_cast<unsigned long long*>(p.infected_voxels) + d * 4;
  unsigned long long* const targets[6] = {lung_out, lung_out + 1, infected_out, infected_out + 2,
                                          infected_out + 1, infected_out + 3};
  for (int k = 0; k < 6; ++k) {
    const unsigned long long total = block_sum<unsigned long long>(counts[k], scratch_u64);
    if (threadIdx.x == 0 && total) atomicAdd(targets[k], total);
  }
  const double soft_r = block_sum<double>(c.soft_r, scratch_f64);
  const double soft_l = block_sum<double>(c.soft_l, scratch_f64);
  if (threadIdx.x == 0) {
    atomicAdd(p.soft_sum + d * 2, soft_r);
    atomicAdd(p.soft_sum + d * 2 + 1, soft_l);
  }
  if constexpr (std::is_same_v<T, uint8_t>) {
    if (c.max_class > 2) atomicOr(p.bad_class_flag, 1);
  }
}

template <typename T>
void launch_typed(const InfectionRatioCudaParams& p, float threshold, cudaStream_t stream) {
  const int64_t plane = p.height * p.width;
  const dim3 grid(static_cast<unsigned>((plane + kChunk - 1) / kChunk), static_cast<unsigned>(p.depth));
  const bool contiguous = p.lung_stride[2] == 1 && p.infection_stride[2] == 1 && p.lung_stride[1] == p.width &&
                          p.infection_stride[1] == p.width;
  bool vector = false;
  if constexpr (std::is_same_v<T, float>) {
    vector = contiguous && plane % 4 == 0 && p.lung_stride[0] % 4 == 0 && p.infection_stride[0] % 4 == 0 &&
             reinterpret_cast<uintptr_t>(p.lung) % 4 == 0 && reinterpret_cast<uintptr_t>(p.infection) % 16 == 0;
  }
  if (vector) {
    infection_ratio_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(p, threshold);
  } else if (contiguous) {
    infection_ratio_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(p, threshold);
  } else {
    infection_ratio_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(p, threshold);
  }
  COVFAST_CHECK_LAUNCH();
}

}  // namespace

void infection_ratio_cuda(const InfectionRatioCudaParams& p, int infection_type, float threshold,
                          cudaStream_t stream) {
  if (p.depth <= 0 || p.height <= 0 || p.width <= 0) return;
  if (p.depth > 65535) throw std::invalid_argument("infection_ratio: more than 65535 slices");
  switch (infection_type) {
    case 0: launch_typed<uint8_t>(p, threshold, stream); break;
    case 1: launch_typed<__half>(p, threshold, stream); break;
    case 2: launch_typed<float>(p, threshold, stream); break;
    case 4: launch_typed<__nv_bfloat16>(p, threshold, stream); break;
    default: throw std::invalid_argument("infection_ratio: unsupported infection type on CUDA");
  }
}

}  // namespace covfast
