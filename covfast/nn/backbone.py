"""Compact ResNet-style backbone trained from scratch.

Why ResNet basic blocks rather than Res2Net (the published Inf-Net backbone): ImageNet weights are not
available, so the backbone is trained from scratch on a few thousand slices, where plain residual 3x3
blocks train reliably; and on a 2-core CPU at batch 1 the many narrow split convolutions of a Res2Net
block cost more time per FLOP than one wide 3x3 convolution. Widths (32, 64, 128, 256) with two blocks
per stage keep the whole Inf-Net under 8 M parameters (He et al., "Deep Residual Learning", CVPR 2016).
"""

from __future__ import annotations

import torch
from torch import nn

from covfast.nn.blocks import ConvBNReLU


class BasicBlock(nn.Module):
    """Residual block: two 3x3 convolutions plus an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch, out_ch, stride=stride)
        self.conv2 = ConvBNReLU(out_ch, out_ch, relu=False)
        self.shortcut = (
            nn.Identity() if stride == 1 and in_ch == out_ch else ConvBNReLU(in_ch, out_ch, 1, stride, relu=False)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_ch, H, W] -> [B, out_ch, H/stride, W/stride]."""
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Four-stage ResNet encoder.

    Args:
        in_ch: input channels (1 for a CT slice, 2 for slice + prior).
        widths: channels of the four stages.
        blocks: residual blocks per stage.

    Forward returns the stem features at stride 2 and the four stage outputs at strides 4, 8, 16, 32.
    """

    def __init__(self, in_ch: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 2):
        super().__init__()
        self.widths = tuple(widths)
        self.stem = nn.Sequential(ConvBNReLU(in_ch, widths[0], stride=2), ConvBNReLU(widths[0], widths[0]))
        stages = []
        prev = widths[0]
        for width in widths:
            layers = [BasicBlock(prev, width, stride=2)]
            layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, in_ch, H, W] float32 -> [f0 (H/2), f1 (H/4), f2 (H/8), f3 (H/16), f4 (H/32)]."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats
