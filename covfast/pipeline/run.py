"""The covfast pipeline: volume -> lung mask -> infection -> per-slice reduction -> severity -> outputs.

Each stage is a function with an array-in, array-out contract (see the stage modules); this module only
sequences them, times them and assembles the result. Data flow: ``covfast.io`` -> here -> ``covfast.report``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import covfast
from covfast.errors import ModelNotInstalledError, OutputError
from covfast.pipeline.severity import DEFAULT_RULES, PROBABILITY_THRESHOLD, SeverityRules, summarize

SCHEMA_VERSION = "1.0"
# An adult's lungs hold 3-6 L at CT; under this much the scan most likely misses part of the chest (a note, not an
# error: a child's or a partly collapsed lung can be small).
SMALL_LUNG_ML = 500.0
NO_LUNG_NOTE = "no lung found: is this a chest CT that covers the lungs? nothing was quantified"
CUT_LUNG_NOTE = (
    "the lungs reach the image's edge: the field of view cuts the chest, so volumes and percentages cover only the "
    "lung inside the image"
)


@dataclass
class Result:
    """What one covfast run found; ``report`` is exactly what ``report.json`` holds.

    Attributes:
        report: the report dictionary (schema in the README).
        volume: the input :class:`covfast.io.Volume`.
        lung_mask: [D, H, W] uint8, canonical orientation, 0 background, 1 right lung, 2 left lung.
        infection_mask: [D, H, W] uint8 (0 background, 1 GGO, 2 consolidation; or 0/1 single-class), or None.
        infection_prob: [D, H, W] float32 single-class infection probability, or None.
    """

    report: dict
    volume: object
    lung_mask: np.ndarray
    infection_mask: np.ndarray | None = None
    infection_prob: np.ndarray | None = None
    slice_ratio: np.ndarray | None = field(default=None, repr=False)

    @property
    def ct_class(self) -> str | None:
        return self.report["severity"]["ct_class"]

    @property
    def percent_infected(self) -> float | None:
        return self.report["percent_infected"]["volumetric"]

    def save(self, out_dir, preview: bool = True, probabilities: bool = False, dicom_seg: bool = False) -> Path:
        """Write report.json, lung_mask.nii.gz, infection_mask.nii.gz and preview.png into ``out_dir``, and with
        ``probabilities`` the infection probability as infection_prob.nii.gz (uint8 p x 255, scl_slope 1/255, on
        the input's grid; only when a network ran); with ``dicom_seg`` the masks as segmentation.dcm, a DICOM SEG
        referencing the source series (DICOM inputs only; otherwise a note in the report says why there is none).

        All files are written into a temporary sibling folder that replaces ``out_dir`` only when every file is
        complete, so a failed or interrupted run leaves no partial output.
        """
        from covfast.io import write_nifti_like

        out_dir = Path(out_dir)
        timings = self.report["timings_s"]
        parent = out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
        except OSError as exc:
            raise OutputError(out_dir, f"cannot create output folder ({exc.strerror or exc})") from None
        try:
            outputs = {"report": "report.json", "lung_mask": "lung_mask.nii.gz"}
            with _timed(timings, "write_masks"):
                write_nifti_like(self.volume, self.lung_mask, staging / "lung_mask.nii.gz")
                if self.infection_mask is not None:
                    write_nifti_like(self.volume, self.infection_mask, staging / "infection_mask.nii.gz")
                    outputs["infection_mask"] = "infection_mask.nii.gz"
                if probabilities and self.infection_prob is not None:
                    quantised = np.rint(np.clip(self.infection_prob, 0.0, 1.0) * 255.0).astype(np.uint8)
                    write_nifti_like(self.volume, quantised, staging / "infection_prob.nii.gz", scale=1.0 / 255.0)
                    outputs["infection_prob"] = "infection_prob.nii.gz"
            if dicom_seg:
                with _timed(timings, "dicom_seg"):
                    if self._write_dicom_seg(staging):
                        outputs["dicom_seg"] = "segmentation.dcm"
            if preview:
                with _timed(timings, "preview"):
                    (staging / "preview.png").write_bytes(self._preview_png())
                outputs["preview"] = "preview.png"
            self.report["outputs"] = outputs
            self.report["timings_s"]["total"] = sum(v for k, v in timings.items() if k != "total")
            (staging / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
            _replace_dir(staging, out_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(out_dir, f"cannot write output ({exc.strerror or exc})") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return out_dir

    def _write_dicom_seg(self, folder: Path) -> bool:
        """segmentation.dcm in ``folder`` when the input is a DICOM series that allows one; else a note says why."""
        from covfast.report import dicom_seg

        try:
            dicom_seg.write_dicom_seg(self.volume, self.lung_mask, self.infection_mask, folder / dicom_seg.FILENAME,
                                      covfast.__version__)
        except ValueError as exc:
            self.report["notes"].append(f"no {dicom_seg.FILENAME} written: {exc}")
            return False
        return True

    def _preview_png(self) -> bytes:
        from covfast.report.preview import render_preview

        report = self.report
        pct = report["percent_infected"]["volumetric"]
        if pct is None:
            summary = f"lung {report['lung_volume_ml']['total']:.0f} mL; infection not segmented"
        else:
            summary = (
                f"lung {report['lung_volume_ml']['total']:.0f} mL, infected "
                f"{report['infected_volume_ml']['total']:.1f} mL = {pct:.1f} % -> {report['severity']['ct_class']}"
            )
        from covfast.pipeline.distribution import pattern_phrase

        pattern = pattern_phrase(report)
        if pattern:
            dist = report["distribution"]
            summary += f", {pattern} (peripheral odds ratio {dist['peripheral_odds_ratio']:.2f}"
            if dist.get("peripheral_odds_ratio_interval"):
                low, high = dist["peripheral_odds_ratio_interval"]
                summary += f", 95 % {low:.2f}-{high:.2f} over {dist['lesions_counted']} lesions"
            summary += ")"
        diagnosis = report.get("diagnosis")
        if diagnosis and diagnosis["probs"]:
            probs = ", ".join(f"{name} {p:.2f}" for name, p in diagnosis["probs"].items())
            # A line of its own: with the severity figures it would run past the figure's edge.
            summary += f"\ndiagnosis (experimental; abnormal by the segmentation, kind by the lesion pattern): " \
                f"{diagnosis['label']} ({probs})"
        return render_preview(
            self.volume.hu,
            self.lung_mask,
            self.infection_mask,
            self.volume.spacing_mm,
            self.volume.z_mm,
            self.slice_ratio,
            title=f"covfast {covfast.__version__}: {report['input']['path']}",
            summary=summary,
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder into place, replacing an earlier output of the same name."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is a usage error."""
    import torch

    from covfast.errors import UsageError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but torch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} (choose auto, cpu or cuda)")
    return device


# Slices per network batch when none is given: small on the CPU (larger batches are no faster there and cost memory),
# larger on a GPU, where the fixed cost of each network call dominates at small batches. Memory: the largest network
# over 32 slices and their flipped copies took 2.1 GB in float32 on the CPU (benchmarks/activation_memory.py); fp16 on
# a GPU has not been measured.
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}


def resolve_batch_size(batch_size: int | None, device: str) -> int:
    """``batch_size``, or the device's :data:`DEFAULT_BATCH_SIZE` when None (``device`` already resolved)."""
    return DEFAULT_BATCH_SIZE.get(device, 8) if batch_size is None else batch_size


def _reduce(lung_mask: np.ndarray, infection: np.ndarray, threshold: float):
    import torch

    from covfast.ops import infection_ratio

    lung_voxels, infected_voxels, soft_sum = infection_ratio(
        torch.from_numpy(lung_mask), torch.from_numpy(infection), threshold
    )
    return lung_voxels.numpy(), infected_voxels.numpy(), soft_sum.numpy()


def analyze(
    volume,
    *,
    infection_mask: np.ndarray | None = None,
    infection_mask_source: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    rules: SeverityRules = DEFAULT_RULES,
    timings: dict | None = None,
    progress=None,
    diagnose_volume: bool = True,
    engine: str = "auto",
    precision: str | None = None,
    tta: str | None = None,
    ensemble: bool = True,
) -> Result:
    """Run every stage on a loaded volume.

    Args:
        volume: a :class:`covfast.io.Volume` (canonical [D, H, W] HU array with geometry).
        infection_mask: optional [D, H, W] uint8 infection mask (0/1 or 0/1/2) in canonical orientation; when given
            it replaces the infection network.
        infection_mask_source: where that mask came from (recorded in the report).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: slices per network batch; None: :data:`DEFAULT_BATCH_SIZE` of the device.
        rules: severity thresholds.
        timings: dict that receives seconds per stage (an earlier ``read`` entry is kept).
        progress: optional callable(n_done, n_total) for the infection network.
        diagnose_volume: run the Affinity model (lesion instances, per-slice class probabilities, volume diagnosis)
            after a network segmentation.
        engine: inference engine of the infection networks, ``auto``, ``torch``, ``onnx`` or ``tensorrt``
            (:func:`covfast.engine.select_engine`); what ran is recorded under the report's ``engine`` key.
        precision: network precision, ``fp32``, ``fp16``, ``bf16``, ``int8`` or None (see :func:`covfast.infer`).
        tta: test-time augmentation of the infection networks (:data:`covfast.pipeline.infection.TTA_CHOICES`;
            None: the default), recorded under the report's ``infection_source``.
        ensemble: average the U-Net partner's infection probability into the Inf-Net's when it is installed
            (:mod:`covfast.pipeline.infection`); the models that ran are listed in the report.

    Returns:
        :class:`Result`.
    """
    from covfast.pipeline.lung import lung_mask as compute_lung_mask

    timings = {} if timings is None else timings
    device = resolve_device(device)
    batch_size = resolve_batch_size(batch_size, device)
    notes: list[str] = list(getattr(volume, "warnings", []) or [])
    with _timed(timings, "lung_mask"):
        lung = compute_lung_mask(volume.hu, volume.spacing_mm, device=device)
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    lung_ml = float(np.count_nonzero(lung)) * voxel_ml
    if lung_ml > 0 and (lung[:, [0, -1], :].any() or lung[:, :, [0, -1]].any()):
        notes.append(CUT_LUNG_NOTE)
    if lung_ml == 0:
        notes.append(NO_LUNG_NOTE)
    elif lung_ml < SMALL_LUNG_ML:
        notes.append(
            f"only {lung_ml:.0f} mL of lung found: the scan may not cover the whole chest; percentages refer to the "
            "lung inside the scan (check preview.png)"
        )

    models: list[dict] = []
    engines: dict = {}
    prob = None
    view_prob = view_features = None
    classes = None
    counts = None
    infection_source = None
    with _timed(timings, "infection"):
        if infection_mask is not None:
            classes = np.ascontiguousarray(infection_mask, dtype=np.uint8)
            infection_source = {"kind": "mask", "path": infection_mask_source}
        elif lung_ml > 0:  # no lung, nothing for the networks to look at
            try:
                from covfast.pipeline.infection import check_tta, drop_components, segment_infection

                tta = check_tta(tta)

                # The written masks keep only in-lung findings (segment_infection zeroes the rest) and the counts come
                # from the device that made them.
                seg = segment_infection(
                    volume.hu, lung, volume.spacing_mm, device=device, batch_size=batch_size, progress=progress,
                    engine=engine, precision=precision, tta=tta, ensemble=ensemble,
                )
                prob, classes, counts = seg.prob, seg.mask, seg.counts
                if drop_components(classes, prob, volume.spacing_mm, min_ml=rules.min_component_ml, lung=lung,
                                   dome_support=rules.dome_cap_support):
                    counts = None  # counted again below from the cleaned masks
                models, engines, view_prob, view_features = list(seg.models), seg.engines, seg.view_prob, seg.view_features
                infection_source = {"kind": "model", "models": [m["name"] for m in models], "tta": tta}
            except (ModelNotInstalledError, ImportError) as exc:
                notes.append(f"no infection model is installed ({exc}); pass --infection-mask to quantify infection")

    multiclass = classes is not None and bool((classes == 2).any())
    infected_voxels = None
    soft_ml = None
    slice_ratio = None
    with _timed(timings, "reduction"):
        if counts is not None:
            lung_voxels, infected_voxels = counts.lung_voxels, counts.infected_voxels
            soft_ml = float(counts.soft_sum.sum() * voxel_ml)
        elif classes is not None:
            lung_voxels, infected_voxels, _ = _reduce(lung, classes, PROBABILITY_THRESHOLD)
            if prob is not None:
                soft_ml = float(_reduce(lung, prob, PROBABILITY_THRESHOLD)[2].sum() * voxel_ml)
        else:
            lung_voxels = _reduce(lung, np.zeros_like(lung), PROBABILITY_THRESHOLD)[0]
    with _timed(timings, "severity"):
        summary = summarize(lung_voxels, infected_voxels, volume.spacing_mm, volume.z_mm, multiclass, rules)
    if infected_voxels is not None:
        lung_area = lung_voxels.sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            slice_ratio = np.where(lung_area > 0, infected_voxels.sum(axis=(1, 2)) / lung_area, np.nan)
    if summary["infected_volume_ml"]["total"] is not None:
        summary["infected_volume_ml"]["soft"] = soft_ml
    with _timed(timings, "distribution"):
        from covfast.pipeline.distribution import lesion_distribution

        per_lung = None if infected_voxels is None else tuple(np.asarray(infected_voxels).sum(axis=(0, 2)))
        summary["distribution"] = lesion_distribution(lung, classes, volume.spacing_mm, rules.min_lesion_ml, per_lung)
    diagnosis = None
    if prob is not None and diagnose_volume:
        with _timed(timings, "diagnosis"):
            diagnosis = _diagnose(volume, lung, prob, (view_prob, view_features), device, batch_size, summary, models,
                                  notes, rules)

    report = {
        "schema_version": SCHEMA_VERSION,
        "covfast_version": covfast.__version__,
        "input": {
            "path": volume.path,
            "sha256": volume.sha256,
            "kind": volume.kind,
            "shape": [int(s) for s in volume.source_shape],
            "spacing_mm": [float(s) for s in _source_spacing(volume)],
            "canonical_shape": [int(s) for s in volume.hu.shape],
            "canonical_spacing_mm": [float(s) for s in volume.spacing_mm],
            "series_uid": getattr(volume, "series_uid", None),
        },
        "models": models,
        "infection_source": infection_source,
        **summary,
        "lesions": diagnosis["lesions"] if diagnosis else None,
        "diagnosis": diagnosis["diagnosis"] if diagnosis else None,
        "rules": rules.describe(),
        "device": device,
        "engine": engines,
        "backend": _backend_used(device),
        "timings_s": timings,
        "notes": notes,
    }
    return Result(
        report=report,
        volume=volume,
        lung_mask=lung,
        infection_mask=classes if classes is not None else None,
        infection_prob=prob,
        slice_ratio=slice_ratio,
    )


def _diagnose(volume, lung, prob, views, device, batch_size, summary, models, notes, rules) -> dict | None:
    """Lesion instances and the COVID-19 / pneumonia / normal call of the Affinity model, merged into ``summary``'s
    per-slice entries (``class_probs``, ``lesions``); None, with a note, when its weights are not installed.
    ``views``: the infection stage's (view_prob, view_features); the cascade reads the summary's per-slice infected
    areas, so a slice's class agrees with its ``covid_positive`` flag."""
    from covfast.pipeline.diagnosis import diagnose, pattern_share

    view_prob, view_features = views
    areas = np.array([entry["infected_area_mm2"] for entry in summary["slices"]], dtype=np.float64)
    # The kind comes from the infection's peripheral predominance (CASCADE_RULE); a scan with no infected voxel has
    # no pattern, and no abnormal slice for a kind to matter (s = 0.5).
    share = pattern_share(summary.get("distribution"))
    try:
        result = diagnose(
            volume.hu, lung, prob, volume.spacing_mm, device=device, batch_size=batch_size, view_prob=view_prob,
            view_features=view_features, infected_area_mm2=areas, area_mm2=rules.min_lesion_area_mm2,
            kind_share=0.5 if share is None else share,
        )
    except ModelNotInstalledError as exc:
        notes.append(f"no diagnosis: {exc}")
        return None
    by_index = {entry["index"]: entry for entry in result["slices"]}
    for entry in summary["slices"]:
        found = by_index.get(entry["index"])
        entry["class_probs"] = found["class_probs"] if found else None
        entry["class"] = found["class"] if found else None
        entry["head_probs"] = found["head_probs"] if found else None
        entry["lesions"] = found["lesions"] if found else 0
    models.extend(result["models"][1:])
    result["diagnosis"]["validation"] = _diagnosis_validation()
    return result


def _diagnosis_validation() -> str | None:
    """One line from the affinity model card on how its diagnosis validated, so no reader takes it for more."""
    from covfast.pipeline.infection import WEIGHTS_DIR

    card_path = WEIGHTS_DIR / "affinity.json"
    if not card_path.is_file():
        return None
    card = json.loads(card_path.read_text())
    cascade = card.get("validation_cascade")
    if cascade and "pattern" in cascade:
        # The rule the report uses since session 13 (CASCADE_RULE): the kind from the peripheral odds ratio.
        pattern, head = cascade["pattern"], cascade["cascade"]
        line = (
            f"on P001, cap001, normal001 (segmentation decides abnormal, the infection's peripheral odds ratio which "
            f"kind, the kind's rule not fitted to these patients): {pattern['volumes_right']} of "
            f"{len(cascade['volumes'])} volumes labelled right, slice macro-F1 {pattern['slices']['macro_f1']:.2f}"
        )
        rights = [head["volumes_right"]] + [rep["cascade"]["volumes_right"] for rep in cascade.get("replicates", [])]
        line += (
            f"; the kind rests on one COVID-19 and one pneumonia patient (the affinity head's own split, held out: "
            f"{min(rights)}-{max(rights)} of 3 over {len(rights)} training seeds)"
        )
        return line + "; experimental"
    if cascade:
        # The rule the report uses (covfast/pipeline/diagnosis.py: CASCADE_RULE), checked leave-one-patient-out.
        right = cascade["cascade"]["volumes_right"]
        line = (
            f"leave-one-patient-out over P001, cap001, normal001 (segmentation decides abnormal, the affinity head "
            f"which kind): {right} of {len(cascade['volumes'])} held-out volumes labelled right, slice macro-F1 "
            f"{cascade['cascade']['slices']['macro_f1']:.2f}"
        )
        others = [rep["cascade"] for rep in cascade.get("replicates", [])]
        if others:
            rights = [right] + [rep["volumes_right"] for rep in others]
            f1s = [cascade["cascade"]["slices"]["macro_f1"]] + [rep["macro_f1"] for rep in others]
            line += (
                f" ({min(rights)}-{max(rights)} of 3 and {min(f1s):.2f}-{max(f1s):.2f} over {len(rights)} training "
                "seeds: the COVID-19 / pneumonia split is unreliable)"
            )
        return line + "; experimental, one patient per class"
    validation = card.get("validation", {})
    volumes = validation.get("volumes", {})
    right = sum(v.get("label") == v.get("truth") for v in volumes.values())
    slices = validation.get("slices", {})
    return (
        f"{validation.get('protocol', 'validation')}: {right} of {len(volumes)} held-out volumes labelled right, "
        f"slice macro-F1 {slices.get('macro_f1', float('nan')):.2f}; experimental, trained on one patient per class"
    )


def _source_spacing(volume) -> tuple:
    affine = np.asarray(volume.affine, dtype=np.float64)
    return tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def _backend_used(device: str) -> dict:
    """Which implementation ran each op: the reduction runs on host arrays (CPU backends), the networks' ops on
    ``device``."""
    from covfast import _backend

    return {
        "infection_ratio": f"{_backend.select('infection_ratio', 'cpu')} (cpu)",
        "network_ops": _backend.selected_backends(device),
    }
