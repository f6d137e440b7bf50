"""Check the HU -> training-distribution mapping of the infection stage on the COVID-CT-MD volumes.

Runs the lung mask and the shipped infection model on each case, flags a slice infected when the infected
area inside the lungs (p > 0.5) is at least ``min_area_mm2``, and compares the flags with the radiologists'
per-slice labels (``labels.json``, ascending SliceLocation = ascending canonical slice index). Writes a JSON
summary and, per case, an overlay montage PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from covfast.nn.preprocess import PIXEL_MEAN


def _montage(hu, lung, prob, labels, path: Path, n: int = 8) -> None:
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
        ax.imshow(np.ma.masked_less(prob[z], 0.5), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"z{z} label {labels[z]}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def check_volumes(data: str | Path, out: str | Path, min_area_mm2: float = 100.0) -> dict:
    """Per case: slice sensitivity / specificity of the infected-slice flags, and the mean of the mapped input.

    Args:
        data: the ``covid-ct-md`` folder (case folders and ``labels.json``).
        out: folder for ``volumes.json`` and ``<case>_overlay.png``.
        min_area_mm2: smallest infected area that flags a slice.

    Returns:
        ``{case: {...}}`` as written to ``volumes.json``.
    """
    from covfast.io import load_volume
    from covfast.pipeline.infection import lung_crop, segment_infection, window_hu
    from covfast.pipeline.lung import lung_mask

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((data / "labels.json").read_text())
    summary = {}
    for case, info in labels.items():
        volume = load_volume(data / case)
        lung = lung_mask(volume.hu, volume.spacing_mm)
        result = segment_infection(volume.hu, lung, volume.spacing_mm)
        pixel_mm2 = volume.spacing_mm[1] * volume.spacing_mm[2]
        area = ((result.prob > 0.5) & (lung > 0)).sum(axis=(1, 2)) * pixel_mm2
        flags = area >= min_area_mm2
        truth = np.asarray(info["infection_slice_labels"], bool)
        if len(truth) != len(flags):
            raise ValueError(f"{case}: {len(truth)} labels for {len(flags)} slices")
        crops = [window_hu(volume.hu[z][c]) for z in range(len(flags)) if (c := lung_crop(lung[z] > 0))]
        tp, fp = int((flags & truth).sum()), int((flags & ~truth).sum())
        summary[case] = {
            "diagnosis": info["diagnosis"],
            "slices": len(flags),
            "labelled_infected": int(truth.sum()),
            "flagged": int(flags.sum()),
            "sensitivity": tp / truth.sum() if truth.any() else None,
            "specificity": ((~flags & ~truth).sum() / (~truth).sum()) if (~truth).any() else None,
            "false_positive_slices": fp,
            "mapped_input_mean": float(np.mean([c.mean() for c in crops]) / 255.0),
            "training_input_mean": PIXEL_MEAN,
            "seconds": result.timings,
            "infected_area_mm2": [round(float(a), 1) for a in area],
            "labels": truth.astype(int).tolist(),
        }
        _montage(volume.hu, lung, result.prob, truth.astype(int), out / f"{case}_overlay.png")
        print(case, {k: v for k, v in summary[case].items() if k not in ("infected_area_mm2", "labels")}, flush=True)
    (out / "volumes.json").write_text(json.dumps(summary, indent=2))
    return summary
