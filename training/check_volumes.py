"""Check the HU -> training-distribution mapping of the infection stage on the COVID-CT-MD volumes.

Runs the lung mask and the installed infection model on each case, flags a slice infected when the infected
area inside the lungs (p > 0.5) is at least ``min_area_mm2``, and compares the flags with the radiologists'
per-slice labels (``labels.json``, ascending SliceLocation = ascending canonical slice index). The same is
reported for each area of ``areas_mm2`` (``slice_flags``). Writes a JSON summary and, per case, an overlay
montage PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covfast.nn.preprocess import PIXEL_MEAN
from training.ctmd import labels_at

# Class 1 (GGO) yellow, class 2 (consolidation) red in the multi-class overlays.
LESION_COLOURS = "autumn_r"


def _montage(hu, lung, prob, labels, path: Path, n: int = 8, classes=None) -> None:
    """Overlay montage of ``n`` lung slices: p >= 0.5 in orange, or with ``classes`` GGO yellow and
    consolidation red, so the two lesion types can be told apart by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covfast.pipeline.infection import window_hu

    with_lung = np.flatnonzero(lung.any(axis=(1, 2)))
    picks = with_lung[np.linspace(0, len(with_lung) - 1, n).round().astype(int)]
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.6))
    for ax, z in zip(axes, picks):
        ax.imshow(window_hu(hu[z]), cmap="gray")
        ax.contour(lung[z] > 0, levels=[0.5], colors="cyan", linewidths=0.5)
        if classes is None:
            ax.imshow(np.ma.masked_less(prob[z], 0.5), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
        else:
            ax.imshow(np.ma.masked_equal(classes[z], 0), cmap=LESION_COLOURS, alpha=0.6, vmin=1, vmax=2)
        ax.set_title(f"z{z} label {labels[z]}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def slice_flag_scores(area_mm2: np.ndarray, truth: np.ndarray, min_area_mm2: float) -> dict:
    """Slice flags (infected area >= ``min_area_mm2``) against per-slice labels.

    Args:
        area_mm2: [D] float infected area per slice.
        truth: [D] bool radiologist label per slice.
        min_area_mm2: smallest infected area that flags a slice.

    Returns:
        ``sensitivity`` (None without labelled slices), ``specificity`` (None without unlabelled slices),
        ``flagged`` and ``false_positive_slices``.
    """
    flags = area_mm2 >= min_area_mm2
    tp, fp = int((flags & truth).sum()), int((flags & ~truth).sum())
    return {
        "sensitivity": float(tp / truth.sum()) if truth.any() else None,
        "specificity": float((~flags & ~truth).sum() / (~truth).sum()) if (~truth).any() else None,
        "flagged": int(flags.sum()),
        "false_positive_slices": fp,
    }


def _class_areas(classes: np.ndarray | None, lung: np.ndarray, pixel_mm2: float) -> dict:
    """GGO and consolidation area inside the lungs (mm^2 over the volume) from the multi-class map, if any."""
    if classes is None:
        return {}
    inside = classes[lung > 0]
    ggo, consolidation = (float((inside == c).sum() * pixel_mm2) for c in (1, 2))
    return {
        "ggo_mm2": round(ggo, 1),
        "consolidation_mm2": round(consolidation, 1),
        "consolidation_share": consolidation / (ggo + consolidation) if ggo + consolidation else None,
    }


def check_volumes(
    data: str | Path,
    out: str | Path,
    min_area_mm2: float = 100.0,
    weights_dir: str | Path | None = None,
    areas_mm2: tuple[float, ...] = (20.0, 100.0, 500.0),
    hu_gates: tuple[float, ...] = (),
    tta: str | None = None,
    min_component_ml: float | None = None,
    precision: str | None = None,
) -> dict:
    """Per case: slice sensitivity / specificity of the infected-slice flags, and the mean of the mapped input.

    Args:
        data: the ``covid-ct-md`` folder (case folders and ``labels.json``).
        out: folder for ``volumes.json`` and ``<case>_overlay.png``.
        min_area_mm2: smallest infected area that flags a slice.
        weights_dir: folder of the model to check; None for the installed weights.
        areas_mm2: further flag areas scored into ``slice_flags``.
        hu_gates: HU thresholds of :func:`covfast.pipeline.infection.gate_aerated` applied to the model's output
            afterwards, each scored into ``slice_flags_hu_gate[gate]``.
        tta: test-time augmentation of the infection networks (:data:`covfast.pipeline.infection.TTA_CHOICES`; None:
            the pipeline's default, as ``covfast infer``).
        min_component_ml: drop infection components under this volume as ``covfast infer`` does (None: its
            default, ``SeverityRules.min_component_ml``; 0 keeps everything).
        precision: network precision as ``covfast infer --precision`` (None: its default; ``int8`` on this CPU).

    Returns:
        ``{case: {...}}`` as written to ``volumes.json``.
    """
    from covfast.io import load_volume
    from covfast.pipeline.infection import (
        WEIGHTS_DIR,
        check_tta,
        drop_small_components,
        gate_aerated,
        lung_slices,
        segment_infection,
        window_hu,
    )
    from covfast.pipeline.lung import lung_mask
    from covfast.pipeline.severity import DEFAULT_RULES

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((data / "labels.json").read_text())
    tta = check_tta(tta)
    min_ml = DEFAULT_RULES.min_component_ml if min_component_ml is None else min_component_ml
    summary = {}
    for case, info in labels.items():
        volume = load_volume(data / case)
        lung = lung_mask(volume.hu, volume.spacing_mm)
        result = segment_infection(volume.hu, lung, volume.spacing_mm, weights_dir=weights_dir or WEIGHTS_DIR, tta=tta,
                                   precision=precision)
        dropped = drop_small_components(result.mask, result.prob, volume.spacing_mm, min_ml)
        pixel_mm2 = volume.spacing_mm[1] * volume.spacing_mm[2]
        area = ((result.prob > 0.5) & (lung > 0)).sum(axis=(1, 2)) * pixel_mm2
        truth = labels_at(info, volume.z_mm)
        crops = [window_hu(volume.hu[z][c]) for z, c in lung_slices(lung)]
        summary[case] = {
            "diagnosis": info["diagnosis"],
            "tta": tta,
            "engines": {name: found["engine"] for name, found in result.engines.items()},
            "min_component_ml": min_ml,
            "components_dropped": dropped,
            "slices": len(area),
            "labelled_infected": int(truth.sum()),
            **slice_flag_scores(area, truth, min_area_mm2),
            "slice_flags": {str(a): slice_flag_scores(area, truth, a) for a in areas_mm2},
            "slice_flags_hu_gate": {
                str(gate): {
                    str(a): slice_flag_scores(
                        ((gate_aerated(result.prob, volume.hu, gate) > 0.5) & (lung > 0)).sum(axis=(1, 2)) * pixel_mm2,
                        truth,
                        a,
                    )
                    for a in areas_mm2
                }
                for gate in hu_gates
            },
            **_class_areas(result.classes, lung, pixel_mm2),
            "mapped_input_mean": float(np.mean([c.mean() for c in crops]) / 255.0),
            "training_input_mean": PIXEL_MEAN,
            "seconds": result.timings,
            "infected_area_mm2": [round(float(a), 1) for a in area],
            "labels": truth.astype(int).tolist(),
        }
        _montage(volume.hu, lung, result.prob, truth.astype(int), out / f"{case}_overlay.png", classes=result.classes)
        print(case, {k: v for k, v in summary[case].items() if k not in ("infected_area_mm2", "labels")}, flush=True)
        np.savez_compressed(out / f"{case}_prob.npz", prob=(result.prob * 255).round().astype(np.uint8))
    (out / "volumes.json").write_text(json.dumps(summary, indent=2))
    print(flag_table(summary))
    return summary


def flag_table(summary: dict) -> str:
    """Markdown table of slice sensitivity / specificity per case, flag area and HU gate of a summary."""

    def cell(scores: dict) -> str:
        return " / ".join("-" if scores[k] is None else f"{scores[k]:.2f}" for k in ("sensitivity", "specificity"))

    cases = list(summary)
    first = summary[cases[0]]
    rows = [("none", area, {c: summary[c]["slice_flags"][area] for c in cases}) for area in first["slice_flags"]]
    for gate, by_area in first["slice_flags_hu_gate"].items():
        rows += [(gate, area, {c: summary[c]["slice_flags_hu_gate"][gate][area] for c in cases}) for area in by_area]
    lines = ["| HU gate | area mm^2 | " + " | ".join(f"{c} sens / spec" for c in cases) + " |"]
    lines.append("|---" * (2 + len(cases)) + "|")
    lines += [f"| {gate} | {float(area):g} | " + " | ".join(cell(s[c]) for c in cases) + " |" for gate, area, s in rows]
    return "\n".join(lines)
