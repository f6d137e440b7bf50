"""pytest-benchmark suite of ``covfast::reverse_attention`` forward and backward, per backend, plus eager torch and
``torch.compile`` of the reference (on a GPU).

Targets (issue 4, GPU): forward >= 3x eager torch, >= 1.2x torch.compile, >= 70 % of the device copy bandwidth on
large inputs. Bytes moved: forward reads x and writes out (2 x |x|); backward reads grad and x, writes grad_x (3 x).
"""

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, SMOKE, backends

import covfast.ops  # noqa: F401  (registers the implementations)
from covfast import _backend
from covfast.ops import reference

# (B, C, H, W, h, w): Inf-Net's deepest reverse attention at 352 px input, and a large memory-bound case
SIZES = {"infnet-2048x11": (8, 2048, 11, 11, 11, 11), "large-64x352": (8, 64, 352, 352, 88, 88)}
if SMOKE:
    SIZES = {"smoke": (2, 3, 9, 7, 4, 5)}
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
