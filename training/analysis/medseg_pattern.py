"""Is COVID-19 infection peripheral by covfast's measure? The COVID-SemiSeg slices and their masks.

The diagnosis types an abnormal scan by the infection's peripheral odds ratio (:mod:`covfast.pipeline.distribution`),
measured on covfast's own masks of two COVID-CT-MD patients. This script tests the premise on other COVID-19
patients and on radiologists' masks instead of the network's: the 50 doctor-labelled MedSeg slices (several
patients; the slices carry no patient IDs).

The slices are 8-bit lung-window crops without Hounsfield units, so covfast's lung mask cannot run on them. Here a
lung mask is made from the image: the darker class of an Otsu threshold, opened twice, joined with the
ground-truth infection (dense infected lung is bright), closed three times, components under 3 % of the image
dropped, holes filled; the two largest components are the lungs. The crops are cut at the lung box, so the image
border counts as lung border. The periphery is then :func:`covfast.pipeline.distribution.peripheral_masks`'s outer
third, on the full grid.

    python training/analysis/medseg_pattern.py --json runs/s13/medseg_pattern.json \
        --figure runs/s13/medseg_pattern.jpg

With ``--data .../LungInfection-Train/Pseudo-label`` it reads the 1,600 unlabelled Zenodo slices of 20 series
(18 COVID-19 patients) with their Semi-Inf-Net pseudo labels: a network's masks, like the pipeline's, not a
radiologist's. These slices name their patient, so the ratio is also pooled per patient, as the pipeline pools a
volume.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from covfast.pipeline.distribution import odds_ratio, peripheral_masks

DEFAULT_DATA = Path("../shared/data/infnet-semiseg/TrainingSet/LungInfection-Train/Doctor-label")


def otsu(image: np.ndarray) -> int:
    """Otsu's threshold of an 8-bit image: the grey level t that best splits it into <= t and > t."""
    hist = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    w = np.cumsum(p)
    m = np.cumsum(p * np.arange(256))
    between = (m[-1] * w - m) ** 2 / (w * (1.0 - w) + 1e-12)
    return int(np.argmax(between))


def lung_labels(image: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """[H, W] uint8: 1 and 2 on the two largest lung components of the crop (module docstring), 0 elsewhere."""
    dark = ndimage.binary_opening(image <= otsu(image), iterations=2)
    lung = ndimage.binary_closing(dark | infection, iterations=3)
    labels, count = ndimage.label(lung)
    sizes = ndimage.sum(lung, labels, range(1, count + 1))
    lung = np.isin(labels, [i + 1 for i, s in enumerate(sizes) if s > 0.03 * lung.size])
    labels, count = ndimage.label(ndimage.binary_fill_holes(lung))
    sizes = ndimage.sum(labels > 0, labels, range(1, count + 1))
    out = np.zeros(image.shape, np.uint8)
    for rank, index in enumerate(np.argsort(sizes)[::-1][:2]):
        out[labels == index + 1] = rank + 1
    return out


def patient_of(stem: str) -> str:
    """The patient of a Zenodo slice name: ``coronacases_org_001`` or ``covid-19-pneumonia-10`` (Radiopaedia cases
    with two series, e.g. ``-10_85902_1`` and ``-10_85902_3``, are one patient); MedSeg names carry none."""
    found = re.search(r"(coronacases_org_\d+|covid-19-pneumonia-\d+)", stem)
    return found.group(1) if found else "unknown"


def measure(data: Path) -> list[dict]:
    rows = []
    for path in sorted((data / "Imgs").glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem):
        image = np.asarray(Image.open(path).convert("L"))
        infection = np.asarray(Image.open(data / "GT" / f"{path.stem}.png").convert("L")) > 127
        lungs = lung_labels(image, infection)
        # One pixel of non-lung around the crop: its border is the lung's.
        outer = peripheral_masks(np.pad(lungs, 1), (1.0, 1.0))[1:-1, 1:-1]
        lung = lungs > 0
        sick = infection & lung
        counts = {"lung": int(lung.sum()), "outer": int(outer.sum()), "sick": int(sick.sum()),
                  "sick_outer": int((sick & outer).sum())}
        rows.append({
            "slice": path.stem,
            "patient": patient_of(path.stem),
            **counts,
            "infected_fraction": counts["sick"] / max(counts["lung"], 1),
            "odds_ratio": odds_ratio(counts["sick"], counts["sick_outer"], counts["lung"], counts["outer"])
            if counts["sick"] else None,
            "_arrays": (image, lung, outer, sick),
        })
    return rows


def figure(rows: list[dict], path: Path, n: int = 12, tile: int = 160) -> None:
    """The first ``n`` slices: inner two thirds of the lung tinted blue, the outer third untinted, infection red."""
    tiles = []
    for row in rows[:n]:
        image, lung, outer, sick = row["_arrays"]
        rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
        inner = lung & ~outer
        rgb[inner] = rgb[inner] * 0.6 + np.array([0, 0, 120]) * 0.4
        rgb[sick] = rgb[sick] * 0.4 + np.array([255, 0, 0]) * 0.6
        tiles.append(np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize((tile, tile))))
    per_row = 6
    grid = [np.concatenate(tiles[i : i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    Image.fromarray(np.concatenate(grid, axis=0)).save(path, quality=85)  # .jpg: photographic, small


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a COVID-SemiSeg folder with Imgs/ and GT/ (default: the 50 doctor-labelled slices; "
                        "the Pseudo-label folder gives the 1,600 Zenodo slices with Semi-Inf-Net's predictions, "
                        "pooled per patient)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args(argv)
    rows = measure(args.data)
    scored = [r for r in rows if r["odds_ratio"] is not None]
    ratios = np.array([r["odds_ratio"] for r in scored])
    total = {key: sum(r[key] for r in scored) for key in ("lung", "outer", "sick", "sick_outer")}
    pooled = odds_ratio(total["sick"], total["sick_outer"], total["lung"], total["outer"])
    result = {
        "command": "python training/analysis/medseg_pattern.py",
        "slices": len(scored),
        "median_odds_ratio": float(np.median(ratios)),
        "share_odds_ratio_at_least_1": float((ratios >= 1).mean()),
        "pooled": {"lesion_peripheral_fraction": total["sick_outer"] / total["sick"],
                   "lung_peripheral_fraction": total["outer"] / total["lung"], "odds_ratio": pooled},
        "by_extent": {},
        "per_slice": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    # Diffuse disease fills the lung and pulls the ratio towards 1: split by the slice's infected fraction.
    for name, lo, hi in (("under 10 %", 0.0, 0.1), ("10-30 %", 0.1, 0.3), ("30 % or more", 0.3, 1.01)):
        part = [r["odds_ratio"] for r in scored if lo <= r["infected_fraction"] < hi]
        result["by_extent"][name] = {
            "slices": len(part),
            "median_odds_ratio": float(np.median(part)) if part else None,
            "share_odds_ratio_at_least_1": float(np.mean(np.array(part) >= 1)) if part else None,
        }
    patients = sorted({r["patient"] for r in rows} - {"unknown"})
    if patients:
        result["patients"] = {}
        for patient in patients:
            mine = [r for r in rows if r["patient"] == patient]
            t = {key: sum(r[key] for r in mine) for key in ("lung", "outer", "sick", "sick_outer")}
            result["patients"][patient] = {
                "slices": len(mine),
                "infected_fraction": t["sick"] / max(t["lung"], 1),
                "odds_ratio": odds_ratio(t["sick"], t["sick_outer"], t["lung"], t["outer"]) if t["sick"] else None,
            }
        per_patient = [p["odds_ratio"] for p in result["patients"].values() if p["odds_ratio"] is not None]
        result["patients_odds_ratio_at_least_1"] = f"{sum(r >= 1 for r in per_patient)} of {len(per_patient)}"
        for patient, p in result["patients"].items():
            print(f"  {patient}: {p['slices']} slices, infected {100 * p['infected_fraction']:.1f} % of the lung, "
                  f"OR {p['odds_ratio']}")
        print(f"patients with OR >= 1: {result['patients_odds_ratio_at_least_1']}")
    print(f"{len(scored)} slices: median odds ratio {result['median_odds_ratio']:.2f}, "
          f"{100 * result['share_odds_ratio_at_least_1']:.0f} % with OR >= 1; pooled: lesion peripheral fraction "
          f"{result['pooled']['lesion_peripheral_fraction']:.3f} against the lung's "
          f"{result['pooled']['lung_peripheral_fraction']:.3f}, OR {pooled:.2f}")
    for name, part in result["by_extent"].items():
        print(f"  infected fraction {name}: {part}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        figure(rows, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
