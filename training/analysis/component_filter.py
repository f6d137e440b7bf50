"""Slice flags after dropping small 3D infection components, per cut-off (one-off analysis of session 4).

Usage: python training/analysis/component_filter.py RUN_DIR [RUN_DIR ...], each a check-volumes output folder
(``<case>_prob.npz``); run from the repository root with ../shared/data beside it.
"""

import json
import sys
from pathlib import Path

import cc3d
import numpy as np

from covfast.io import load_volume
from covfast.pipeline.lung import lung_mask
from training.check_volumes import slice_flag_scores
from training.ctmd import labels_at

data = Path("../shared/data/covid-ct-md")
labels = json.loads((data / "labels.json").read_text())
runs = sys.argv[1:]
cache = Path("runs/s4/lungs")
cache.mkdir(exist_ok=True)
rows = {}
for case, info in labels.items():
    vol = load_volume(data / case)
    lp = cache / f"{case}.npz"
    if lp.exists():
        lung = np.load(lp)["lung"]
    else:
        lung = lung_mask(vol.hu, vol.spacing_mm)
        np.savez_compressed(lp, lung=lung)
    truth = labels_at(info, vol.z_mm)
    voxel_ml = float(np.prod(vol.spacing_mm)) / 1000
    pixel_mm2 = vol.spacing_mm[1] * vol.spacing_mm[2]
    for run in runs:
        prob = np.load(Path(run) / f"{case}_prob.npz")["prob"]
        mask = (prob > 127) & (lung > 0)
        lab, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        sizes = np.bincount(lab.ravel())[1:] * voxel_ml
        for min_ml in (0, 0.05, 0.1, 0.2, 0.5, 1.0):
            keep = np.concatenate([[False], sizes >= min_ml])
            m = keep[lab]
            area = m.sum(axis=(1, 2)) * pixel_mm2
            for a in (20, 100):
                s = slice_flag_scores(area, truth, a)
                rows.setdefault((run, min_ml, a), {})[case] = (
                    s["sensitivity"],
                    s["specificity"],
                    float(m.sum() * voxel_ml),
                )
for (run, min_ml, a), cases in rows.items():
    cells = "  ".join(
        f"{c}: {'-' if se is None else f'{se:.2f}'}/{sp:.2f} {ml:6.1f}mL" for c, (se, sp, ml) in cases.items()
    )
    print(f"{Path(run).name:16s} min {min_ml:4.2f} mL  A {a:3d}  {cells}")
