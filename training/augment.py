"""Batch augmentation on the training device: flips, rotation, random crop (zoom), cutout and, optionally,
intensity changes of the image channel (brightness, contrast, gamma, blur, noise).

The geometry is one affine resampling per batch (``affine_grid`` + ``grid_sample``) so augmentation costs
almost nothing next to the network on a GPU and needs no data-loader workers. The intensity transforms draw random
numbers only when enabled, so recipes without them get exactly the random stream they always had.
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
        scale_max: largest zoom factor; above 1 a slice can also shrink inside the frame (zoom out, the border
            padded with 0 = air), so the scale is drawn in [crop_min, scale_max].
        intensity_p: probability, per slice and per transform, of each intensity transform below (0 disables
            them all). They act on the image channel only (never on a prior channel), before the cutout.
        brightness: multiplicative brightness factor drawn in [1 - brightness, 1 + brightness].
        contrast: contrast factor about the slice's mean, drawn in [1 - contrast, 1 + contrast].
        gamma: x -> x ** g with log g drawn in [-gamma, gamma].
        blur_sigma: Gaussian blur with sigma drawn in [0.5, blur_sigma] pixels (0 disables).
        noise_std: additive Gaussian noise with sigma drawn in [0, noise_std] (0 disables).
    """

    flip: bool = True
    rotate_deg: float = 15.0
    crop_min: float = 0.75
    cutout_p: float = 0.5
    cutout_fractions: tuple[float, ...] = (0.2, 0.4, 0.5)
    scale_max: float = 1.0
    intensity_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0


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
    scale = cfg.crop_min + (cfg.scale_max - cfg.crop_min) * rand(b)
    shift = (rand(b, 2) * 2 - 1) * (1 - scale).abs()[:, None]
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
    if cfg.intensity_p > 0:
        inputs = torch.cat([_intensity(inputs[:, :1], cfg, generator), inputs[:, 1:]], dim=1)
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


def _intensity(image: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, gamma, blur and noise of a [B, 1, S, S] image in [0, 1]; result in [0, 1]."""
    b = image.shape[0]

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, device=image.device, generator=generator)

    def chosen() -> torch.Tensor:
        return (rand(b) < cfg.intensity_p).float()[:, None, None, None]

    def factor(spread: float) -> torch.Tensor:
        return (1 + (rand(b) * 2 - 1) * spread)[:, None, None, None]

    if cfg.brightness > 0:
        on = chosen()
        image = image * (1 + on * (factor(cfg.brightness) - 1))
    if cfg.contrast > 0:
        on = chosen()
        mean = image.mean(dim=(2, 3), keepdim=True)
        image = mean + (image - mean) * (1 + on * (factor(cfg.contrast) - 1))
    if cfg.gamma > 0:
        on = chosen()
        g = torch.exp((rand(b) * 2 - 1) * cfg.gamma)[:, None, None, None]
        image = image.clamp(0, 1) ** (1 + on * (g - 1))
    if cfg.blur_sigma > 0:
        on = chosen()
        sigma = 0.5 + (cfg.blur_sigma - 0.5) * rand(b)
        image = on * _gaussian_blur(image, sigma) + (1 - on) * image
    if cfg.noise_std > 0:
        on = chosen()
        std = cfg.noise_std * rand(b)[:, None, None, None]
        image = image + on * std * torch.randn(image.shape, device=image.device, generator=generator)
    return image.clamp(0, 1)


def _gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [B, 1, S, S] with a per-slice sigma [B] (pixels), reflect padding."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, K]
    b = image.shape[0]
    x = image.transpose(0, 1)  # [1, B, S, S]: one group per slice
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=b)
    return x.transpose(0, 1)
