"""`covfast benchmark` on a tiny real input (four slices of the shipped sample): table, JSON contents, usage errors."""

import json

import nibabel as nib
import pytest

from covfast.benchmark import STAGES
from covfast.cli import main
from covfast.io import sample_path


@pytest.fixture(autouse=True)
def engine_dir(request, monkeypatch):
    """ONNX exports made by ``--engine auto`` go to pytest's cache folder (reused across runs), not ~/.cache."""
    monkeypatch.setenv("COVFAST_ENGINE_DIR", str(request.config.cache.mkdir("covfast_engines")))


@pytest.fixture(scope="module")
def tiny_input(tmp_path_factory):
    """Four mid-lung slices of the sample as NIfTI (nibabel's slicer keeps the affine right)."""
    image = nib.load(str(sample_path()))
    mid = image.shape[2] // 2
    path = tmp_path_factory.mktemp("tiny") / "tiny.nii.gz"
    nib.save(image.slicer[:, :, mid - 2 : mid + 2], str(path))
    return path


def test_benchmark_tiny_input_writes_table_and_json(tiny_input, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["benchmark", str(tiny_input), "--runs", "1", "--device", "cpu", "--engine", "torch",
                 "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    for stage in (*STAGES, "end_to_end"):
        assert stage in table
    assert "peak host RSS" in table
    result = json.loads(out.read_text())
    assert result["command"] == (f"covfast benchmark {tiny_input} --runs 1 --device cpu --engine torch "
                                 f"--json {out}")
    assert result["runs"] == 1 and result["warmup_runs"] == 1
    assert result["batch_size"] == 8 and "batch 8" in table  # the CPU default
    assert result["input"]["shape"][2] == 4
    stages = result["stages"]
    assert set(stages) == {*STAGES, "end_to_end"}
    for times in stages.values():
        assert len(times["runs_s"]) == 1 and times["min_s"] == times["median_s"] == times["runs_s"][0] >= 0
    assert stages["read"]["min_s"] > 0 and stages["lung_mask"]["min_s"] > 0 and stages["write"]["min_s"] > 0
    # Every stage ran inside the end-to-end time.
    assert sum(stages[s]["median_s"] for s in STAGES) <= stages["end_to_end"]["median_s"]
    assert result["device"]["kind"] == "cpu" and "cores" in result["device"]["name"]
    assert result["peak_gpu_memory_mb"] is None and result["peak_host_rss_mb"] > 50
    assert result["versions"]["covfast"] and result["versions"]["torch"]
    assert result["date"].endswith("+00:00")
    if result["infection_source"] is not None:  # the shipped networks are installed
        assert {used["engine"] for used in result["engine"].values()} == {"torch-cpu"}


def test_benchmark_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "--runs", "0"])
    assert info.value.code == 2
    assert main(["benchmark", "/nonexistent/ct.nii.gz", "--runs", "1"]) == 3
    assert "nonexistent" in capsys.readouterr().err
