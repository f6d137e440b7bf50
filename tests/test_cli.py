"""End-to-end: `covfast infer` / `covfast info` on the shipped sample volume, exit codes, nothing partial left."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covfast.cli import main
from covfast.io import load_volume, sample_path, write_nifti_like
from covfast.pipeline.lung import lung_mask


@pytest.fixture(autouse=True)
def engine_dir(request, monkeypatch):
    """ONNX exports made by ``--engine auto``/``onnx`` go to pytest's cache folder (reused across runs), not ~/.cache."""
    monkeypatch.setenv("COVFAST_ENGINE_DIR", str(request.config.cache.mkdir("covfast_engines")))


@pytest.fixture(scope="module")
def sample():
    return load_volume(str(sample_path()))


@pytest.fixture(scope="module")
def known_mask(sample, tmp_path_factory):
    """An infection mask with known content on the sample's grid: GGO on three slices' right lung, consolidation
    on one slice's left lung (in canonical orientation), written as NIfTI in the input's geometry."""
    lung = lung_mask(sample.hu, sample.spacing_mm)
    per_slice = lung.reshape(lung.shape[0], -1)
    lung_slices = np.flatnonzero((per_slice == 1).any(1) & (per_slice == 2).any(1))
    mid = int(lung_slices[len(lung_slices) // 2])
    mask = np.zeros_like(lung)
    mask[mid - 1 : mid + 2][lung[mid - 1 : mid + 2] == 1] = 1
    mask[mid + 3][lung[mid + 3] == 2] = 2
    mask[0, 0, 0] = 1  # outside the lung: must not count
    path = tmp_path_factory.mktemp("mask") / "infection.nii.gz"
    write_nifti_like(sample, mask, path)
    expected = {
        "ggo": int((lung[mid - 1 : mid + 2] == 1).sum()),
        "consolidation": int((lung[mid + 3] == 2).sum()),
        "lung": {"right": int((lung == 1).sum()), "left": int((lung == 2).sum())},
        "slices": (mid - 1, mid, mid + 1, mid + 3),
    }
    return path, expected


def test_infer_sample_with_mask(sample, known_mask, tmp_path, capsys):
    mask_path, expected = known_mask
    out = tmp_path / "out"
    code = main(["infer", str(sample_path()), "-o", str(out), "--infection-mask", str(mask_path), "--device", "cpu"])
    assert code == 0
    folder = out / "sample_ct"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["report.json", "lung_mask.nii.gz", "infection_mask.nii.gz", "preview.png"]
    )
    report = json.loads((folder / "report.json").read_text())
    voxel_ml = float(np.prod(sample.spacing_mm)) / 1000
    assert report["schema_version"] == "1.0"
    assert report["input"]["sha256"] == sample.sha256
    assert report["lung_volume_ml"]["right"] == pytest.approx(expected["lung"]["right"] * voxel_ml)
    assert report["lung_volume_ml"]["left"] == pytest.approx(expected["lung"]["left"] * voxel_ml)
    assert report["infected_volume_ml"]["ggo"] == pytest.approx(expected["ggo"] * voxel_ml)
    assert report["infected_volume_ml"]["consolidation"] == pytest.approx(expected["consolidation"] * voxel_ml)
    total = (expected["ggo"] + expected["consolidation"]) * voxel_ml
    assert report["percent_infected"]["volumetric"] == pytest.approx(100 * total / report["lung_volume_ml"]["total"])
    assert report["severity"]["ct_class"] in {"CT0", "CT1"}
    positive = [s["index"] for s in report["slices"] if s["covid_positive"]]
    assert positive == list(expected["slices"])
    assert report["zones"]["right_percent_infected"] > 0
    assert set(report["timings_s"]) >= {
        "read",
        "lung_mask",
        "infection",
        "reduction",
        "severity",
        "write_masks",
        "preview",
        "total",
    }
    assert report["infection_source"] == {"kind": "mask", "path": str(mask_path)}
    # Masks come back in the input's exact grid.
    source = nib.load(str(sample_path()))
    for name in ("lung_mask.nii.gz", "infection_mask.nii.gz"):
        img = nib.load(str(folder / name))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
        assert int(img.header["qform_code"]) == int(source.header["qform_code"])
        assert int(img.header["sform_code"]) == int(source.header["sform_code"])
    written = np.asarray(nib.load(str(folder / "infection_mask.nii.gz")).dataobj)
    original = np.asarray(nib.load(str(mask_path)).dataobj)
    np.testing.assert_array_equal(written, original)
    assert (folder / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sample_ct" in capsys.readouterr().out
    assert not list(out.glob(".*partial"))
    (summary,) = csv.DictReader((out / "summary.csv").open())
    assert summary["output"] == "sample_ct" and summary["ct_class"] == report["severity"]["ct_class"]
    assert float(summary["infected_ml"]) == pytest.approx(total, rel=1e-5)


def test_missing_input_exit_3(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["infer", str(tmp_path / "nope.nii.gz"), "-o", str(out)])
    assert code == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("covfast: error:") and "nope.nii.gz" in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def test_output_is_a_file_exit_3(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    code = main(["infer", str(sample_path()), "-o", str(target)])
    assert code == 3
    assert "taken" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_unwritable_output_leaves_nothing(tmp_path, capsys, monkeypatch):
    from covfast.pipeline import run

    def broken_preview(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run.Result, "_preview_png", broken_preview)
    out = tmp_path / "out"
    code = main(["infer", str(sample_path()), "-o", str(out), "--device", "cpu"])
    assert code == 3
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["infer"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["infer", "x.nii.gz", "--batch-size", "0"])
    assert info.value.code == 2


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extensions"]["covfast._C"]["available"] is True
    assert set(info["backends"]) == {"cpp", "cuda", "triton", "onnxruntime", "tensorrt", "highdicom"}
    if info["backends"]["onnxruntime"]["available"]:
        from covfast.engine.quantize import cpu_has_vnni

        assert info["backends"]["onnxruntime"]["cpu_default"].startswith("int8" if cpu_has_vnni() else "fp32")
    assert info["devices"][0]["type"] == "cpu"
    assert main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_infer_sample_with_shipped_models(sample, tmp_path, capsys):
    """The default path: shipped Inf-Net (single + multi-class) and the Affinity model on the sample volume."""
    from covfast.pipeline.infection import installed_models

    names = {card["name"] for card in installed_models()}
    if not {"infnet", "infection_unet", "infnet_multiclass", "affinity"} <= names:
        pytest.skip(f"shipped weights missing: {names}")
    out = tmp_path / "out"
    assert main(["infer", str(sample_path()), "-o", str(out), "--device", "cpu", "-q", "--no-preview"]) == 0
    folder = out / "sample_ct"
    report = json.loads((folder / "report.json").read_text())
    # The one-line summary names the volume call, marked experimental.
    assert f"looks {report['diagnosis']['label']} (experimental) -> " in capsys.readouterr().out
    assert [m["name"] for m in report["models"]] == ["infnet", "infection_unet", "infnet_multiclass", "affinity"]
    assert report["infection_source"]["models"] == ["infnet", "infection_unet", "infnet_multiclass"]
    # --engine auto on a CPU: TensorRT and torch-cuda are passed over with their reasons, then onnxruntime if
    # installed (int8 on a CPU with 8-bit dot products), else torch on the CPU.
    from covfast.engine.quantize import cpu_has_vnni

    expected_engine = "torch-cpu"
    if importlib.util.find_spec("onnxruntime"):
        expected_engine = "onnxruntime-cpu-int8" if cpu_has_vnni() else "onnxruntime-cpu"
    assert list(report["engine"]) == ["infnet", "infection_unet", "infnet_multiclass"]
    for used in report["engine"].values():
        assert used["engine"] == expected_engine
        assert [s["engine"] for s in used["skipped"]][:2] == ["tensorrt", "torch-cuda"]
        assert all(s["reason"] for s in used["skipped"])
    infected = report["infected_volume_ml"]
    assert infected["total"] == pytest.approx(infected["ggo"] + infected["consolidation"])
    assert infected["total"] > 1.0  # P001 is a COVID-19 case with visible lesions
    assert report["severity"]["ct_class"] in {"CT1", "CT2", "CT3", "CT4"}
    assert report["diagnosis"]["label"] in {"covid", "pneumonia", "normal"}
    assert report["infection_source"]["tta"] == "h"  # the default test-time augmentation
    assert sum(report["diagnosis"]["probs"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "volumes labelled right" in report["diagnosis"]["validation"]
    assert "training seeds" in report["diagnosis"]["validation"]  # the head's spread over seeds, from the model card
    # The kind comes from the infection's peripheral odds ratio: s = OR / (1 + OR) on every abnormal slice.
    ratio = report["distribution"]["peripheral_odds_ratio"]
    assert report["diagnosis"]["rule"].startswith("per slice p(abnormal)") and "peripheral odds ratio" in report[
        "diagnosis"]["rule"]
    for s in (s for s in report["slices"] if s.get("class_probs") and s["class_probs"]["normal"] < 1):
        abnormal = 1 - s["class_probs"]["normal"]
        assert s["class_probs"]["covid"] == pytest.approx(abnormal * ratio / (1 + ratio), abs=1e-9)
    assert report["lesions"]["count"] == len(report["lesions"]["volumes_ml"]) > 0
    lung_slices = [s for s in report["slices"] if s["lung_area_mm2"] > 0]
    assert all(sum(s["class_probs"].values()) == pytest.approx(1.0, abs=1e-3) for s in lung_slices)
    # The cascade: a slice leans abnormal exactly when it is COVID-positive by the segmentation.
    classed = [s for s in lung_slices if s["class_probs"]]
    assert classed and all((s["class_probs"]["normal"] <= 0.5) == s["covid_positive"] for s in classed)
    assert report["diagnosis"]["abnormal_slices"] == sum(s["covid_positive"] for s in classed)
    # Each slice's class follows the cascade: normal exactly off the COVID-positive slices, else the scan's kind.
    kind = "covid" if ratio >= 1 else "pneumonia"
    assert all(s["class"] == (kind if s["covid_positive"] else "normal") for s in classed)
    infection = sample.from_source(np.asarray(nib.load(str(folder / "infection_mask.nii.gz")).dataobj))
    lung = sample.from_source(np.asarray(nib.load(str(folder / "lung_mask.nii.gz")).dataobj))
    assert set(np.unique(infection)) <= {0, 1, 2}
    assert not infection[lung == 0].any()
    voxel_ml = float(np.prod(sample.spacing_mm)) / 1000
    assert (infection == 2).sum() * voxel_ml == pytest.approx(infected["consolidation"])


def test_engine_choices_match_the_engine_module():
    from covfast.cli import ENGINE_CHOICES, PRECISION_CHOICES, TTA_CHOICES
    from covfast.engine import ENGINES
    from covfast.engine.runtime import PRECISIONS
    from covfast.pipeline import infection

    assert ENGINE_CHOICES == ENGINES
    assert PRECISION_CHOICES == PRECISIONS
    assert TTA_CHOICES == infection.TTA_CHOICES


def test_onnx_engine_with_bf16_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["infer", str(sample_path()), "-o", str(out), "--engine", "onnx", "--precision", "bf16", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs fp32 or int8" in err
    assert not out.exists()


def test_engine_tensorrt_without_tensorrt_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT absent even on a machine that has it
    out = tmp_path / "out"
    code = main(["infer", str(sample_path()), "-o", str(out), "--engine", "tensorrt", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("covfast: error: --engine tensorrt:") and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_engine_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["infer", "x.nii.gz", "--engine", "openvino"])
    assert info.value.code == 2
    assert "--engine" in capsys.readouterr().err


def _good_bad_good(tmp_path):
    """Three inputs: three-slice crops of the sample around its middle, with an unreadable file between them."""
    image = nib.load(str(sample_path()))
    mid = image.shape[2] // 2
    first, last = tmp_path / "first.nii.gz", tmp_path / "last.nii.gz"
    nib.save(image.slicer[:, :, mid - 2 : mid + 1], str(first))
    nib.save(image.slicer[:, :, mid : mid + 3], str(last))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume" * 10)
    return first, broken, last


def test_several_inputs_one_failing(tmp_path, capsys):
    """Reading ahead and writing behind: a bad input in the middle reports one line, the others complete in order."""
    first, broken, last = _good_bad_good(tmp_path)
    out = tmp_path / "out"
    code = main(["infer", str(first), str(broken), str(last), "-o", str(out), "--device", "cpu", "-q",
                 "--no-preview"])
    assert code == 3
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("covfast: error:")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0]
    summaries = [line.split(":")[0] for line in captured.out.splitlines()]
    assert summaries == ["first", "last"]
    assert sorted(p.name for p in out.iterdir()) == ["first", "last", "summary.csv"]
    for name, source in (("first", first), ("last", last)):
        report = json.loads((out / name / "report.json").read_text())
        assert report["input"]["path"] == str(source)
        assert nib.load(str(out / name / "lung_mask.nii.gz")).shape == nib.load(str(source)).shape
    # summary.csv: a row per finished input, none for the broken one.
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["output"] for r in rows] == ["first", "last"]
    assert [r["input"] for r in rows] == [str(first), str(last)]
    # A second run into the same folder replaces its inputs' rows and keeps the others.
    assert main(["infer", str(last), "-o", str(out), "--device", "cpu", "-q", "--no-preview"]) == 0
    again = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["output"] for r in again] == ["first", "last"] and again[0] == rows[0]


def test_worker_processes_match_one_process(tmp_path, capsys):
    """--workers 2: spawned processes compute and write the volumes; a bad input's error comes back across the
    process boundary as one line naming the file, and every report equals the one-process run's."""
    first, broken, last = _good_bad_good(tmp_path)
    reports = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        code = main(["infer", str(first), str(broken), str(last), "-o", str(out), "--device", "cpu", "-q",
                     "--no-preview", "--workers", workers])
        assert code == 3
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("covfast: error:")]
        assert len(errors) == 1 and "broken.nii.gz" in errors[0]
        assert [line.split(":")[0] for line in captured.out.splitlines()] == ["first", "last"]
        assert sorted(p.name for p in out.iterdir()) == ["first", "last", "summary.csv"]
        reports[workers] = [json.loads((out / name / "report.json").read_text()) for name in ("first", "last")]
    for one, two in zip(reports["1"], reports["2"]):
        assert two["percent_infected"] == one["percent_infected"]
        assert two["lung_volume_ml"] == one["lung_volume_ml"]


def test_workers_option(capsys):
    from covfast.api import default_workers

    assert default_workers("cpu", 10) == 1
    assert default_workers("cuda", 1) == 1
    assert 1 <= default_workers("cuda", 2) <= 2
    api = sys.modules["covfast.api"]
    cases = [(16, 100.0, 80.0, 32, 12), (16, 10.0, 80.0, 32, 3), (16, None, None, 5, 5), (2, 8.0, 80.0, 9, 1),
             (16, 100.0, 8.0, 32, 2)]  # an 8 GB GPU holds two workers at 3 GB
    for cores, memory, gpu_memory, inputs, expected in cases:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(api, "_cores", lambda cores=cores: cores)
            patch.setattr(api, "_available_memory_gb", lambda memory=memory: memory)
            patch.setattr(api, "_gpu_memory_gb", lambda gpu_memory=gpu_memory: gpu_memory)
            assert default_workers("cuda", inputs) == expected
    with pytest.raises(SystemExit) as info:
        main(["infer", "x.nii.gz", "--workers", "0"])
    assert info.value.code == 2 and "--workers" in capsys.readouterr().err


def test_summary_csv_rows_and_a_foreign_file_is_refused(tmp_path, capsys):
    from covfast.report.summary import COLUMNS, row

    report = {
        "input": {"path": "/data/p1.nii.gz"},
        "lung_volume_ml": {"total": 5000.0},
        "infected_volume_ml": {"total": 100.0, "ggo": 70.0, "consolidation": 30.0},
        "percent_infected": {"volumetric": 2.0, "mean_of_slices": 2.5},
        "severity": {"ct_class": "CT1"},
        "zone_ct_score": 7,
        "slices": [{"covid_positive": True}, {"covid_positive": False}, {"covid_positive": True}],
        "lesions": {"count": 4},
        "distribution": {"peripheral_odds_ratio": 1.5, "peripheral_odds_ratio_interval": [0.75, 2.5],
                         "pattern": "peripheral", "bilateral": False},
        "diagnosis": {"label": "covid", "probs": {"covid": 0.6, "pneumonia": 0.3, "normal": 0.1}},
        "timings_s": {"total": 8.5},
        "notes": ["a", "b"],
    }
    r = row("p1", report)
    assert tuple(r) == COLUMNS
    assert r["infected_ml"] == "100" and r["covid_positive_slices"] == "2" and r["bilateral"] == "no"
    assert r["p_covid"] == "0.6" and r["notes"] == "a | b" and r["ct_class"] == "CT1"
    assert (r["peripheral_odds_ratio_low"], r["peripheral_odds_ratio_high"]) == ("0.75", "2.5")
    # No infection segmentation: empty cells, not "None".
    bare = row("p2", {"input": {"path": "x"}, "lung_volume_ml": {"total": 0.0}, "slices": [{"covid_positive": None}],
                      "distribution": None, "diagnosis": None})
    assert bare["infected_ml"] == bare["covid_positive_slices"] == bare["bilateral"] == bare["diagnosis"] == ""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("patient,score\n1,2\n")
    assert main(["infer", str(sample_path()), "-o", str(out), "--device", "cpu", "-q"]) == 3
    err = capsys.readouterr().err
    assert "summary.csv" in err and "not a covfast summary table" in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # nothing ran
    assert (out / "summary.csv").read_text() == "patient,score\n1,2\n"


def _strict_json(path):
    """report.json parsed as strict JSON (NaN / Infinity are not JSON)."""
    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_scan_without_lungs_says_so(tmp_path, capsys):
    """A CT of a water cylinder in air (a phantom, no lungs): exit 0, an empty lung mask, nothing quantified, no
    network run, a note that says why, and no NaN in report.json."""
    rows, cols = np.mgrid[:96, :96]
    body = ((rows - 48) ** 2 + (cols - 48) ** 2) < 40**2
    hu = np.where(body[..., None], 40, -1000).astype(np.int16) * np.ones((1, 1, 12), np.int16)
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    out = tmp_path / "out"
    assert main(["infer", str(path), "-o", str(out), "--device", "cpu", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"phantom: no lung found -> {out / 'phantom'}"
    assert "no lung found: is this a chest CT" in captured.err
    report = _strict_json(out / "phantom" / "report.json")
    assert report["lung_volume_ml"]["total"] == 0
    assert report["percent_infected"]["volumetric"] is None and report["severity"]["ct_class"] is None
    assert report["models"] == [] and report["infection_source"] is None and report["diagnosis"] is None
    assert any(note.startswith("no lung found") for note in report["notes"])
    assert not nib.load(str(out / "phantom" / "lung_mask.nii.gz")).get_fdata().any()


def _slab(tmp_path, slices: int = 3):
    """A NIfTI of ``slices`` middle slices of the sample (its header and geometry)."""
    image = nib.load(str(sample_path()))
    mid = image.shape[2] // 2
    path = tmp_path / "slab.nii.gz"
    nib.save(image.slicer[:, :, mid : mid + slices], str(path))
    return path


def test_scan_covering_little_lung_gets_a_note(tmp_path, capsys):
    """Three slices of the sample (~440 mL of lung): quantified as usual, with a note that the scan may not cover
    the chest."""
    path = _slab(tmp_path)
    out = tmp_path / "out"
    assert main(["infer", str(path), "-o", str(out), "--device", "cpu", "-q", "--no-preview", "--tta", "none"]) == 0
    report = _strict_json(out / "slab" / "report.json")
    lung = report["lung_volume_ml"]["total"]
    assert 0 < lung < 500
    assert f"only {lung:.0f} mL of lung found" in " ".join(report["notes"])
    assert report["percent_infected"]["volumetric"] is not None


def test_no_ensemble_runs_the_infnet_alone(tmp_path):
    """--no-ensemble leaves the U-Net partner out: the report lists the Inf-Net alone and the infected volume differs
    from the ensemble's; the affinity head, which reads the Inf-Net's own probability either way, does not (the
    cascade's class probabilities follow the infected areas, so they may)."""
    from covfast.pipeline.infection import PARTNER, installed_models

    if PARTNER not in {card["name"] for card in installed_models()}:
        pytest.skip("the U-Net partner is not installed")
    path = _slab(tmp_path, 6)
    args = ["infer", str(path), "--device", "cpu", "-q", "--no-preview", "--tta", "none"]
    assert main(args + ["-o", str(tmp_path / "both")]) == 0
    assert main(args + ["-o", str(tmp_path / "alone"), "--no-ensemble"]) == 0
    both = _strict_json(tmp_path / "both" / "slab" / "report.json")
    alone = _strict_json(tmp_path / "alone" / "slab" / "report.json")
    assert PARTNER in both["infection_source"]["models"] and PARTNER not in alone["infection_source"]["models"]
    assert both["infected_volume_ml"]["soft"] != alone["infected_volume_ml"]["soft"]
    assert [s["head_probs"] for s in alone["slices"]] == [s["head_probs"] for s in both["slices"]]


def test_save_probabilities_writes_the_soft_map_on_the_input_grid(tmp_path):
    """--save-probabilities: infection_prob.nii.gz on the input's grid whose in-lung sum is the report's soft
    infected volume; not written without the flag or when a given mask replaces the network."""
    path = _slab(tmp_path, 6)
    out = tmp_path / "out"
    args = ["infer", str(path), "-o", str(out), "--device", "cpu", "-q", "--no-preview", "--tta", "none"]
    assert main(args + ["--save-probabilities"]) == 0
    folder = out / "slab"
    report = _strict_json(folder / "report.json")
    assert report["outputs"]["infection_prob"] == "infection_prob.nii.gz"
    source = nib.load(str(path))
    written = nib.load(str(folder / "infection_prob.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    prob = written.get_fdata()
    assert prob.min() >= 0 and prob.max() <= 1 + 1e-6 and prob.max() > 0.5
    lung = np.asarray(nib.load(str(folder / "lung_mask.nii.gz")).dataobj) > 0
    voxel_ml = float(np.prod(source.header.get_zooms())) / 1000
    soft = report["infected_volume_ml"]["soft"]
    # Quantised to 1/255: each voxel's value is off by at most 1/510.
    assert prob[lung].sum() * voxel_ml == pytest.approx(soft, abs=lung.sum() * voxel_ml / 510 + 1e-6)
    assert not prob[~lung].any()
    # Without the flag, or with a mask instead of the network, there is no probability map.
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "slab" / "infection_prob.nii.gz").exists()
    assert main(args + ["-o", str(tmp_path / "given"), "--save-probabilities", "--infection-mask",
                        str(folder / "infection_mask.nii.gz")]) == 0
    assert not (tmp_path / "given" / "slab" / "infection_prob.nii.gz").exists()


def test_summary_line_names_the_infection_pattern_from_10_ml():
    from covfast.cli import _summary_line

    report = {
        "lung_volume_ml": {"total": 5000.0},
        "percent_infected": {"volumetric": 2.0},
        "infected_volume_ml": {"total": 100.0},
        "severity": {"ct_class": "CT1"},
        "distribution": {"pattern": "peripheral", "bilateral": True},
        "diagnosis": {"label": "covid"},
    }
    line = _summary_line("scan", report, Path("out/scan"))
    assert "CT1, bilateral peripheral, looks covid (experimental) -> out/scan" in line
    report["distribution"] = {"pattern": "central", "bilateral": False}
    assert ", unilateral central," in _summary_line("scan", report, Path("o"))
    report["infected_volume_ml"]["total"] = 4.0  # below the diagnosis's 10 mL the pattern is noise
    assert "central" not in _summary_line("scan", report, Path("o"))
    report["distribution"] = None
    assert "CT1, looks covid" in _summary_line("scan", report, Path("o"))


def test_batch_size_defaults_by_device():
    from covfast.pipeline.run import DEFAULT_BATCH_SIZE, resolve_batch_size

    assert resolve_batch_size(None, "cpu") == DEFAULT_BATCH_SIZE["cpu"] == 8
    assert resolve_batch_size(None, "cuda") == DEFAULT_BATCH_SIZE["cuda"] == 32
    assert resolve_batch_size(5, "cuda") == 5 and resolve_batch_size(5, "cpu") == 5
