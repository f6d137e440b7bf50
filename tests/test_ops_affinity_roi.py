"""covfast::affinity and covfast::roi_align: naive float64 oracles, gradcheck, opcheck."""

import math

import numpy as np
import pytest
import torch

from covfast.ops import affinity, roi_align


def affinity_oracle(features, weight, vector):
    x, w, v = (t.double().numpy() for t in (features, weight, vector))
    return np.einsum("...bc,bk,k->...c", x, w, v)  # ((W^T X)^T v) by explicit index sums


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("sizes", [(8, 16, 8), (8, 64, 64), (1, 1, 1), (5, 7, 3)])
def test_affinity_matches_oracle(batch, sizes):
    beta, channels, hidden = sizes
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(*batch, beta, channels, generator=gen)
    w = torch.randn(beta, hidden, generator=gen)
    v = torch.randn(hidden, generator=gen)
    np.testing.assert_allclose(affinity(x, w, v).numpy(), affinity_oracle(x, w, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_affinity_gradcheck(seed, batch):
    gen = torch.Generator().manual_seed(seed)
    args = [
        torch.randn(*batch, 8, 6, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(affinity, args)
    torch.library.opcheck(torch.ops.covfast.affinity.default, tuple(args))


def test_affinity_bad_shapes():
    with pytest.raises(ValueError, match="disagree"):
        affinity(torch.zeros(8, 4), torch.zeros(7, 3), torch.zeros(3))


def roi_align_oracle(features, rois, pooled, scale, sampling_ratio, aligned):
    """torchvision's CPU RoIAlign forward, transcribed as scalar loops in float64."""
    feats = features.double().numpy()
    _, channels, height, width = feats.shape
    out = np.zeros((len(rois), channels, pooled[0], pooled[1]))

    def bilinear(img, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(img.shape[0])
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1 - ly, 1 - lx
        return (
            hy * hx * img[:, y_low, x_low]
            + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low]
            + ly * lx * img[:, y_high, x_high]
        )

    for k, roi in enumerate(rois.double().tolist()):
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (c * scale - offset for c in roi[1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled[0], roi_w / pooled[1]
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled[0])
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled[1])
        count = max(grid_h * grid_w, 1)
        for ph in range(pooled[0]):
            for pw in range(pooled[1]):
                acc = np.zeros(channels)
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += bilinear(feats[int(roi[0])], y, x)
                out[k, :, ph, pw] = acc / count
    return out


def make_rois(gen, batch, height, width, count, scale):
    corners = (
        torch.rand(count, 4, generator=gen, dtype=torch.float64)
        * torch.tensor([width, height, width, height], dtype=torch.float64)
        / scale
    )
    x1, x2 = torch.minimum(corners[:, 0], corners[:, 2]), torch.maximum(corners[:, 0], corners[:, 2])
    y1, y2 = torch.minimum(corners[:, 1], corners[:, 3]), torch.maximum(corners[:, 1], corners[:, 3])
    index = torch.randint(0, batch, (count,), generator=gen).double()
    rois = torch.stack([index, x1 - 2, y1 - 1, x2 + 1, y2], dim=1)  # some boxes reach outside the map
    rois[0, 1:] = torch.tensor([3.0, 3.0, 3.2, 3.1]) / scale  # a box smaller than a pixel
    return rois


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("pooled", [(1, 1), (7, 7), (3, 5)])
def test_roi_align_matches_oracle(aligned, sampling_ratio, pooled):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    features = torch.randn(2, 3, 13, 17, generator=gen, dtype=torch.float64)
    rois = make_rois(gen, 2, 13, 17, 6, scale=0.5)
    out = roi_align(features, rois, pooled, 0.5, sampling_ratio, aligned)
    expected = roi_align_oracle(features, rois, pooled, 0.5, sampling_ratio, aligned)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    out32 = roi_align(features.float(), rois.float(), pooled, 0.5, sampling_ratio, aligned)
    np.testing.assert_allclose(out32.double().numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck_and_opcheck(seed, aligned):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = make_rois(gen, 2, 6, 7, 3, scale=1.0)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 1.0, -1, aligned), (features,))
    torch.library.opcheck(torch.ops.covfast.roi_align.default, (features, rois, [2, 3], 1.0, 2, aligned))


def test_roi_align_empty_and_non_contiguous():
    features = torch.randn(1, 4, 9, 8).transpose(2, 3)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]])
    expected = roi_align_oracle(features, rois, (2, 2), 1.0, 2, True)
    np.testing.assert_allclose(roi_align(features, rois, 2, 1.0, 2, True).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert roi_align(features, torch.empty(0, 5), 3).shape == (0, 4, 3, 3)
