"""What the installed distribution contains (checked on a regular, non-editable install as in CI)."""

import importlib.metadata as md

import pytest


def _files():
    files = md.files("covfast") or []
    names = [str(f) for f in files]
    if any(n.startswith("_editable_") for n in names):
        pytest.skip("editable install: the wheel's contents are checked on a regular install (CI)")
    return names


def test_wheel_contents():
    names = _files()
    assert any(n.startswith("covfast/_C") and n.endswith(".so") for n in names)
    assert "covfast/kernels/__init__.py" in names
    assert "covfast/data/sample_ct.nii.gz" in names
    assert "covfast/data/SAMPLE.md" in names
    assert "covfast/cli.py" in names
    top_level = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level <= {"covfast", "..", "bin"}, top_level
    assert not any(n.startswith(("training/", "kernels/", "tests/")) for n in names)


def test_weights_are_packaged():
    names = _files()
    weights = [n for n in names if n.startswith("covfast/weights/") and n.endswith(".safetensors")]
    cards = {n[: -len(".safetensors")] + ".json" for n in weights}
    assert cards <= set(names), "every shipped weight file needs its model card"
