// covfast::reverse_attention(_concat) on the CPU (Fan et al., Inf-Net, IEEE TMI 2020, eq. 3):
//   out = cat([x, up(edge)], 1) * (1 - sigmoid(up(side)))     up: bilinear resize to [H, W], align_corners=False
//
// Forward: the gate of every pixel is computed once into a [B, H, W] buffer (1/C of the output), then each output
// plane is written in one pass: x planes are multiplied by the gate (a loop the compiler vectorizes), edge planes
// are resampled and gated on the fly, so neither the resized edge nor the concatenation is ever stored.
// Backward, same split over planes: grad_x and the edge planes' adjoint resize are written in one pass over grad,
// while sum_c g * cat([x, up(edge)]) accumulates into one [B, H, W] buffer per thread; the buffers are then added,
// turned into grad_up = -sum * s * (1 - s) and taken back through the adjoint of the side resize.
// Taps and weights follow PyTorch's upsample_bilinear2d (the scale is in/out in T, indices clamped at the border),
// so results agree with the pure-torch reference to rounding.
#include "cpu/reverse_attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef COVFAST_OPENMP
#include <omp.h>
#endif

namespace covfast {
namespace {

// Source indices and weights of 1-D linear resampling from in_size to out_size samples.
template <typename T>
struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<T> w_lo, w_hi;
};

template <typename T>
Taps<T> bilinear_taps(int64_t out_size, int64_t in_size) {
  Taps<T> taps{std::vector<int64_t>(out_size), std::vector<int64_t>(out_size), std::vector<T>(out_size),
               std::vector<T>(out_size)};
  const T scale = static_cast<T>(in_size) / static_cast<T>(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    const T src = std::max(scale * (static_cast<T>(i) + T(0.5)) - T(0.5), T(0));
    const int64_t lo = std::min(static_cast<int64_t>(src), in_size - 1);
    const T frac = std::min(std::max(src - static_cast<T>(lo), T(0)), T(1));
    taps.lo[i] = lo;
    taps.hi[i] = lo + (lo < in_size - 1 ? 1 : 0);
    taps.w_lo[i] = T(1) - frac;
    taps.w_hi[i] = frac;
  }
  return taps;
}

// Separable resampling of one [in_h, in_w] plane to [out_h, out_w]: row taps ty, column taps tx. Output row y is
// the blend of two source rows (a contiguous loop the compiler vectorizes) sampled at the column taps; the adjoint
// runs the same two steps backwards. Versus PyTorch's kernel (columns inside rows) only the rounding differs.
template <typename T>
struct Resize {
  Taps<T> ty, tx;
  int64_t in_w;

  Resize(int64_t out_h, int64_t out_w, int64_t in_h, int64_t in_w_)
      : ty(bilinear_taps<T>(out_h, in_h)), tx(bilinear_taps<T>(out_w, in_w_)), in_w(in_w_) {}

  // row[0, in_w) = the vertical blend of src for output row y.
  void blend(const T* src, int64_t y, T* row) const {
    const T* lo = src + ty.lo[y] * in_w;
    const T* hi = src + ty.hi[y] * in_w;
    const T w_lo = ty.w_lo[y], w_hi = ty.w_hi[y];
    for (int64_t j = 0; j < in_w; ++j) row[j] = w_lo * lo[j] + w_hi * hi[j];
  }

  // Value at output column x of a blended row.
  T at(const T* row, int64_t x) const { return tx.w_lo[x] * row[tx.lo[x]] + tx.w_hi[x] * row[tx.hi[x]]; }

  // Adjoint of at: row += value spread over the column taps of x.
  void scatter(T* row, int64_t x, T value) const {
    row[tx.lo[x]] += tx.w_lo[x] * value;
    row[tx.hi[x]] += tx.w_hi[x] * value;
  }

  // Adjoint of blend: dst rows of output row y += their weights times row.
  void unblend(const T* row, int64_t y, T* dst) const {
    T* lo = dst + ty.lo[y] * in_w;
    T* hi = dst + ty.hi[y] * in_w;
    const T w_lo = ty.w_lo[y], w_hi = ty.w_hi[y];
    for (int64_t j = 0; j < in_w; ++j) lo[j] += w_lo * row[j];
    for (int64_t j = 0; j < in_w; ++j) hi[j] += w_hi * row[j];
  }
};

// Below this many output elements a call runs on one thread: waking the OpenMP team costs more than it saves (and far
// more on a busy machine, where a descheduled team member stalls the others).
constexpr int64_t kParallelWork = 1 << 15;

bool worth_threads(const ReverseAttentionShape& s) {
  return s.batch * (s.channels + s.edge_channels) * s.height * s.width >= kParallelWork;
}

int num_threads() {
#ifdef COVFAST_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef COVFAST_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// sigmoid(up(side)) of every output pixel: [B, H * W].
template <typename T>
std::vector<T> side_sigmoid(const ReverseAttentionShape& s, const T* side) {
  const Resize<T> resize(s.height, s.width, s.side_height, s.side_width);
  const int64_t plane = s.height * s.width, side_plane = s.side_height * s.side_width;
  std::vector<T> sigmoid(static_cast<size_t>(s.batch * plane));
#pragma omp parallel if (worth_threads(s))
  {
    std::vector<T> row(static_cast<size_t>(s.side_width));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s.batch * s.height; ++r) {
      const int64_t b = r / s.height, y = r - b * s.height;
      resize.blend(side + b * side_plane, y, row.data());
      T* out = sigmoid.data() + b * plane + y * s.width;
      for (int64_t x = 0; x < s.width; ++x) out[x] = T(1) / (T(1) + std::exp(-resize.at(row.data(), x)));
    }
  }
  return sigmoid;
}

// The per-plane loops of x channels, the bulk of the work. They are compiled for AVX2 too (picked at load time):
// the planes of the model's stages fit in cache, where the SSE2 baseline, not memory, is the limit.
#if defined(__x86_64__) && defined(__GNUC__)
#define COVFAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define COVFAST_CLONES
#endif

// out = x * gate.
template <typename T>
inline void gate_plane_body(const T* __restrict__ x, const T* __restrict__ gate, T* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * gate[i];
}

// grad_x = g * (1 - s); dot += g * x.
template <typename T>
inline void backward_plane_body(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ sig,
                                T* __restrict__ grad_x, T* __restrict__ dot, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    grad_x[i] = g[i] * (T(1) - sig[i]);
    dot[i] += g[i] * x[i];
  }
}

COVFAST_CLONES void gate_plane(const float* x, const float* gate, float* out, int64_t n) {
  gate_plane_body(x, gate, out, n);
}
COVFAST_CLONES void gate_plane(const double* x, const double* gate, double* out, int64_t n) {
  gate_plane_body(x, gate, out, n);
}
COVFAST_CLONES void backward_plane(const float* g, const float* x, const float* sig, float* grad_x, float* dot,
                                   int64_t n) {
  backward_plane_body(g, x, sig, grad_x, dot, n);
}
COVFAST_CLONES void backward_plane(const double* g, const double* x, const double* sig, double* grad_x,
                                   double* dot, int64_t n) {
  backward_plane_body(g, x, sig, grad_x, dot, n);
}

}  // namespace

template <typename T>
void reverse_attention_concat_fwd_cpu(const ReverseAttentionShape& s, const T* x, const T* edge, const T* side,
                                      T* out) {
  const int64_t plane = s.height * s.width, edge_plane = s.edge_height * s.edge_width;
  const int64_t channels = s.channels + s.edge_channels;
  if (s.batch * channels * plane == 0) return;
  std::vector<T> gate = side_sigmoid(s, side);
  for (T& g : gate) g = T(1) - g;
  const Resize<T> resize_edge(s.height, s.width, std::max<int64_t>(s.edge_height, 1),
                              std::max<int64_t>(s.edge_width, 1));
#pragma omp parallel if (worth_threads(s))
  {
    std::vector<T> row(static_cast<size_t>(resize_edge.in_w));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < s.batch * channels; ++p) {
      const int64_t b = p / channels, c = p - b * channels;
      const T* gate_b = gate.data() + b * plane;
      T* out_p = out + p * plane;
      if (c < s.channels) {
        gate_plane(x + (b * s.channels + c) * plane, gate_b, out_p, plane);
        continue;
      }
      const T* edge_p = edge + (b * s.edge_channels + c - s.channels) * edge_plane;
      for (int64_t y = 0; y < s.height; ++y) {
        resize_edge.blend(edge_p, y, row.data());
        for (int64_t xx = 0; xx < s.width; ++xx)
          out_p[y * s.width + xx] = resize_edge.at(row.data(), xx) * gate_b[y * s.width + xx];
      }
    }
  }
}

template <typename T>
void reverse_attention_concat_bwd_cpu(const ReverseAttentionShape& s, const T* grad, const T* x, const T* edge,
                                      const T* side, T* grad_x, T* grad_edge, T* grad_side) {
  const int64_t plane = s.height * s.width, edge_plane = s.edge_height * s.edge_width;
  const int64_t side_plane = s.side_height * s.side_width;
  const int64_t channels = s.channels + s.edge_channels;
  if (s.batch * channels * plane == 0) {
    std::fill(grad_side, grad_side + s.batch * side_plane, T(0));
    if (grad_edge != nullptr) std::fill(grad_edge, grad_edge + s.batch * s.edge_channels * edge_plane, T(0));
    return;
  }
  const std::vector<T> sig = side_sigmoid(s, side);
  const Resize<T> resize_edge(s.height, s.width, std::max<int64_t>(s.edge_height, 1),
                              std::max<int64_t>(s.edge_width, 1));
  const int64_t dot_size = s.batch * plane;
  const int threads = worth_threads(s) ? num_threads() : 1;
  std::vector<T> dots(static_cast<size_t>(threads * dot_size), T(0));
#pragma omp parallel num_threads(threads)
  {
    T* dot = dots.data() + thread_id() * dot_size;
    std::vector<T> row(static_cast<size_t>(resize_edge.in_w)), grad_row(row.size());
#pragma omp for schedule(static)
    for (int64_t p = 0; p < s.batch * channels; ++p) {
      const int64_t b = p / channels, c = p - b * channels;
      const T* sig_b = sig.data() + b * plane;
      const T* grad_p = grad + p * plane;
      T* dot_b = dot + b * plane;
      if (c < s.channels) {
        const int64_t x_index = (b * s.channels + c) * plane;
        backward_plane(grad_p, x + x_index, sig_b, grad_x + x_index, dot_b, plane);
        continue;
      }
      const int64_t edge_index = (b * s.edge_channels + c - s.channels) * edge_plane;
      T* grad_edge_p = grad_edge + edge_index;
      std::fill(grad_edge_p, grad_edge_p + edge_plane, T(0));
      for (int64_t y = 0; y < s.height; ++y) {
        resize_edge.blend(edge + edge_index, y, row.data());
        std::fill(grad_row.begin(), grad_row.end(), T(0));
        for (int64_t xx = 0; xx < s.width; ++xx) {
          const int64_t i = y * s.width + xx;
          dot_b[i] += grad_p[i] * resize_edge.at(row.data(), xx);
          resize_edge.scatter(grad_row.data(), xx, grad_p[i] * (T(1) - sig_b[i]));
        }
        resize_edge.unblend(grad_row.data(), y, grad_edge_p);
      }
    }
  }
  // dots[0] becomes grad_up = -sum_c(g * cat) * s * (1 - s).
  T* grad_up = dots.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < dot_size; ++i) {
    T total = grad_up[i];
    for (int t = 1; t < threads; ++t) total += dots[t * dot_size + i];
    grad_up[i] = -total * sig[i] * (T(1) - sig[i]);
  }
  const Resize<T> resize_side(s.height, s.width, s.side_height, s.side_width);
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> grad_row(static_cast<size_t>(s.side_width));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      T* grad_side_b = grad_side + b * side_plane;
      std::fill(grad_side_b, grad_side_b + side_plane, T(0));
      for (int64_t y = 0; y < s.height; ++y) {
        std::fill(grad_row.begin(), grad_row.end(), T(0));
        for (int64_t xx = 0; xx < s.width; ++xx)
          resize_side.scatter(grad_row.data(), xx, grad_up[b * plane + y * s.width + xx]);
        resize_side.unblend(grad_row.data(), y, grad_side_b);
      }
    }
  }
}

template void reverse_attention_concat_fwd_cpu<float>(const ReverseAttentionShape&, const float*, const float*,
                                                      const float*, float*);
template void reverse_attention_concat_fwd_cpu<double>(const ReverseAttentionShape&, const double*, const double*,
                                                       const double*, double*);
template void reverse_attention_concat_bwd_cpu<float>(const ReverseAttentionShape&, const float*, const float*,
                                                      const float*, const float*, float*, float*, float*);
template void reverse_attention_concat_bwd_cpu<double>(const ReverseAttentionShape&, const double*, const double*,
                                                       const double*, const double*, double*, double*, double*);

}  // namespace covfast
