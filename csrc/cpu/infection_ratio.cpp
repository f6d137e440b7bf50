// covfast::infection_ratio on the CPU: one pass over both volumes, OpenMP over slices, SIMD along rows.
//
// Float rows run an SSE2 loop (16 voxels per step, branch-free masks): GCC does not if-convert the scalar loop, and
// a branchy loop on random labels mispredicts. Vector lanes hold int32 counts and float sums over blocks of at most
// kSumBlock voxels, which are then added into int64 / double per slice, so no precision is lost.
#include "cpu/infection_ratio.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace covfast {
namespace {

constexpr int64_t kSumBlock = 1024;

// IEEE half -> float by bit manipulation (no F16C needed); exact for every half including subnormals, inf, NaN.
inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t bits = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = bits & shifted_exp;
  bits += (127u - 15u) << 23;
  float f;
  if (exp == shifted_exp) {
    bits += (128u - 16u) << 23;  // inf / NaN keep an all-ones exponent
    std::memcpy(&f, &bits, 4);
  } else if (exp == 0) {
    bits += 1u << 23;  // zero / subnormal: renormalize by subtracting the implicit one
    std::memcpy(&f, &bits, 4);
    const uint32_t magic_bits = 113u << 23;
    float magic;
    std::memcpy(&magic, &magic_bits, 4);
    f -= magic;
  } else {
    std::memcpy(&f, &bits, 4);
  }
  uint32_t out;
  std::memcpy(&out, &f, 4);
  out |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  std::memcpy(&f, &out, 4);
  return f;
}

// Widens a float16 row into dst; F16C (vcvtph2ps) when the CPU has it, chosen at run time so the build stays
// portable.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define COVFAST_HAVE_F16C_PATH 1  // also guards the AVX2 row loop
__attribute__((target("f16c"))) void widen_half_row_f16c(const uint16_t* src, float* dst, int64_t width) {
  int64_t w = 0;
  for (; w + 8 <= width; w += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + w));
    _mm256_storeu_ps(dst + w, _mm256_cvtph_ps(h));
  }
  for (; w < width; ++w) dst[w] = half_to_float(src[w]);
}
#endif

void widen_half_row(const uint16_t* src, int64_t stride, float* dst, int64_t width) {
#ifdef COVFAST_HAVE_F16C_PATH
  static const bool has_f16c = __builtin_cpu_supports("f16c");
  if (stride == 1 && has_f16c) {
    widen_half_row_f16c(src, dst, width);
    return;
  }
#endif
  for (int64_t w = 0; w < width; ++w) dst[w] = half_to_float(src[w * stride]);
}

struct SliceTotals {
  int64_t lung[2] = {0, 0};
  int64_t infected[2][2] = {{0, 0}, {0, 0}};
  double soft[2] = {0.0, 0.0};
  bool bad_class = false;
};

// Any row, scalar: strided input, float64 (compared in double), and the tails of the vector loop.
template <typename T, typename C>
void reduce_prob_row_scalar(const uint8_t* lung, int64_t lung_sw, const T* prob, int64_t prob_sw, int64_t width,
                            C threshold, SliceTotals& acc) {
  for (int64_t w = 0; w < width; ++w) {
    const uint8_t label = lung[w * lung_sw];
    if (label != 1 && label != 2) continue;
    const C p = static_cast<C>(prob[w * prob_sw]);
    acc.lung[label - 1] += 1;
    acc.infected[label - 1][0] += p > threshold;
    acc.soft[label - 1] += static_cast<double>(p);
  }
}

#if defined(__SSE2__)
// 32-bit lane masks for the 4 voxels of byte_mask starting at byte 4 * kQuarter (a byte mask is 0x00 or 0xff, so
// interleaving it with itself sign-extends it).
template <int kQuarter>
inline __m128i widen_mask(__m128i byte_mask) {
  const __m128i words = kQuarter < 2 ? _mm_unpacklo_epi8(byte_mask, byte_mask) : _mm_unpackhi_epi8(byte_mask, byte_mask);
  return kQuarter % 2 == 0 ? _mm_unpacklo_epi16(words, words) : _mm_unpackhi_epi16(words, words);
}

struct LaneTotals {
  __m128i lung[2], infected[2];  // negated counts: a set mask lane is -1
  __m128 soft[2];
};

template <int kQuarter>
inline void reduce_quarter(__m128i is_r8, __m128i is_l8, __m128 prob, __m128 threshold, LaneTotals& t) {
  const __m128i pos = _mm_castps_si128(_mm_cmpgt_ps(prob, threshold));
  const __m128i masks[2] = {widen_mask<kQuarter>(is_r8), widen_mask<kQuarter>(is_l8)};
  for (int lung = 0; lung < 2; ++lung) {
    t.lung[lung] = _mm_add_epi32(t.lung[lung], masks[lung]);
    t.infected[lung] = _mm_add_epi32(t.infected[lung], _mm_and_si128(masks[lung], pos));
    t.soft[lung] = _mm_add_ps(t.soft[lung], _mm_and_ps(_mm_castsi128_ps(masks[lung]), prob));
  }
}

inline int64_t lane_sum(__m128i v) {
  alignas(16) int32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), v);
  return static_cast<int64_t>(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
}

inline double lane_sum(__m128 v) {
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, v);
  return (static_cast<double>(lanes[0]) + lanes[1]) + (static_cast<double>(lanes[2]) + lanes[3]);
}
#endif

#ifdef COVFAST_HAVE_F16C_PATH
// The float row loop with AVX2, 16 voxels per step in two independent accumulator sets; picked at run time.
struct Avx2Lanes {
  __m256i lung[2], infected[2];  // negated counts
  __m256 soft[2];
};

__attribute__((target("avx2"))) inline void avx2_step(const uint8_t* lung, const float* prob, __m256 thr,
                                                      Avx2Lanes& t) {
  const __m256i labels = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lung)));
  const __m256 p = _mm256_loadu_ps(prob);
  const __m256i pos = _mm256_castps_si256(_mm256_cmp_ps(p, thr, _CMP_GT_OQ));
  const __m256i masks[2] = {_mm256_cmpeq_epi32(labels, _mm256_set1_epi32(1)),
                            _mm256_cmpeq_epi32(labels, _mm256_set1_epi32(2))};
  for (int side = 0; side < 2; ++side) {
    t.lung[side] = _mm256_add_epi32(t.lung[side], masks[side]);
    t.infected[side] = _mm256_add_epi32(t.infected[side], _mm256_and_si256(masks[side], pos));
    t.soft[side] = _mm256_add_ps(t.soft[side], _mm256_and_ps(_mm256_castsi256_ps(masks[side]), p));
  }
}

__attribute__((target("avx2"))) int64_t reduce_float_row_avx2(const uint8_t* lung, const float* prob, int64_t width,
                                                              float threshold, SliceTotals& acc) {
  const __m256 thr = _mm256_set1_ps(threshold);
  int64_t w = 0;
  for (int64_t block = 0; block + 16 <= width; block += kSumBlock) {
    const int64_t stop = std::min(width, block + kSumBlock) & ~int64_t{15};
    Avx2Lanes a, b;
    for (Avx2Lanes* t : {&a, &b}) {
      for (int side = 0; side < 2; ++side) {
        t->lung[side] = t->infected[side] = _mm256_setzero_si256();
        t->soft[side] = _mm256_setzero_ps();
      }
    }
    for (w = block; w + 16 <= stop; w += 16) {
      avx2_step(lung + w, prob + w, thr, a);
      avx2_step(lung + w + 8, prob + w + 8, thr, b);
    }
    for (int side = 0; side < 2; ++side) {
      alignas(32) int32_t counts[8], infected[8];
      alignas(32) float soft[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(counts), _mm256_add_epi32(a.lung[side], b.lung[side]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(infected), _mm256_add_epi32(a.infected[side], b.infected[side]));
      _mm256_store_ps(soft, _mm256_add_ps(a.soft[side], b.soft[side]));
      for (int i = 0; i < 8; ++i) {
        acc.lung[side] -= counts[i];
        acc.infected[side][0] -= infected[i];
        acc.soft[side] += soft[i];
      }
    }
  }
  return w;
}
#endif

// Contiguous row of float32 probabilities: the hot loop, 16 voxels per step with AVX2 where the CPU has it, else
// SSE2 (every x86-64 CPU has it).
void reduce_float_row(const uint8_t* lung, const float* prob, int64_t width, float threshold, SliceTotals& acc) {
  int64_t w = 0;
#ifdef COVFAST_HAVE_F16C_PATH
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) {
    w = reduce_float_row_avx2(lung, prob, width, threshold, acc);
    reduce_prob_row_scalar<float, float>(lung + w, 1, prob + w, 1, width - w, threshold, acc);
    return;
  }
#endif
#if defined(__SSE2__)
  const __m128i one = _mm_set1_epi8(1), two = _mm_set1_epi8(2);
  const __m128 thr = _mm_set1_ps(threshold);
  for (int64_t block = 0; block + 16 <= width; block += kSumBlock) {
    const int64_t stop = std::min(width, block + kSumBlock) & ~int64_t{15};
    LaneTotals t{{_mm_setzero_si128(), _mm_setzero_si128()},
                 {_mm_setzero_si128(), _mm_setzero_si128()},
                 {_mm_setzero_ps(), _mm_setzero_ps()}};
    for (w = block; w + 16 <= stop; w += 16) {
      const __m128i labels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lung + w));
      const __m128i is_r = _mm_cmpeq_epi8(labels, one), is_l = _mm_cmpeq_epi8(labels, two);
      reduce_quarter<0>(is_r, is_l, _mm_loadu_ps(prob + w), thr, t);
      reduce_quarter<1>(is_r, is_l, _mm_loadu_ps(prob + w + 4), thr, t);
      reduce_quarter<2>(is_r, is_l, _mm_loadu_ps(prob + w + 8), thr, t);
      reduce_quarter<3>(is_r, is_l, _mm_loadu_ps(prob + w + 12), thr, t);
    }
    for (int lung_side = 0; lung_side < 2; ++lung_side) {
      acc.lung[lung_side] -= lane_sum(t.lung[lung_side]);
      acc.infected[lung_side][0] -= lane_sum(t.infected[lung_side]);
      acc.soft[lung_side] += lane_sum(t.soft[lung_side]);
    }
  }
#endif
  reduce_prob_row_scalar<float, float>(lung + w, 1, prob + w, 1, width - w, threshold, acc);
}

// Any row of uint8 classes, scalar: strided input and the tails of the vector loop.
void reduce_class_row_scalar(const uint8_t* lung, int64_t lung_sw, const uint8_t* cls, int64_t cls_sw,
                             int64_t width, SliceTotals& acc) {
  for (int64_t w = 0; w < width; ++w) {
    const uint8_t label = lung[w * lung_sw], c = cls[w * cls_sw];
    acc.bad_class = acc.bad_class || c > 2;
    if (label != 1 && label != 2) continue;
    acc.lung[label - 1] += 1;
    if (c == 1 || c == 2) {
      acc.infected[label - 1][c - 1] += 1;
      acc.soft[label - 1] += 1.0;
    }
  }
}

// Contiguous row of uint8 classes: SSE2, 16 voxels per step into byte counters that are widened (psadbw) every
// 255 steps, before they can wrap.
void reduce_class_row(const uint8_t* lung, const uint8_t* cls, int64_t width, SliceTotals& acc) {
  int64_t w = 0;
#if defined(__SSE2__)
  const __m128i one = _mm_set1_epi8(1), two = _mm_set1_epi8(2), zero = _mm_setzero_si128();
  __m128i bad = zero;
  // counters: lung right, lung left, class 1 right, class 1 left, class 2 right, class 2 left
  __m128i wide[6] = {zero, zero, zero, zero, zero, zero};
  while (w + 16 <= width) {
    const int64_t stop = std::min(width & ~int64_t{15}, w + 255 * 16);
    __m128i bytes[6] = {zero, zero, zero, zero, zero, zero};
    for (; w < stop; w += 16) {
      const __m128i labels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lung + w));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cls + w));
      const __m128i is_r = _mm_cmpeq_epi8(labels, one), is_l = _mm_cmpeq_epi8(labels, two);
      const __m128i c1 = _mm_cmpeq_epi8(c, one), c2 = _mm_cmpeq_epi8(c, two);
      bad = _mm_or_si128(bad, _mm_subs_epu8(c, two));  // nonzero where c > 2
      const __m128i masks[6] = {is_r, is_l, _mm_and_si128(is_r, c1), _mm_and_si128(is_l, c1),
                                _mm_and_si128(is_r, c2), _mm_and_si128(is_l, c2)};
      for (int i = 0; i < 6; ++i) bytes[i] = _mm_sub_epi8(bytes[i], masks[i]);
    }
    for (int i = 0; i < 6; ++i) wide[i] = _mm_add_epi64(wide[i], _mm_sad_epu8(bytes[i], zero));
  }
  int64_t totals[6];
  for (int i = 0; i < 6; ++i) {
    alignas(16) int64_t halves[2];
    _mm_store_si128(reinterpret_cast<__m128i*>(halves), wide[i]);
    totals[i] = halves[0] + halves[1];
  }
  for (int side = 0; side < 2; ++side) {
    acc.lung[side] += totals[side];
    acc.infected[side][0] += totals[2 + side];
    acc.infected[side][1] += totals[4 + side];
    acc.soft[side] += static_cast<double>(totals[2 + side] + totals[4 + side]);
  }
  acc.bad_class = acc.bad_class || _mm_movemask_epi8(_mm_cmpeq_epi8(bad, zero)) != 0xffff;
#endif
  reduce_class_row_scalar(lung + w, 1, cls + w, 1, width - w, acc);
}

// One slice of float16/float32 probabilities, row by row. Rows that are not contiguous float32 are first copied
// into contiguous scratch rows (float16 widened to float32, exactly) so that every row takes the vector loop.
template <typename T>
SliceTotals float_slice(const InfectionRatioParams& p, int64_t d, std::vector<uint8_t>& lung_scratch,
                        std::vector<float>& prob_scratch) {
  SliceTotals acc;
  const float threshold = static_cast<float>(p.threshold);
  const auto* lung = static_cast<const uint8_t*>(p.lung.data) + d * p.lung.stride_d;
  const T* prob = static_cast<const T*>(p.infection.data) + d * p.infection.stride_d;
  const bool direct = std::is_same_v<T, float> && p.lung.stride_w == 1 && p.infection.stride_w == 1;
  for (int64_t h = 0; h < p.height; ++h) {
    const uint8_t* lung_row = lung + h * p.lung.stride_h;
    const T* prob_row = prob + h * p.infection.stride_h;
    if constexpr (std::is_same_v<T, float>) {
      if (direct) {
        reduce_float_row(lung_row, prob_row, p.width, threshold, acc);
        continue;
      }
    }
    if constexpr (std::is_same_v<T, uint16_t>) {
      widen_half_row(prob_row, p.infection.stride_w, prob_scratch.data(), p.width);
    } else {
      for (int64_t w = 0; w < p.width; ++w) prob_scratch[w] = prob_row[w * p.infection.stride_w];
    }
    const uint8_t* lung_contiguous = lung_row;
    if (p.lung.stride_w != 1) {
      for (int64_t w = 0; w < p.width; ++w) lung_scratch[w] = lung_row[w * p.lung.stride_w];
      lung_contiguous = lung_scratch.data();
    }
    reduce_float_row(lung_contiguous, prob_scratch.data(), p.width, threshold, acc);
  }
  return acc;
}

SliceTotals double_slice(const InfectionRatioParams& p, int64_t d) {
  SliceTotals acc;
  const auto* lung = static_cast<const uint8_t*>(p.lung.data) + d * p.lung.stride_d;
  const auto* prob = static_cast<const double*>(p.infection.data) + d * p.infection.stride_d;
  for (int64_t h = 0; h < p.height; ++h) {
    reduce_prob_row_scalar<double, double>(lung + h * p.lung.stride_h, p.lung.stride_w,
                                           prob + h * p.infection.stride_h, p.infection.stride_w, p.width,
                                           p.threshold, acc);
  }
  return acc;
}

SliceTotals class_slice(const InfectionRatioParams& p, int64_t d) {
  SliceTotals acc;
  const auto* lung = static_cast<const uint8_t*>(p.lung.data) + d * p.lung.stride_d;
  const auto* cls = static_cast<const uint8_t*>(p.infection.data) + d * p.infection.stride_d;
  const bool unit = p.lung.stride_w == 1 && p.infection.stride_w == 1;
  for (int64_t h = 0; h < p.height; ++h) {
    const uint8_t* lung_row = lung + h * p.lung.stride_h;
    const uint8_t* cls_row = cls + h * p.infection.stride_h;
    if (unit) {
      reduce_class_row(lung_row, cls_row, p.width, acc);
    } else {
      reduce_class_row_scalar(lung_row, p.lung.stride_w, cls_row, p.infection.stride_w, p.width, acc);
    }
  }
  return acc;
}

}  // namespace

bool infection_ratio_cpu(const InfectionRatioParams& p) {
  bool bad_class = false;
#pragma omp parallel reduction(|| : bad_class)
  {
    std::vector<uint8_t> lung_scratch(p.width);
    std::vector<float> prob_scratch(p.width);
#pragma omp for schedule(dynamic, 2)  // dynamic: a core shared with other work must not stall the rest
  for (int64_t d = 0; d < p.depth; ++d) {
    SliceTotals acc;
    switch (p.type) {
      case InfectionType::kClassesU8:
        acc = class_slice(p, d);
        break;
      case InfectionType::kFloat16:
        acc = float_slice<uint16_t>(p, d, lung_scratch, prob_scratch);
        break;
      case InfectionType::kFloat32:
        acc = float_slice<float>(p, d, lung_scratch, prob_scratch);
        break;
      case InfectionType::kFloat64:
        acc = double_slice(p, d);
        break;
    }
    bad_class = bad_class || acc.bad_class;
    for (int lung = 0; lung < 2; ++lung) {
      p.lung_voxels[d * 2 + lung] = acc.lung[lung];
      p.soft_sum[d * 2 + lung] = acc.soft[lung];
      for (int cls = 0; cls < 2; ++cls) p.infected_voxels[(d * 2 + lung) * 2 + cls] = acc.infected[lung][cls];
    }
  }
  }
  return !bad_class;
}

}  // namespace covfast
