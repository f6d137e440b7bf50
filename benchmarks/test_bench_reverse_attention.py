"""pytest-benchmark suite of ``covfast::reverse_attention`` and ``covfast::reverse_attention_concat``, forward and
backward, per backend, plus eager torch and ``torch.compile`` of the reference (on a GPU) and, for the fused op, the
unfused path the model used before (interpolate the edge features, concatenate, reverse attention).

Targets (issue 4, GPU): forward >= 3x eager torch, >= 1.2x torch.compile, >= 70 % of the device copy bandwidth on
large inputs. Bytes moved: forward reads x and writes out (2 x |x|); backward reads grad and x, writes grad_x (3 x).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, SMOKE, backends

import covfast.ops  # registers the implementations
from covfast import _backend
from covfast.ops import reference

# (B, C, H, W, h, w). GPU: Inf-Net's deepest reverse attention at 352 px input, and a large memory-bound case.
# CPU: the shipped model's three stages at batch 8 of 256 px slices (covfast/nn/infnet.py, widths 64/128/256 plus 32
# edge channels), and a large case.
if HAS_CUDA:
    SIZES = {"infnet-2048x11": (8, 2048, 11, 11, 11, 11), "large-64x352": (8, 64, 352, 352, 88, 88)}
else:
    SIZES = {
        "stage-288x8": (8, 288, 8, 8, 32, 32),
        "stage-160x16": (8, 160, 16, 16, 8, 8),
        "stage-96x32": (8, 96, 32, 32, 16, 16),
        "large-96x88": (8, 96, 88, 88, 44, 44),
    }
# (B, C1, C2, H, W, he, we, h, w) of the fused op: the same stages with the 64 x 64 edge features of a 256 px input
# (and a large case with 176 x 176 edge features). "plain" sizes have no edge channels: the fused kernel is then the
# plain reverse attention, which shows what a C++ backend of ``reverse_attention`` itself would gain.
CONCAT_SIZES = {
    "plain-96x32": (8, 96, 0, 32, 32, 1, 1, 16, 16),
    "plain-96x88": (8, 96, 0, 88, 88, 1, 1, 44, 44),
    "stage-256+32x8": (8, 256, 32, 8, 8, 64, 64, 32, 32),
    "stage-128+32x16": (8, 128, 32, 16, 16, 64, 64, 8, 8),
    "stage-64+32x32": (8, 64, 32, 32, 32, 64, 64, 16, 16),
    "large-64+32x88": (8, 64, 32, 88, 88, 176, 176, 44, 44),
}
if SMOKE:
    SIZES = {"smoke": (2, 3, 9, 7, 4, 5)}
    CONCAT_SIZES = {"smoke": (2, 3, 2, 9, 7, 12, 10, 4, 5)}
DTYPES = [torch.float32, torch.float16] if HAS_CUDA else [torch.float32]


def inputs(size, dtype):
    b, c, h_out, w_out, h, w = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h_out, w_out, generator=gen).to(DEVICE, dtype)
    side = torch.randn(b, 1, h, w, generator=gen).to(DEVICE, dtype)
    return x, side


def implementations():
    names = [f"backend-{name}" for name in backends("reverse_attention")]
    if HAS_CUDA:
        names.append("compile-reference")
    return names


def resolve(name):
    if name == "compile-reference":
        return torch.compile(reference.reverse_attention)
    return _backend.implementation("reverse_attention", name.removeprefix("backend-"))


def annotate(benchmark, nbytes):
    if benchmark.stats is not None:
        best = benchmark.stats.stats.min
        benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / best / 1e9)
        if HAS_CUDA:
            benchmark.extra_info["device"] = torch.cuda.get_device_name()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", implementations())
def test_forward(timed, benchmark, impl, size, dtype):
    x, side = inputs(size, dtype)
    fn = resolve(impl)
    fn(x, side)  # compile / autotune outside the timing
    timed(fn, x, side)
    annotate(benchmark, 2 * x.nbytes)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", backends("reverse_attention_backward"))
def test_backward(timed, benchmark, backend, size):
    x, side = inputs(size, torch.float32)
    grad = torch.randn_like(x)
    timed(_backend.implementation("reverse_attention_backward", backend), grad, x, side)
    annotate(benchmark, 3 * x.nbytes)


def test_copy_bandwidth(timed, benchmark):
    x, _ = inputs(list(SIZES)[-1], torch.float32)
    out = torch.empty_like(x)
    timed(out.copy_, x)
    annotate(benchmark, 2 * x.nbytes)


def concat_inputs(size):
    b, c1, c2, h_out, w_out, he, we, h, w = CONCAT_SIZES[size]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c1, h_out, w_out, generator=gen).to(DEVICE)
    edge = torch.randn(b, c2, he, we, generator=gen).to(DEVICE)
    side = torch.randn(b, 1, h, w, generator=gen).to(DEVICE)
    return x, edge, side


def unfused(x, edge, side):
    """The model's reverse-attention step before the fused op: resize, concatenate, then the dispatched op."""
    if edge.shape[1] == 0:  # nothing to resize or concatenate (and F.interpolate rejects zero channels)
        return covfast.ops.reverse_attention(x, side)
    edge_up = F.interpolate(edge, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return covfast.ops.reverse_attention(torch.cat([x, edge_up], dim=1), side)


def concat_bytes(x, edge, side, outputs):
    """Compulsory traffic: every input read once and ``outputs`` tensors of the output's size written."""
    out_bytes = x.nbytes * (x.shape[1] + edge.shape[1]) // max(x.shape[1], 1)
    return x.nbytes + edge.nbytes + side.nbytes + outputs * out_bytes


@pytest.mark.parametrize("size", list(CONCAT_SIZES))
@pytest.mark.parametrize("impl", [*(f"backend-{name}" for name in backends("reverse_attention_concat")), "unfused"])
def test_concat_forward(timed, benchmark, impl, size):
    x, edge, side = concat_inputs(size)
    fn = (
        unfused
        if impl == "unfused"
        else _backend.implementation("reverse_attention_concat", impl.removeprefix("backend-"))
    )
    timed(fn, x, edge, side, rounds=40)
    annotate(benchmark, concat_bytes(x, edge, side, 1))


@pytest.mark.parametrize("size", list(CONCAT_SIZES))
@pytest.mark.parametrize("backend", backends("reverse_attention_concat_backward"))
def test_concat_backward(timed, benchmark, backend, size):
    x, edge, side = concat_inputs(size)
    grad = torch.randn(x.shape[0], x.shape[1] + edge.shape[1], *x.shape[2:], device=DEVICE)
    timed(_backend.implementation("reverse_attention_concat_backward", backend), grad, x, edge, side, rounds=40)
    # reads grad, x, edge, side; writes grad_x, grad_edge, grad_side
    annotate(benchmark, grad.nbytes + 2 * (x.nbytes + edge.nbytes + side.nbytes))
