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
        assert _backend.select("coach_mask", "cpu") == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_entry_point_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA backend cannot run"):
        _backend.implementation("infection_ratio", "cuda")(
            torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 2), 0.5
        )


def test_unknown_implementation():
    with pytest.raises(NotImplementedError):
        _backend.implementation("coach_mask", "cpp")
