"""The input convention shared by training and inference: 8-bit lung-windowed slices, resized to a square
``INPUT_SIZE`` grid and standardised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INPUT_SIZE = 256
# Mean and standard deviation of the 50 labelled COVID-SemiSeg slices (every 8th, resized to 352 x 352; the
# statistics barely depend on the size),
# in [0, 1] units: the doctors' labelled slices are the distribution the models are judged on.
PIXEL_MEAN = 0.520
PIXEL_STD = 0.304


def to_input(slices: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize and standardise 8-bit slices for the networks.

    Args:
        slices: [N, 1, H, W] uint8 (or float in 0..255) grey slices.
        size: square side of the network input.

    Returns:
        [N, 1, size, size] float32, (x / 255 - PIXEL_MEAN) / PIXEL_STD.
    """
    x = slices.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - PIXEL_MEAN) / PIXEL_STD
