// covfast::roi_align on the CPU (He et al., Mask R-CNN, ICCV 2017), with torchvision's semantics:
//   out[k, c, ph, pw] = 1 / (gh * gw) * sum_{iy < gh, ix < gw} bilinear(features[b_k, c], y(ph, iy), x(pw, ix))
//   y(ph, iy) = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh,  x likewise;  bin_h = roi_h / PH
// where (x1, y1, x2, y2) = box * spatial_scale (- 0.5 when aligned), gh = sampling_ratio or ceil(roi_h / PH).
//
// The sample positions and bilinear weights of one RoI do not depend on the channel, so they are computed once per
// (RoI, channel block), separably (row taps and column taps), and every channel of the block reuses them. The
// forward also interpolates separably (rows first, then columns): the same sum as torchvision's per-sample
// weights hy * hx, ... up to float rounding order.
// Forward: OpenMP over (RoI, channel block), each task writes its own output elements; a RoI that several output
// rows name (slots) is pooled once and copied to the other rows while the channel is still in cache.
// Backward: OpenMP over channel blocks, each task walks all RoIs and scatters only into its own channels, so no two
// threads add into one element.
#include "cpu/roi_align.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef COVFAST_OPENMP
#include <omp.h>
#endif

namespace covfast {
namespace {

template <typename T>
struct RoiGeometry {
  int64_t batch_index;
  T y1, x1, bin_h, bin_w;
  int64_t grid_h, grid_w;
  T count;  // max(grid_h * grid_w, 1)
};

template <typename T>
RoiGeometry<T> geometry(const RoiAlignParams& p, const T* roi) {
  const T offset = p.aligned ? T(0.5) : T(0);
  const T scale = static_cast<T>(p.spatial_scale);
  RoiGeometry<T> g;
  g.batch_index = static_cast<int64_t>(roi[0]);
  g.x1 = roi[1] * scale - offset;
  g.y1 = roi[2] * scale - offset;
  T roi_w = roi[3] * scale - offset - g.x1;
  T roi_h = roi[4] * scale - offset - g.y1;
  if (!p.aligned) {  // malformed boxes are forced to 1 x 1 (torchvision's legacy behaviour)
    roi_w = std::max(roi_w, T(1));
    roi_h = std::max(roi_h, T(1));
  }
  g.bin_h = roi_h / static_cast<T>(p.pooled_height);
  g.bin_w = roi_w / static_cast<T>(p.pooled_width);
  g.grid_h = p.sampling_ratio > 0 ? p.sampling_ratio : static_cast<int64_t>(std::ceil(roi_h / p.pooled_height));
  g.grid_w = p.sampling_ratio > 0 ? p.sampling_ratio : static_cast<int64_t>(std::ceil(roi_w / p.pooled_width));
  g.count = static_cast<T>(std::max<int64_t>(g.grid_h * g.grid_w, 1));
  return g;
}

// One sample coordinate along one axis, clamped at the border exactly as torchvision's bilinear_interpolate. The
// bilinear weight of a 2-D sample is the product of its row and column weights, so a RoI needs only PH * gh row
// taps and PW * gw column taps, not a table of all PH * PW * gh * gw samples.
template <typename T>
struct Tap {
  int64_t low, high;  // element offsets (index * stride) of the two neighbours
  T w_low, w_high;
  bool inside;  // false: the coordinate is outside [-1, size] and the sample contributes 0
};

template <typename T>
Tap<T> tap(T v, int64_t size, int64_t stride) {
  Tap<T> t{0, 0, T(0), T(0), false};
  if (v < T(-1) || v > static_cast<T>(size)) return t;
  v = std::max(v, T(0));
  int64_t low = static_cast<int64_t>(v), high;
  if (low >= size - 1) {
    high = low = size - 1;
    v = static_cast<T>(low);
  } else {
    high = low + 1;
  }
  const T frac = v - static_cast<T>(low);
  return {low * stride, high * stride, T(1) - frac, frac, true};
}

// Taps of one axis of a RoI, bin-major: taps[bin * grid + i] for sample i of bin ``bin``.
template <typename T>
void axis_taps(T start, T bin_size, int64_t grid, int64_t bins, int64_t size, int64_t stride,
               std::vector<Tap<T>>& taps) {
  const int64_t n = std::max<int64_t>(grid, 0);
  taps.resize(static_cast<size_t>(bins * n));
  for (int64_t bin = 0; bin < bins; ++bin) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = start + static_cast<T>(bin) * bin_size + (static_cast<T>(i) + T(0.5)) * bin_size /
                                                              static_cast<T>(grid);
      taps[static_cast<size_t>(bin * n + i)] = tap<T>(v, size, stride);
    }
  }
}

template <typename T>
struct RoiTaps {
  std::vector<Tap<T>> rows, cols;
  void build(const RoiAlignParams& p, const RoiGeometry<T>& g, int64_t stride_h, int64_t stride_w) {
    axis_taps(g.y1, g.bin_h, g.grid_h, p.pooled_height, p.height, stride_h, rows);
    axis_taps(g.x1, g.bin_w, g.grid_w, p.pooled_width, p.width, stride_w, cols);
  }
};

// Channels per task: enough tasks to keep every thread busy on a few RoIs, but blocks of several channels so the
// sample table is amortised.
int64_t channel_block(int64_t channels, int64_t tasks_without_blocks) {
#ifdef COVFAST_OPENMP
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  const int64_t wanted_blocks = std::max<int64_t>(1, (4 * threads + tasks_without_blocks - 1) / tasks_without_blocks);
  return std::max<int64_t>(8, (channels + wanted_blocks - 1) / wanted_blocks);
}

template <typename T>
void forward(const RoiAlignParams& p, const T* features, const Strides4d& fs, const T* rois, T* output,
             const RoiSlots* slots) {
  const int64_t block = channel_block(p.channels, p.num_rois);
  const int64_t blocks = (p.channels + block - 1) / block;
  const int64_t bins = p.pooled_height * p.pooled_width;
#pragma omp parallel
  {
    RoiTaps<T> taps;
    std::vector<T> row_sum;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.num_rois * blocks; ++task) {
      const int64_t k = task / blocks, c_begin = (task % blocks) * block;
      const int64_t c_end = std::min(p.channels, c_begin + block);
      const int64_t first = slots ? slots->offsets[k] : k, last = slots ? slots->offsets[k + 1] : k + 1;
      if (first == last) continue;  // a RoI no output row asks for
      const RoiGeometry<T> g = geometry(p, rois + k * 5);
      taps.build(p, g, fs.h, 1);  // column taps hold column indices: they index row_sum below
      const int64_t gh = std::max<int64_t>(g.grid_h, 0), gw = std::max<int64_t>(g.grid_w, 0);
      int64_t x_begin = p.width, x_end = 0;  // columns any inside sample reads
      for (const Tap<T>& tx : taps.cols) {
        if (!tx.inside) continue;
        x_begin = std::min(x_begin, tx.low);
        x_end = std::max(x_end, tx.high + 1);
      }
      const int64_t span = std::max<int64_t>(x_end - x_begin, 0);
      row_sum.resize(static_cast<size_t>(span));
      for (int64_t c = c_begin; c < c_end; ++c) {
        const T* plane = features + g.batch_index * fs.b + c * fs.c + x_begin * fs.w;
        T* out = output + ((slots ? slots->rows[first] : k) * p.channels + c) * bins;
        for (int64_t ph = 0; ph < p.pooled_height; ++ph) {
          // Interpolate along y first, summed over the bin's sample rows, for every column the RoI reads; then
          // each bin needs 2 reads per sample column instead of 4 per sample.
          std::fill(row_sum.begin(), row_sum.end(), T(0));
          for (const Tap<T>* ty = taps.rows.data() + ph * gh; ty != taps.rows.data() + (ph + 1) * gh; ++ty) {
            if (!ty->inside) continue;
            const T* row_low = plane + ty->low;
            const T* row_high = plane + ty->high;
            for (int64_t x = 0; x < span; ++x)
              row_sum[x] += ty->w_low * row_low[x * fs.w] + ty->w_high * row_high[x * fs.w];
          }
          for (int64_t pw = 0; pw < p.pooled_width; ++pw) {
            T sum = 0;
            for (const Tap<T>* tx = taps.cols.data() + pw * gw; tx != taps.cols.data() + (pw + 1) * gw; ++tx) {
              if (tx->inside) sum += tx->w_low * row_sum[tx->low - x_begin] + tx->w_high * row_sum[tx->high - x_begin];
            }
            out[ph * p.pooled_width + pw] = sum / g.count;
          }
        }
        for (int64_t i = first + 1; i < last; ++i)  // copies of a repeated RoI, while the channel is in cache
          std::copy(out, out + bins, output + (slots->rows[i] * p.channels + c) * bins);
      }
    }
  }
}

template <typename T>
void backward(const RoiAlignParams& p, const T* grad, const Strides4d& gs, const T* rois, T* grad_features) {
  const int64_t block = channel_block(p.channels, 1);
  const int64_t blocks = (p.channels + block - 1) / block;
  const int64_t plane_size = p.height * p.width;
#pragma omp parallel
  {
    RoiTaps<T> taps;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < blocks; ++task) {
      const int64_t c_begin = task * block, c_end = std::min(p.channels, c_begin + block);
      for (int64_t k = 0; k < p.num_rois; ++k) {
        const RoiGeometry<T> g = geometry(p, rois + k * 5);
        taps.build(p, g, p.width, 1);  // grad_features is contiguous
        const int64_t gh = std::max<int64_t>(g.grid_h, 0), gw = std::max<int64_t>(g.grid_w, 0);
        for (int64_t c = c_begin; c < c_end; ++c) {
          T* plane = grad_features + (g.batch_index * p.channels + c) * plane_size;
          for (int64_t ph = 0; ph < p.pooled_height; ++ph) {
            for (int64_t pw = 0; pw < p.pooled_width; ++pw) {
              const T g_bin = grad[k * gs.b + c * gs.c + ph * gs.h + pw * gs.w] / g.count;
              for (const Tap<T>* ty = taps.rows.data() + ph * gh; ty != taps.rows.data() + (ph + 1) * gh; ++ty) {
                if (!ty->inside) continue;
                T* row_low = plane + ty->low;
                T* row_high = plane + ty->high;
                for (const Tap<T>* tx = taps.cols.data() + pw * gw; tx != taps.cols.data() + (pw + 1) * gw; ++tx) {
                  if (!tx->inside) continue;
                  row_low[tx->low] += g_bin * ty->w_low * tx->w_low;
                  row_low[tx->high] += g_bin * ty->w_low * tx->w_high;
                  row_high[tx->low] += g_bin * ty->w_high * tx->w_low;
                  row_high[tx->high] += g_bin * ty->w_high * tx->w_high;
                }
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace

int64_t roi_align_check_rois(const RoiAlignParams& p, const void* rois) {
  for (int64_t k = 0; k < p.num_rois; ++k) {
    const double index = p.type == RoiAlignType::kFloat32 ? static_cast<const float*>(rois)[k * 5]
                                                          : static_cast<const double*>(rois)[k * 5];
    if (!(index >= 0.0) || static_cast<int64_t>(index) >= p.batch) return k;
  }
  return -1;
}

void roi_align_forward_cpu(const RoiAlignParams& p, const void* features, const Strides4d& feature_strides,
                           const void* rois, void* output, const RoiSlots* slots) {
  if (p.type == RoiAlignType::kFloat32) {
    forward(p, static_cast<const float*>(features), feature_strides, static_cast<const float*>(rois),
            static_cast<float*>(output), slots);
  } else {
    forward(p, static_cast<const double*>(features), feature_strides, static_cast<const double*>(rois),
            static_cast<double*>(output), slots);
  }
}

void roi_align_backward_cpu(const RoiAlignParams& p, const void* grad_output, const Strides4d& grad_strides,
                            const void* rois, void* grad_features) {
  if (p.type == RoiAlignType::kFloat32) {
    backward(p, static_cast<const float*>(grad_output), grad_strides, static_cast<const float*>(rois),
             static_cast<float*>(grad_features));
  } else {
    backward(p, static_cast<const double*>(grad_output), grad_strides, static_cast<const double*>(rois),
             static_cast<double*>(grad_features));
  }
}

}  // namespace covfast
