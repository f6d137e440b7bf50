// covfast::reverse_attention and covfast::reverse_attention_concat on the CPU, C++/OpenMP.
#pragma once

#include <cstdint>

namespace covfast {

// All tensors contiguous. x [B, C1, H, W], edge [B, C2, he, we], side [B, 1, h, w], out [B, C1 + C2, H, W].
// reverse_attention is the case C2 = 0 (edge unused).
struct ReverseAttentionShape {
  int64_t batch, channels, edge_channels, height, width;
  int64_t edge_height, edge_width, side_height, side_width;
};

// out = cat([x, up(edge)], 1) * (1 - sigmoid(up(side))), up: bilinear resize to [H, W], align_corners=False.
template <typename T>
void reverse_attention_concat_fwd_cpu(const ReverseAttentionShape& shape, const T* x, const T* edge, const T* side,
                                      T* out);

// With s = sigmoid(up(side)): grad_x = g[:, :C1] (1 - s), grad_edge = up^T(g[:, C1:] (1 - s)),
// grad_side = up^T(-sum_c(g * cat([x, up(edge)])) s (1 - s)). grad_edge may be null when C2 = 0.
template <typename T>
void reverse_attention_concat_bwd_cpu(const ReverseAttentionShape& shape, const T* grad, const T* x, const T* edge,
                                      const T* side, T* grad_x, T* grad_edge, T* grad_side);

}  // namespace covfast
