"""Convolution building blocks shared by the covfast networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 (or k x k) convolution, batch norm, ReLU.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        dilation: dilation; padding keeps the spatial size at stride 1.
        relu: append a ReLU.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, relu: bool = True
    ):
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DecoderBlock(nn.Module):
    """U-Net decoder step: upsample to the skip's size, concatenate, two ConvBNReLU.

    Args:
        in_ch: channels of the coarse input.
        skip_ch: channels of the skip connection (0 for none).
        out_ch: output channels.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_ch + skip_ch, out_ch), ConvBNReLU(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None):
        """x: [B, in_ch, h, w]; skip: [B, skip_ch, H, W] or None with ``size`` given -> [B, out_ch, H, W]."""
        size = skip.shape[-2:] if skip is not None else size
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)
