"""The backend selector: availability report, automatic choice, COVFAST_BACKEND override, CUDA errors."""

import pytest
import torch

import covfast.ops  # noqa: F401  (registers the implementations)
from covfast import _backend


def test_available_backends_reports_every_backend_with_a_reason():
    report = _backend.available_backends()
    assert set(report) == set(_backend.BACKENDS)
    for ok, reason in report.values():
        assert isinstance(ok, bool) and reason
    assert report["reference"][0]


def test_automatic_choice_on_cpu():
    with _backend.forced(None):
        expected = "cpp" if _backend._probe("cpp", "cpu")[0] else "reference"
        assert _backend.select("infection_ratio", "cpu") == expected
        assert _backend.select("reverse_attention", "cpu") == "reference"  # no C++ kernel: torch is as fast


def test_override_by_environment(monkeypatch):
    monkeypatch.setenv("COVFAST_BACKEND", "reference")
    _backend.select.cache_clear()
    try:
        assert _backend.select("infection_ratio", "cpu") == "reference"
        assert _backend.selected_backends("cpu")["infection_ratio"] == "reference"
    finally:
        monkeypatch.delenv("COVFAST_BACKEND")
        _backend.select.cache_clear()


def test_override_with_unknown_name_is_an_error():
    with _backend.forced("fortran"), pytest.raises(ValueError, match="not one of"):
        _backend.select("infection_ratio", "cpu")


def test_forced_backend_that_lacks_the_op_falls_back():
    with _backend.forced("cpp"):
        assert _backend.select("reverse_attention", "cpu") == "reference"  # its forward has no C++ version


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_entry_point_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA backend cannot run"):
        _backend.implementation("infection_ratio", "cuda")(
            torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 2), 0.5
        )


def test_unknown_implementation():
    with pytest.raises(NotImplementedError):
        _backend.implementation("reverse_attention", "cpp")


def test_runs_eagerly_only_for_plain_tensors_without_gradient():
    import torch

    x = torch.ones(3, requires_grad=True)
    assert _backend.runs_eagerly(torch.ones(2), torch.nn.Parameter(torch.ones(2)).detach())
    assert not _backend.runs_eagerly(torch.ones(2), x)
    with torch.no_grad():
        assert _backend.runs_eagerly(x, torch.nn.Parameter(torch.ones(2)))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not _backend.runs_eagerly(torch.empty(2))
    assert not torch.func.vmap(lambda t: torch.tensor(_backend.runs_eagerly(t)))(torch.ones(2, 3)).any()


def test_inference_calls_give_the_op_results_without_importing_dynamo():
    """The reduction, diagnosis and Inf-Net ops called for inference skip the custom-op machinery, whose first call imports
    torch._dynamo (about a second of every `covfast infer` run), and return what the registered op returns."""
    import subprocess
    import sys

    script = """
import sys, torch
from covfast import ops
g = torch.Generator().manual_seed(0)
lung = torch.randint(0, 3, (4, 9, 7), dtype=torch.uint8, generator=g)
prob = torch.rand(4, 9, 7, generator=g)
feats = torch.rand(2, 3, 16, 16, generator=g)
rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [1, 0.0, 0.0, 15.0, 15.0]])
slots = torch.tensor([0, 1, 1, 0])
x, w, v = torch.rand(2, 8, 5, generator=g), torch.rand(8, 4, generator=g), torch.rand(4, generator=g)
fx, edge, side = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 2, 16, 16, generator=g), torch.rand(2, 1, 4, 4)
with torch.no_grad():
    eager = [ops.infection_ratio(lung, prob, 0.5), ops.roi_align_slots(feats, rois, slots, 4, 0.5, 2, True),
             ops.affinity(x, w, v), ops.reverse_attention_concat(fx, edge, side)]
assert "torch._dynamo" not in sys.modules, "an inference op call imported torch._dynamo"
through_op = [torch.ops.covfast.infection_ratio(lung, prob, 0.5),
              torch.ops.covfast.roi_align_slots(feats, rois, slots, [4, 4], 0.5, 2, True),
              torch.ops.covfast.affinity(x, w, v), torch.ops.covfast.reverse_attention_concat(fx, edge, side)]
for a, b in zip(eager, through_op):
    for s, t in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(s, t)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
