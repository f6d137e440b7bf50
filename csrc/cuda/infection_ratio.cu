// covfast::infection_ratio on CUDA: one pass over both volumes.
//
// Grid (chunks, D): block (c, d) reduces voxels [c * chunk, (c + 1) * chunk) of slice d (flat in-slice index
// i = h * W + w) into 6 counts, 2 soft sums and the largest class value, then adds them atomically into the
// zero-initialized per-slice outputs. Integer counts are exact; the float64 soft sums are added in a
// non-deterministic order (differences in the last bits only). Contiguous, 16-byte aligned slices take 16-byte
// loads, 16 voxels per thread and step, so many loads are in flight per thread.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/infection_ratio.h"

namespace covfast {
namespace {

constexpr int kThreads = 256;
// Voxels per block: 8 vector steps per thread. On an H100, 8192 (4.5 waves at 512 x 512 x 150) measured no faster
// for float32 and slower for uint8 than this.
constexpr int64_t kChunk = 32768;

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

// 16 voxels per thread and step: 16 labels in one 16-byte load, their values in 16 / sizeof(T) 16-byte loads.
template <typename T>
__device__ __forceinline__ void add_16(Counts& c, const uint8_t* lung, const T* values, int64_t i, float threshold) {
  const uint4 label_bits = *reinterpret_cast<const uint4*>(lung + i);
  const uint8_t* labels = reinterpret_cast<const uint8_t*>(&label_bits);
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int part = 0; part < 16 / kPerLoad; ++part) {
    const uint4 value_bits = *reinterpret_cast<const uint4*>(values + i + part * kPerLoad);
    const T* v = reinterpret_cast<const T*>(&value_bits);
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) add_voxel(c, labels[part * kPerLoad + j], v[j], threshold);
  }
}

template <typename T, bool kContiguous, bool kVector>
__global__ void __launch_bounds__(kThreads) infection_ratio_kernel(InfectionRatioCudaParams p, float threshold) {
  constexpr int kFields = 9;  // 6 counts, max class, 2 soft sums (as float bits)
  __shared__ float partial[kThreads / 32][kFields];
  const int64_t d = blockIdx.y;
  const int64_t plane = p.height * p.width;
  const int64_t begin = blockIdx.x * kChunk;
  const int64_t end = min(begin + kChunk, plane);
  const auto* lung = static_cast<const uint8_t*>(p.lung) + d * p.lung_stride[0];
  const auto* values = static_cast<const T*>(p.infection) + d * p.infection_stride[0];
  Counts c;
  if constexpr (kVector) {
    for (int64_t i = begin + 16 * threadIdx.x; i < end; i += 16 * kThreads) add_16(c, lung, values, i, threshold);
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
  // Warp sums by shuffles, then warp 0 adds the per-warp partials: one barrier per block. Counts stay below 2^24
  // per block (kChunk voxels), so they are exact in float.
  float fields[kFields] = {float(c.lung_r), float(c.lung_l), float(c.c1_r), float(c.c1_l),  float(c.c2_r),
                           float(c.c2_l),  float(c.max_class), c.soft_r,      c.soft_l};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int f = 0; f < kFields; ++f) {
    fields[f] = f == 6 ? fields[f] : warp_sum(fields[f]);
    if (f == 6) {
      for (int offset = 16; offset > 0; offset >>= 1)
        fields[f] = fmaxf(fields[f], __shfl_down_sync(0xffffffffu, fields[f], offset));
    }
    if (lane == 0) partial[warp][f] = fields[f];
  }
  __syncthreads();
  if (threadIdx.x < kFields) {
    const int f = threadIdx.x;
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total = f == 6 ? (partial[w][f] > total ? partial[w][f] : total) : total + partial[w][f];
    // output slots: lung_voxels[d, side]; infected_voxels[d, side, class]
    auto* lung_out = reinterpret_cast<unsigned long long*>(p.lung_voxels) + d * 2;
    auto* infected_out = reinterpret_cast<unsigned long long*>(p.infected_voxels) + d * 4;
    unsigned long long* const targets[6] = {lung_out,         lung_out + 1,     infected_out,
                                            infected_out + 2, infected_out + 1, infected_out + 3};
    if (f < 6) {
      if (total > 0) atomicAdd(targets[f], static_cast<unsigned long long>(total));
    } else if (f == 6) {
      if (total > 2) atomicOr(p.bad_class_flag, 1);
    } else {
      atomicAdd(p.soft_sum + d * 2 + (f - 7), total);
    }
  }
}

template <typename T>
void launch_typed(const InfectionRatioCudaParams& p, float threshold, cudaStream_t stream) {
  const int64_t plane = p.height * p.width;
  const dim3 grid(static_cast<unsigned>((plane + kChunk - 1) / kChunk), static_cast<unsigned>(p.depth));
  const bool contiguous = p.lung_stride[2] == 1 && p.infection_stride[2] == 1 && p.lung_stride[1] == p.width &&
                          p.infection_stride[1] == p.width;
  const bool vector = contiguous && plane % 16 == 0 && p.lung_stride[0] % 16 == 0 &&
                      (p.infection_stride[0] * sizeof(T)) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.lung) % 16 == 0 && reinterpret_cast<uintptr_t>(p.infection) % 16 == 0;
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
