"""Batch augmentation on the training device: flips, rotation, random crop (zoom) and cutout.

Everything is one affine resampling per batch (``affine_grid`` + ``grid_sample``) so augmentation costs
almost nothing next to the network on a GPU and needs no data-loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Augmentation settings.

    Attributes:
        flip: random horizontal and vertical flips.
        rotate_deg: maximum absolute rotation in degrees.
        crop_min: smallest side of the random crop as a fraction of the slice (1 disables cropping).
        cutout_p: probability that a slice gets a cutout.
        cutout_fractions: cutout area as a fraction of the slice, one drawn per slice.
    """

    flip: bool = True
    rotate_deg: float = 15.0
    crop_min: float = 0.75
    cutout_p: float = 0.5
    cutout_fractions: tuple[float, ...] = (0.2, 0.4, 0.5)


def augment(inputs: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator):
    """Augment a batch.

    Args:
        inputs: [B, Ci, S, S] float image channels in [0, 1] (slice, optionally the prior).
        targets: [B, Ct, S, S] float targets (probabilities or one-hot classes).
        cfg: the settings.
        generator: random generator on the inputs' device.

    Returns:
        (inputs, targets, valid): warped inputs with cutouts filled with 0 (air), warped targets, and
        valid [B, 1, S, S] float, 0 inside cutouts so the loss ignores what the network cannot see.
    """
    b, _, s, _ = inputs.shape
    dev = inputs.device

    def rand(*shape):
        return torch.rand(*shape, device=dev, generator=generator)

    angle = (rand(b) * 2 - 1) * math.radians(cfg.rotate_deg)
    scale = cfg.crop_min + (1 - cfg.crop_min) * rand(b)
    shift = (rand(b, 2) * 2 - 1) * (1 - scale)[:, None]
    flips = torch.where(rand(b, 2) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(b, 2, device=dev)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos * flips[:, 0], -sin * flips[:, 1], shift[:, 0]], dim=1),
            torch.stack([sin * flips[:, 0], cos * flips[:, 1], shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
    inputs = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    targets = F.grid_sample(targets, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if targets.shape[1] > 1:
        # One-hot class targets: the zero padding outside the slice is background.
        targets[:, :1] += 1 - targets.sum(dim=1, keepdim=True)
    valid = torch.ones(b, 1, s, s, device=dev)
    if cfg.cutout_p > 0:
        fractions = torch.tensor(cfg.cutout_fractions, device=dev)
        area = fractions[torch.randint(len(cfg.cutout_fractions), (b,), device=dev, generator=generator)]
        aspect = torch.exp((rand(b) * 2 - 1) * math.log(2))
        height = (torch.sqrt(area * aspect) * s).clamp(max=s)
        width = (torch.sqrt(area / aspect) * s).clamp(max=s)
        top = rand(b) * (s - height)
        left = rand(b) * (s - width)
        coords = torch.arange(s, device=dev, dtype=torch.float32)
        rows = (coords[None] >= top[:, None]) & (coords[None] < (top + height)[:, None])
        cols = (coords[None] >= left[:, None]) & (coords[None] < (left + width)[:, None])
        box = rows[:, :, None] & cols[:, None, :] & (rand(b) < cfg.cutout_p)[:, None, None]
        keep = (~box)[:, None].float()
        inputs = inputs * keep
        valid = valid * keep
    return inputs, targets, valid
