"""How the infection's peripheral predominance separates the COVID-CT-MD patients (issue 5, session 13).

For each ``covfast infer`` output folder of a COVID-CT-MD volume, reads the written lung and infection masks back
onto the volume's canonical grid and reports:

* the volume's ``distribution`` as :func:`covfast.pipeline.distribution.lesion_distribution` computes it (the same
  numbers as the report's), and
* per slice, the peripheral odds ratio of the slice's infection (its share in the outer third of its lung against
  the lung's share on that slice), on the radiologist-labelled infected slices that hold at least the
  COVID-positive area; with ``--auc A B`` the AUC with which it ranks patient A's slices above patient B's.

    covfast infer ../shared/data/covid-ct-md/{P001,cap001,normal001} -o runs/s13/reports -q --device cpu
    python training/analysis/pattern_check.py runs/s13/reports/{P001,cap001,normal001} --auc P001 cap001 \
        --json runs/s13/pattern_check.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from covfast.io import load_volume
from covfast.io.nifti import load_mask_like
from covfast.pipeline import distribution
from covfast.pipeline.distribution import lesion_distribution, odds_ratio, peripheral_grid
from covfast.pipeline.severity import DEFAULT_RULES
from training.ctmd import labels_at


def auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a value of ``high`` > one of ``low``), ties counted half."""
    high, low = np.asarray(high, float)[:, None], np.asarray(low, float)[None, :]
    return float((high > low).mean() + 0.5 * (high == low).mean())


def slice_odds_ratios(lung: np.ndarray, infected: np.ndarray, spacing_mm) -> np.ndarray:
    """[D] peripheral odds ratio of each slice's infection against that slice's lung (NaN where the slice has no
    infected lung voxel), on the pipeline's grid."""
    lung_grid, sick, outer = peripheral_grid(lung, infected, spacing_mm)
    n_lung, n_outer = (lung_grid > 0).sum(axis=(1, 2)), outer.sum(axis=(1, 2))
    n_sick, n_sick_outer = sick.sum(axis=(1, 2)), (sick & outer).sum(axis=(1, 2))
    ratios = odds_ratio(n_sick, n_sick_outer, n_lung, n_outer).astype(np.float64)
    return np.where(n_sick > 0, ratios, np.nan)


def check(folder: Path, labels: dict, area_mm2: float) -> dict:
    report = json.loads((folder / "report.json").read_text())
    volume = load_volume(report["input"]["path"])
    lung = load_mask_like(folder / "lung_mask.nii.gz", volume)
    infected = load_mask_like(folder / "infection_mask.nii.gz", volume)
    dist = lesion_distribution(lung, infected, volume.spacing_mm, DEFAULT_RULES.min_lesion_ml)
    z_mm = np.array([entry["z_mm"] for entry in report["slices"]], dtype=np.float64)
    areas = np.array([entry["infected_area_mm2"] for entry in report["slices"]], dtype=np.float64)
    case = Path(report["input"]["path"]).name
    marked = labels_at(labels[case], z_mm) if case in labels else np.zeros(len(z_mm), bool)
    ratios = slice_odds_ratios(lung, infected, volume.spacing_mm)
    scored = marked & (areas >= area_mm2) & np.isfinite(ratios)
    return {
        "case": case,
        "infected_ml": report["infected_volume_ml"]["total"],
        "distribution": {k: v for k, v in dist.items() if k != "rule"},
        "report_matches": distribution.OUTER_FRACTION == 1 / 3 and dist["peripheral_odds_ratio"] == (report.get("distribution") or {}).get(
            "peripheral_odds_ratio"),
        "labelled_slices_scored": int(scored.sum()),
        "slice_odds_ratio_median": float(np.median(ratios[scored])) if scored.any() else None,
        "slice_odds_ratio_above_1": float((ratios[scored] >= 1).mean()) if scored.any() else None,
        "slice_odds_ratios": ratios[scored].tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="covfast infer output folders of COVID-CT-MD volumes")
    parser.add_argument("--labels", type=Path, default=Path("../shared/data/covid-ct-md/labels.json"))
    parser.add_argument("--area", type=float, default=DEFAULT_RULES.min_lesion_area_mm2)
    parser.add_argument("--auc", nargs=2, metavar=("HIGH", "LOW"))
    parser.add_argument("--outer", type=float, default=distribution.OUTER_FRACTION,
                        help="relative depth of the periphery (default: the pipeline's 1/3), to check other cuts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    labels = json.loads(args.labels.read_text())
    distribution.OUTER_FRACTION = args.outer
    results = {}
    for folder in args.folders:
        r = check(folder, labels, args.area)
        results[r["case"]] = r
        d = r["distribution"]
        print(f"{r['case']}: infected {r['infected_ml']:.1f} mL, peripheral fraction {d['peripheral_fraction']:.3f} "
              f"(lung {d['lung_peripheral_fraction']:.3f}), odds ratio {d['peripheral_odds_ratio']:.3f}, "
              f"{d['pattern']}, bilateral {d['bilateral']}; as in the report: {r['report_matches']}; labelled infected "
              f"slices >= {args.area:g} mm^2: {r['labelled_slices_scored']}, median slice odds ratio "
              f"{r['slice_odds_ratio_median']}, share >= 1: {r['slice_odds_ratio_above_1']}")
    out = {"command": "python training/analysis/pattern_check.py " + " ".join(map(str, args.folders)),
           "area_mm2": args.area, "outer_fraction": args.outer, "volumes": results}
    if args.auc:
        high, low = args.auc
        out["auc"] = {"high": high, "low": low, "value": auc(results[high]["slice_odds_ratios"],
                                                             results[low]["slice_odds_ratios"])}
        print(f"slice odds ratio AUC, {high} above {low}: {out['auc']['value']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
