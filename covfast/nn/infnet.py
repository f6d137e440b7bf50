"""Inf-Net: edge attention, parallel partial decoder and reverse attention (Fan et al., IEEE TMI 2020).

Structure (strides relative to the input slice):
    backbone features f1 (/4), f2 (/8), f3 (/16), f4 (/32);
    edge attention on f1 -> edge features e_att (/4) and an edge map (its own output);
    parallel partial decoder (PPD) on receptive-field-reduced f2, f3, f4 -> global map S_g (/8);
    reverse attention at three levels, coarse to fine, R_i = Concat(f_i, Down(e_att)) * A_i with
    A_i = expand(1 - sigmoid(Upsample(S_{i+1}))), each refining the previous map into a side output
    S_5 (/32), S_4 (/16), S_3 (/8); S_6 = S_g. The prediction is S_3.
With ``fine=True`` (covfast's extension, not in the paper) a fourth reverse-attention stage on f1 and e_att refines
S_3 into S_2 at /4, which is then the prediction: the paper's S_3 is upsampled 8x, which blurs lesion borders.
The weighting step (resize of the edge features, concatenation and the reverse-attention gate in one pass) is the
custom op ``covfast.ops.reverse_attention_concat``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from covfast import ops
from covfast.nn.backbone import ResNetBackbone
from covfast.nn.blocks import ConvBNReLU


@dataclass
class InfNetOutput:
    """Logits of every Inf-Net output, each [B, 1, H, W] float32 at the input size.

    Attributes:
        global_map: S_g from the parallel partial decoder.
        side: side outputs (S_5, S_4, S_3, and S_2 with ``fine``), coarse to fine.
        edge: edge-attention edge map.
        features: the backbone's stride-8 features f2 [B, widths[1], H/8, W/8], which the diagnosis stage pools its
            lesion RoIs from (:class:`covfast.pipeline.diagnosis.RoiFeatures`); not a logit map.
    """

    global_map: torch.Tensor
    side: tuple[torch.Tensor, ...]
    edge: torch.Tensor
    features: torch.Tensor | None = None

    @property
    def prediction(self) -> torch.Tensor:
        """Final infection logits, S_3: [B, 1, H, W]."""
        return self.side[-1]


class ReceptiveField(nn.Module):
    """Receptive-field block: parallel dilated 3x3 branches merged by a 1x1, with a residual path.

    Reduces a backbone stage to ``out_ch`` channels while enlarging the receptive field (as Inf-Net's
    RFB modules do before the partial decoder).
    """

    def __init__(self, in_ch: int, out_ch: int, dilations: tuple[int, ...] = (1, 3, 5)):
        super().__init__()
        self.reduce = ConvBNReLU(in_ch, out_ch, 1)
        self.branches = nn.ModuleList(ConvBNReLU(out_ch, out_ch, 3, dilation=d) for d in dilations)
        self.merge = ConvBNReLU(out_ch * len(dilations), out_ch, 1, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_ch, H, W] -> [B, out_ch, H, W]."""
        x = self.reduce(x)
        return self.relu(x + self.merge(torch.cat([branch(x) for branch in self.branches], dim=1)))


class PartialDecoder(nn.Module):
    """Parallel partial decoder: aggregates the three high-level features into S_g at stride 8.

    Coarser features gate finer ones by element-wise products after upsampling, then the levels are
    concatenated coarse to fine (the cascaded partial decoder of Wu et al., CVPR 2019, used by Inf-Net).
    """

    def __init__(self, ch: int):
        super().__init__()
        self.gate43 = ConvBNReLU(ch, ch)
        self.gate42 = ConvBNReLU(ch, ch)
        self.gate32 = ConvBNReLU(ch, ch)
        self.lift4 = ConvBNReLU(ch, ch)
        self.fuse3 = ConvBNReLU(2 * ch, 2 * ch)
        self.lift3 = ConvBNReLU(2 * ch, 2 * ch)
        self.fuse2 = ConvBNReLU(3 * ch, 3 * ch)
        self.out = nn.Sequential(ConvBNReLU(3 * ch, ch), nn.Conv2d(ch, 1, 1))

    def forward(self, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor) -> torch.Tensor:
        """x2 [B, C, H/8, W/8], x3 [B, C, H/16, W/16], x4 [B, C, H/32, W/32] -> S_g logits [B, 1, H/8, W/8]."""

        def up(x, ref):
            return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

        x3_gated = self.gate43(up(x4, x3)) * x3
        x2_gated = self.gate42(up(x4, x2)) * self.gate32(up(x3, x2)) * x2
        x3_fused = self.fuse3(torch.cat([x3_gated, self.lift4(up(x4, x3))], dim=1))
        x2_fused = self.fuse2(torch.cat([x2_gated, self.lift3(up(x3_fused, x2))], dim=1))
        return self.out(x2_fused)


class EdgeAttention(nn.Module):
    """Edge attention on the low-level features: edge features e_att and an edge-map output."""

    def __init__(self, in_ch: int, ch: int):
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU(in_ch, ch), ConvBNReLU(ch, ch))
        self.edge_out = nn.Conv2d(ch, 1, 1)

    def forward(self, f1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f1: [B, in_ch, H/4, W/4] -> (e_att [B, ch, H/4, W/4], edge logits [B, 1, H/4, W/4])."""
        e_att = self.features(f1)
        return e_att, self.edge_out(e_att)


class ReverseAttentionStage(nn.Module):
    """One reverse-attention refinement: S_i = S_{i+1} (resized) + conv(R_i).

    R_i = Concat(f_i, Down(e_att)) * (1 - sigmoid(Upsample(S_{i+1}))), computed by
    ``covfast.ops.reverse_attention_concat`` (resize, concatenation and gate fused) so the fast kernels replace it
    without touching the model.
    """

    def __init__(self, feat_ch: int, edge_ch: int, ch: int):
        super().__init__()
        self.refine = nn.Sequential(
            ConvBNReLU(feat_ch + edge_ch, ch, 1), ConvBNReLU(ch, ch), ConvBNReLU(ch, ch), nn.Conv2d(ch, 1, 3, padding=1)
        )

    def forward(self, feat: torch.Tensor, e_att: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """feat [B, Cf, h, w], e_att [B, Ce, H/4, W/4], coarse logits [B, 1, h', w'] -> logits [B, 1, h, w]."""
        # Under mixed precision the side map (a conv output) and the features (a batch-norm output) can differ; the
        # common dtype is the one torch.cat would give.
        dtype = torch.promote_types(feat.dtype, e_att.dtype)
        weighted = ops.reverse_attention_concat(feat.to(dtype), e_att.to(dtype), coarse.to(dtype))
        coarse_here = F.interpolate(coarse, size=feat.shape[-2:], mode="bilinear", align_corners=False)
        return coarse_here + self.refine(weighted)


class InfNet(nn.Module):
    """Single-class Inf-Net on a compact ResNet backbone.

    Args:
        in_ch: input channels (1: a normalised grey CT slice).
        widths: backbone stage widths.
        ch: channels of the receptive-field features and of the edge features.
        ra_ch: channels inside each reverse-attention stage.
        fine: add the stride-4 reverse-attention stage S_2 on f1 (see the module docstring).
        fine_ch: channels inside that stage.
    """

    def __init__(
        self,
        in_ch: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        ch: int = 32,
        ra_ch: int = 64,
        fine: bool = False,
        fine_ch: int = 32,
    ):
        super().__init__()
        self.backbone = ResNetBackbone(in_ch, widths)
        self.edge = EdgeAttention(widths[0], ch)
        self.rf2, self.rf3, self.rf4 = (ReceptiveField(w, ch) for w in widths[1:])
        self.ppd = PartialDecoder(ch)
        self.ra = nn.ModuleList(ReverseAttentionStage(w, ch, ra_ch) for w in reversed(widths[1:]))
        # Registered only when used, so the weights of networks without it load unchanged.
        self.ra_fine = ReverseAttentionStage(widths[0], ch, fine_ch) if fine else None

    def forward(self, x: torch.Tensor) -> InfNetOutput:
        """x: [B, in_ch, H, W] float32 (H, W multiples of 32) -> :class:`InfNetOutput` logits at [H, W]."""
        _, f1, f2, f3, f4 = self.backbone(x)
        e_att, edge = self.edge(f1)
        global_map = self.ppd(self.rf2(f2), self.rf3(f3), self.rf4(f4))
        sides = []
        coarse = global_map
        for stage, feat in zip(self.ra, (f4, f3, f2)):
            coarse = stage(feat, e_att, coarse)
            sides.append(coarse)
        if self.ra_fine is not None:
            sides.append(self.ra_fine(f1, e_att, coarse))
        size = x.shape[-2:]

        def full(logits):
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

        return InfNetOutput(full(global_map), tuple(full(s) for s in sides), full(edge), f2)
