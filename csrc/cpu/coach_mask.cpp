// Most-significant-digit radix select on order-preserving integer keys, 16 bits per digit: the first pass turns
// every score into its key and counts the keys' top digit (65,536 buckets); walking the buckets from the top finds
// the digit that holds the k-th largest; the keys with that digit are compacted (usually a small fraction: the top
// 16 bits of a float hold its sign, exponent and 7 mantissa bits) and the next digit is selected among them alone.
// float32 takes two digits, float64 four. Equal values share a key, -0.0 is folded onto +0.0 and every NaN onto one
// key above +inf, so ties and NaN resolve exactly like torch.kthvalue.
#include "coach_mask.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace covfast {
namespace {

template <typename T>
using KeyOf = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

constexpr int kDigitBits = 16;
constexpr int64_t kBuckets = int64_t(1) << kDigitBits;

// Order-preserving map of a float to an unsigned integer: larger float -> larger key.
template <typename T>
inline KeyOf<T> to_key(T value) {
  using K = KeyOf<T>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  value = value == T(0) ? T(0) : value;  // -0.0 == +0.0 for kthvalue
  K bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const K key = (bits & sign) ? ~bits : (bits | sign);
  return std::isnan(value) ? ~K(0) : key;
}

template <typename T>
inline T from_key(KeyOf<T> key) {
  using K = KeyOf<T>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  if (key == ~K(0)) return std::numeric_limits<T>::quiet_NaN();
  const K bits = (key & sign) ? (key & ~sign) : ~key;
  T value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The bucket of ``histogram`` holding the ``rank``-th largest element (counted from the top, 1-based); ``rank``
// becomes the rank inside that bucket.
inline int64_t select_bucket(const std::vector<int64_t>& histogram, int64_t& rank) {
  int64_t bucket = kBuckets - 1;
  for (; bucket > 0 && histogram[bucket] < rank; --bucket) rank -= histogram[bucket];
  return bucket;
}

template <typename T>
T kth_largest(const T* values, int64_t n, int64_t k, std::vector<KeyOf<T>>& keys, std::vector<int64_t>& histogram) {
  using K = KeyOf<T>;
  constexpr int kDigits = 8 * sizeof(K) / kDigitBits;
  int shift = 8 * sizeof(K) - kDigitBits;
  keys.resize(n);
  std::fill(histogram.begin(), histogram.end(), 0);
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = to_key(values[i]);
    ++histogram[keys[i] >> shift];
  }
  int64_t rank = k;
  K prefix = K(select_bucket(histogram, rank)) << shift;
  int64_t count = n;
  for (int digit = 1; digit < kDigits; ++digit) {
    // Keep the keys that share the digits chosen so far, then count their next digit.
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      const K key = keys[i];
      keys[kept] = key;
      kept += (key >> shift) == (prefix >> shift);
    }
    count = kept;
    shift -= kDigitBits;
    std::fill(histogram.begin(), histogram.end(), 0);
    for (int64_t i = 0; i < count; ++i) ++histogram[(keys[i] >> shift) & (kBuckets - 1)];
    prefix |= K(select_bucket(histogram, rank)) << shift;
  }
  return from_key<T>(prefix);
}

}  // namespace

template <typename T>
void coach_threshold_cpu(const T* score, T* thresholds, int64_t batch, int64_t pixels, int64_t k) {
#pragma omp parallel if (batch > 1)
  {
    std::vector<KeyOf<T>> keys;
    std::vector<int64_t> histogram(kBuckets);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) thresholds[b] = kth_largest(score + b * pixels, pixels, k, keys, histogram);
  }
}

template void coach_threshold_cpu<float>(const float*, float*, int64_t, int64_t, int64_t);
template void coach_threshold_cpu<double>(const double*, double*, int64_t, int64_t, int64_t);

}  // namespace covfast
