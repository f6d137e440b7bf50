// covfast::reverse_attention on CUDA (see reverse_attention.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace covfast {

struct ReverseAttentionParams {
  int64_t batch;
  int channels, height, width;    // x, grad, out: contiguous [B, C, H, W]
  int side_height, side_width;    // side: contiguous [B, 1, h, w]
  float scale_h, scale_w;         // h / H and w / W, as float (PyTorch's upsample computes them the same way)
  int channels_per_group;         // set by the launcher
};

// dtype: covfast::FloatType (0 float32, 1 float16, 2 bfloat16).
void reverse_attention_fwd_cuda(ReverseAttentionParams p, int dtype, const void* x, const void* side, void* out,
                                cudaStream_t stream);

// grad_side: float32 [B, 1, h, w] workspace, zero-initialized by the caller (atomics add into it).
void reverse_attention_bwd_cuda(ReverseAttentionParams p, int dtype, const void* grad, const void* x,
                                const void* side, void* grad_x, float* grad_side, cudaStream_t stream);

}  // namespace covfast
