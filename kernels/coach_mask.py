"""Triton kernels of ``covfast::coach_mask`` (the coach network's soft top-k mask, Zhou et al., ECCV 2020).

``mask = sigmoid(alpha * (score - t))`` with ``t`` the k-th largest score of each image. ``t`` comes from a radix
select over the float bits, not a sort. Scores (float32, or float16 / bfloat16 widened exactly to float32) map to
int32 keys whose signed order is the float order: ``i`` for ``i >= 0`` and ``i ^ 0x7fffffff`` for negative floats,
``i`` being the float's bits as int32. Four passes each histogram the next 8 bits of the keys that match the digits
chosen so far (``_coach_histogram_kernel``: grid (B, G), ``tl.histogram`` per block, added into a [B, 256] table with
atomics); ``_coach_select_kernel`` (grid B) then finds the digit whose bin holds the k-th largest key and the rank
within it, on the device, so no pass waits on the host. After the last pass the prefix is a whole key, i.e. exactly
one of the image's scores: ``t`` equals ``torch.kthvalue`` on the same data, ties included. The top digit holds the
sign bit and is flipped (``^ 128``) so that bin order is key order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
BINS = 256
# (shift, mask of the key bits already chosen, as int32, digit flip) of the four passes, most significant first
PASSES = ((24, 0, 128), (16, -(1 << 24), 0), (8, -(1 << 16), 0), (0, -(1 << 8), 0))


@triton.jit
def _float32_bits(value):
    """The bits, as int32, of ``value`` widened to float32. bfloat16 is widened by a shift, which keeps subnormals
    exactly (a float conversion may flush them, as the CPU interpreter does)."""
    if value.dtype == tl.bfloat16:
        return value.to(tl.int16, bitcast=True).to(tl.int32) << 16
    else:
        return value.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def _ordered_key(value):
    """int32 keys of float scores whose signed order is the scores' order (-0.0 sorts just below +0.0)."""
    bits = _float32_bits(value)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _coach_histogram_kernel(
    score_ptr,
    hist_ptr,
    state_ptr,
    pixels,
    shift,
    chosen_mask,
    flip,
    programs_per_image,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    prefix = tl.load(state_ptr + 2 * b)
    hist = tl.zeros([BINS], tl.int32)
    lanes = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * BLOCK, pixels, programs_per_image * BLOCK):
        offset = start + lanes
        ok = offset < pixels
        key = _ordered_key(tl.load(score_ptr + b * pixels + offset, mask=ok, other=0.0))
        match = ok & ((key & chosen_mask) == prefix)
        digit = ((key >> shift) & 0xFF) ^ flip
        hist += tl.histogram(digit, BINS, mask=match)
    tl.atomic_add(hist_ptr + b * BINS + tl.arange(0, BINS), hist)


@triton.jit
def _coach_select_kernel(hist_ptr, state_ptr, shift, flip, BINS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, BINS)
    hist = tl.load(hist_ptr + b * BINS + bins)
    above = tl.sum(hist) - tl.cumsum(hist, 0)  # keys in higher bins
    k = tl.load(state_ptr + 2 * b + 1)  # rank among the keys that match the prefix, 1 = largest
    hit = (above < k) & (k <= above + hist)
    digit = tl.sum(tl.where(hit, bins, 0))
    tl.store(state_ptr + 2 * b + 1, k - tl.sum(tl.where(hit, above, 0)))
    tl.store(state_ptr + 2 * b, tl.load(state_ptr + 2 * b) | ((digit ^ flip) << shift))


@triton.jit
def _coach_mask_fwd_kernel(
    score_ptr, mask_ptr, state_ptr, pixels, alpha, programs_per_image, BLOCK: tl.constexpr
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    key = tl.load(state_ptr + 2 * b)
    threshold = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)
    lanes = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * BLOCK, pixels, programs_per_image * BLOCK):
        offset = start + lanes
        ok = offset < pixels
        value = tl.load(score_ptr + b * pixels + offset, mask=ok, other=0.0)
        mask = tl.sigmoid(alpha * (_float32_bits(value).to(tl.float32, bitcast=True) - threshold))
        tl.store(mask_ptr + b * pixels + offset, mask.to(value.dtype), mask=ok)


def _programs_per_image(batch: int, pixels: int) -> int:
    """Enough programs to fill a large GPU (132 SMs x 4) without giving any program less than one block."""
    return max(1, min(triton.cdiv(pixels, BLOCK), triton.cdiv(132 * 4, batch)))


def coach_select(score: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Radix select of the k-th largest score of each image.

    Args:
        score: [B, 1, H, W] float32/float16/bfloat16, contiguous, H * W > 0.
        k: rank, 1 = largest, in [1, H * W].

    Returns:
        (state [B, 2] int32 whose column 0 is the ordered key of the threshold, programs per image).
    """
    batch, pixels = score.shape[0], score.shape[2] * score.shape[3]
    state = torch.zeros((batch, 2), dtype=torch.int32, device=score.device)
    state[:, 1] = k
    hist = torch.zeros((len(PASSES), batch, BINS), dtype=torch.int32, device=score.device)
    programs = _programs_per_image(batch, pixels)
    for index, (shift, chosen_mask, flip) in enumerate(PASSES):
        _coach_histogram_kernel[(batch, programs)](
            score, hist[index], state, pixels, shift, chosen_mask, flip, programs, BLOCK=BLOCK, BINS=BINS
        )
        _coach_select_kernel[(batch,)](hist[index], state, shift, flip, BINS=BINS)
    return state, programs


def coach_threshold(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest score of each image of [B, 1, H, W] ``score``, as [B] float32 (exact, ties included)."""
    keys = coach_select(score.contiguous(), k)[0][:, 0]
    bits = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return bits.view(torch.float32)


def coach_mask_fwd(score: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """``sigmoid(alpha * (score - t))``, t the k-th largest of each image. score: [B, 1, H, W] float32/float16/bfloat16.

    Returns:
        [B, 1, H, W] mask, dtype of ``score``.
    """
    score = score.contiguous()
    mask = torch.empty_like(score)
    if score.numel() == 0:
        return mask
    state, programs = coach_select(score, k)
    pixels = score.shape[2] * score.shape[3]
    _coach_mask_fwd_kernel[(score.shape[0], programs)](score, mask, state, pixels, float(alpha), programs, BLOCK=BLOCK)
    return mask
