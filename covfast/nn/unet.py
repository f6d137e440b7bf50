"""Encoder-decoder networks: the plain U-Net floor and the residual U-Net used for multi-class, inpainting
and the coach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covfast.nn.backbone import ResNetBackbone
from covfast.nn.blocks import ConvBNReLU, DecoderBlock


class UNet(nn.Module):
    """Plain U-Net (Ronneberger et al., MICCAI 2015) with batch norm: the baseline ("floor") of the ablation.

    Args:
        in_ch: input channels.
        out_ch: output channels (1: infection logits, 3: background / GGO / consolidation logits).
        base: channels of the first level; each of the four downsamplings doubles them.
    """

    def __init__(self, in_ch: int = 1, out_ch: int = 1, base: int = 24):
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        self.encoders = nn.ModuleList()
        prev = in_ch
        for width in widths:
            self.encoders.append(nn.Sequential(ConvBNReLU(prev, width), ConvBNReLU(width, width)))
            prev = width
        self.decoders = nn.ModuleList(DecoderBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(widths[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_ch, H, W] float32 (H, W multiples of 16) -> logits [B, out_ch, H, W]."""
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)


class ResUNet(nn.Module):
    """U-Net decoder over the compact ResNet backbone (the same backbone as :class:`~covfast.nn.infnet.InfNet`).

    Used as the multi-class Inf-Net (slice + prior in, three classes out), as the inpainting network of the
    self-supervised pretraining (its backbone is then loaded into Inf-Net) and, narrower, as the coach.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        widths: backbone stage widths.
        blocks: residual blocks per stage.
    """

    def __init__(self, in_ch: int = 1, out_ch: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 2):
        super().__init__()
        self.backbone = ResNetBackbone(in_ch, widths, blocks)
        w0, w1, w2, w3 = widths
        self.decoders = nn.ModuleList(
            [DecoderBlock(w3, w2, w2), DecoderBlock(w2, w1, w1), DecoderBlock(w1, w0, w0), DecoderBlock(w0, w0, w0)]
        )
        self.head = nn.Sequential(ConvBNReLU(w0, w0), nn.Conv2d(w0, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_ch, H, W] float32 (H, W multiples of 32) -> [B, out_ch, H, W] (logits or raw values)."""
        f0, f1, f2, f3, f4 = self.backbone(x)
        y = f4
        for decoder, skip in zip(self.decoders, (f3, f2, f1, f0)):
            y = decoder(y, skip)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(y)
