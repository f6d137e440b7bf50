// covfast::reverse_attention on CUDA (see reverse_attention.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace covfast {

struct ReverseAttentionParams {
  int64_t batch;
  int channels, height, width;    // x: contiguous [B, C, H, W]; grad, out: [B, C + edge_channels, H, W]
  int side_height, side_width;    // side: contiguous [B, 1, h, w]
  float scale_h, scale_w;         // h / H and w / W, as float (PyTorch's upsample computes them the same way)
  int channels_per_group;         // set by the launcher
  // reverse_attention_concat: edge contiguous [B, edge_channels, edge_height, edge_width]; 0 channels otherwise.
  int edge_channels = 0, edge_height = 0, edge_width = 0;
  float edge_scale_h = 0.f, edge_scale_w = 0.f;  // he / H and we / W
};

// dtype: covfast::FloatType (0 float32, 1 float16, 2 bfloat16).
void reverse_attention_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* side, void* out,
                                cudaStream_t stream);

// grad_side: float32 [B, 1, h, w] workspace, zero-initialized by the caller (atomics add into it).
void reverse_attention_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                const void* side, void* grad_x, float* grad_side, cudaStream_t stream);

// out = cat([x, up(edge)], 1) * (1 - sigmoid(up(side))): reverse attention fused with the concatenation.
void reverse_attention_concat_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* edge,
                                       const void* side, void* out, cudaStream_t stream);

// grad_edge and grad_side: float32 workspaces, zero-initialized by the caller (atomics add into them).
void reverse_attention_concat_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                       const void* edge, const void* side, void* grad_x, float* grad_edge,
                                       float* grad_side, cudaStream_t stream);

}  // namespace covfast
