"""Severity from per-slice infection counts: percent infected, MosMed class, zones, per-slice flags.

Everything here works on the output of :func:`covfast.ops.infection_ratio` (per-slice voxel counts per lung and
per class), so it never touches the full volume again.

Rules (documented in the README and recorded in ``report.json``):

* **Volumetric percent infected** = infected lung volume / lung volume x 100, with volumes from voxel counts times
  the voxel volume (spacing-aware). Only infection inside the lung mask counts.
* **Mean of slices** (Qiblawey et al.): the mean over lung-bearing slices of the per-slice percentage
  infected area / lung area. Slices whose lung area is below ``min_slice_lung_mm2`` (default 100 mm^2, the lung
  apices and bases where a few voxels would dominate a ratio) are left out of this mean.
* **MosMed class** from the volumetric percentage: CT0 no infection, CT1 < 25 %, CT2 25 to < 50 %,
  CT3 50 to < 75 %, CT4 >= 75 %. "No infection" means infected volume below ``min_lesion_ml``
  (default 0.5 mL, the volume of a 1 cm sphere, about the smallest lesion a reader grades; smaller totals are
  within the noise of a segmentation network's boundary).
* **Zones**: each lung's cranio-caudal extent (the slices where that lung is present) is cut into equal
  thirds: lower, middle, upper. Each zone gets percent involvement and a 0-5 score
  (0: none, 1: < 5 %, 2: 5-25 %, 3: 25-50 %, 4: 50-75 %, 5: >= 75 %), summed over the six zones into a 0-30 zone
  CT severity score. This is an approximation of lobe-based scores (e.g. the 25-point score over five
  lobes): lobes are not thirds of a lung, so it correlates with, but does not equal, a lobar reading.
* **COVID-positive slice** (Qiblawey's slice rule): a slice is positive when its infected area (voxels with
  p > threshold inside the lung) is at least ``min_lesion_area_mm2`` (default 100 mm^2, a disc of 11 mm
  diameter: smaller specks are mostly vessel partial volume, boundary noise and the edges of lesions that a reader
  does not mark). Session 12 moved it from 20 mm^2: against the radiologists' slice labels of the three COVID-CT-MD
  volumes, 100 mm^2 keeps every slice sensitivity (P001 0.99, cap001 1.00) and raises every specificity (P001
  0.85 -> 0.86, cap001 0.40 -> 0.45, normal001 0.87 -> 0.94), and the diagnosis cascade that reads it gains slice
  macro-F1 for each of three affinity-head seeds (training/RESULTS.md, "Session 12").
* **Small components** (network segmentations only, not a mask passed with ``--infection-mask``): 3D
  26-connected infection components under ``min_component_ml`` (default 0.2 mL, a sphere of 7 mm diameter) are
  removed from the masks and the probability map before anything is counted. On the three COVID-CT-MD volumes (with
  the earlier v2 Inf-Net) this raised the slice specificity of the normal case from 0.68 to 0.80 (slices with >= 20 mm^2 flagged) and the CAP
  case's from 0.26 to 0.32 for 0.03 of the COVID case's slice sensitivity (training/RESULTS.md).
* **Dome caps** (network segmentations only): components resting on the diaphragm's domes rather than on lung
  (``dome_cap_support``, :func:`covfast.pipeline.infection.drop_dome_caps`) are removed the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A voxel of a single-class infection probability map is infected above this (the published Inf-Net threshold).
PROBABILITY_THRESHOLD = 0.5
MOSMED_BOUNDS = (25.0, 50.0, 75.0)
ZONE_NAMES = ("lower", "middle", "upper")
ZONE_SCORE_BOUNDS = (5.0, 25.0, 50.0, 75.0)
LUNG_NAMES = ("right", "left")


@dataclass(frozen=True)
class SeverityRules:
    """Thresholds of the severity rules (see the module docstring)."""

    min_lesion_ml: float = 0.5
    min_lesion_area_mm2: float = 100.0
    min_slice_lung_mm2: float = 100.0
    min_component_ml: float = 0.2
    dome_cap_support: float | None = 0.6

    def describe(self) -> dict:
        return {
            "percent_infected": "infected lung volume / lung volume x 100 (only infection inside the lung mask)",
            "mosmed": "CT0: infected volume < min_lesion_ml; CT1 < 25 %; CT2 25 to < 50 %; CT3 50 to < 75 %; "
            "CT4 >= 75 % of lung volume infected",
            "min_lesion_ml": self.min_lesion_ml,
            "covid_positive_slice": "infected area inside the lung >= min_lesion_area_mm2",
            "min_lesion_area_mm2": self.min_lesion_area_mm2,
            "mean_of_slices": "mean of per-slice infected/lung area over slices with lung area >= min_slice_lung_mm2",
            "min_slice_lung_mm2": self.min_slice_lung_mm2,
            "small_components": "3D 26-connected components of the network's infection mask under min_component_ml "
            "are removed before counting (not applied to a mask given with --infection-mask)",
            "min_component_ml": self.min_component_ml,
            "dome_caps": "3D 26-connected components of the network's infection mask whose lower surface rests, for "
            "more than dome_cap_support of it, on holes of the lung mask in the slice below (the diaphragm's domes, "
            "which the lung mask leaves out) are removed before counting: the partial-volume cap of a dome looks "
            "like ground glass (not applied to a mask given with --infection-mask; null: off)",
            "dome_cap_support": self.dome_cap_support,
            "zones": "each lung's slice extent cut into lower/middle/upper thirds; zone score 0-5 "
            "(0 none, 1 <5 %, 2 5-25 %, 3 25-50 %, 4 50-75 %, 5 >=75 %); zone CT score = sum over 6 zones (0-30), "
            "an approximation of lobe-based scores",
        }


DEFAULT_RULES = SeverityRules()


def mosmed_class(percent: float | None, infected_ml: float, rules: SeverityRules = DEFAULT_RULES) -> str | None:
    """MosMed CT0-CT4 class of a volumetric percentage of infected lung.

    Args:
        percent: infected lung volume / lung volume x 100, or None when unknown.
        infected_ml: infected lung volume in mL (below ``rules.min_lesion_ml`` counts as no infection).
    """
    if percent is None or not math.isfinite(percent):
        return None
    if infected_ml < rules.min_lesion_ml:
        return "CT0"
    return f"CT{1 + int(np.searchsorted(MOSMED_BOUNDS, percent, side='right'))}"


def zone_score(percent: float) -> int:
    """0-5 involvement score of one zone from its percent infected."""
    if percent <= 0.0:
        return 0
    return 1 + int(np.searchsorted(ZONE_SCORE_BOUNDS, percent, side="right"))


def _zones_of_lung(lung_voxels: np.ndarray, infected_voxels: np.ndarray) -> list[dict]:
    """Involvement of the lower / middle / upper thirds of one lung.

    Args:
        lung_voxels: [D] int64 lung voxels of this lung per slice (slices inferior -> superior).
        infected_voxels: [D] int64 infected voxels of this lung per slice.
    """
    present = np.flatnonzero(lung_voxels > 0)
    zones = []
    if present.size == 0:
        return [{"zone": name, "slices": [None, None], "percent_infected": None, "score": 0} for name in ZONE_NAMES]
    first, last = int(present[0]), int(present[-1]) + 1
    edges = np.linspace(first, last, 4).round().astype(int)
    for name, lo, hi in zip(ZONE_NAMES, edges[:-1], edges[1:]):
        lung = int(lung_voxels[lo:hi].sum())
        infected = int(infected_voxels[lo:hi].sum())
        percent = 100.0 * infected / lung if lung else 0.0
        zones.append(
            {"zone": name, "slices": [int(lo), int(hi) - 1], "percent_infected": percent, "score": zone_score(percent)}
        )
    return zones


def summarize(
    lung_voxels: np.ndarray,
    infected_voxels: np.ndarray | None,
    spacing_mm: tuple[float, float, float],
    z_mm: np.ndarray,
    multiclass: bool,
    rules: SeverityRules = DEFAULT_RULES,
) -> dict:
    """Turn per-slice counts into the severity part of the report.

    Args:
        lung_voxels: [D, 2] int64 lung voxels per slice for (right, left), from ``infection_ratio``.
        infected_voxels: [D, 2, 2] int64 infected voxels per slice, lung (right, left) x class (1, 2); None when no
            infection segmentation is available (then every infection figure is None).
        spacing_mm: (d, h, w) voxel size in mm.
        z_mm: [D] slice positions along the body axis in mm.
        multiclass: whether class 2 (consolidation) is meaningful; otherwise class 1 is "infected".
        rules: thresholds, see the module docstring.

    Returns:
        dict with ``lung_volume_ml``, ``infected_volume_ml``, ``percent_infected``, ``severity``, ``zones``,
        ``zone_ct_score`` and ``slices`` (list of per-slice dicts), as in report.json.
    """
    lung_voxels = np.asarray(lung_voxels, dtype=np.int64)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    pixel_mm2 = float(spacing_mm[1] * spacing_mm[2])
    lung_ml = lung_voxels.sum(axis=0) * voxel_ml
    lung_total_ml = float(lung_ml.sum())
    out: dict = {
        "lung_volume_ml": {"right": float(lung_ml[0]), "left": float(lung_ml[1]), "total": lung_total_ml},
    }
    lung_area = lung_voxels.sum(axis=1) * pixel_mm2
    if infected_voxels is None:
        out["infected_volume_ml"] = {"total": None, "ggo": None, "consolidation": None}
        out["percent_infected"] = {"volumetric": None, "mean_of_slices": None}
        out["severity"] = {"ct_class": None, "rule": "no infection segmentation available"}
        out["zones"] = None
        out["zone_ct_score"] = None
        out["slices"] = [
            {
                "index": i,
                "z_mm": float(z_mm[i]),
                "lung_area_mm2": float(lung_area[i]),
                "infected_area_mm2": None,
                "ratio": None,
                "covid_positive": None,
            }
            for i in range(lung_voxels.shape[0])
        ]
        return out

    infected_voxels = np.asarray(infected_voxels, dtype=np.int64)
    per_class_ml = infected_voxels.sum(axis=(0, 1)) * voxel_ml
    infected_total_ml = float(per_class_ml.sum())
    out["infected_volume_ml"] = {
        "total": infected_total_ml,
        "ggo": float(per_class_ml[0]) if multiclass else None,
        "consolidation": float(per_class_ml[1]) if multiclass else None,
    }
    volumetric = 100.0 * infected_total_ml / lung_total_ml if lung_total_ml > 0 else None
    infected_area = infected_voxels.sum(axis=(1, 2)) * pixel_mm2
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(lung_area > 0, infected_area / np.maximum(lung_area, 1e-12), np.nan)
    counted = lung_area >= rules.min_slice_lung_mm2
    mean_of_slices = float(100.0 * ratio[counted].mean()) if counted.any() else None
    out["percent_infected"] = {"volumetric": volumetric, "mean_of_slices": mean_of_slices}
    out["severity"] = {
        "ct_class": mosmed_class(volumetric, infected_total_ml, rules),
        "rule": f"MosMed: CT0 none (< {rules.min_lesion_ml:g} mL infected); CT1 < 25 %; CT2 25 to < 50 %; "
        "CT3 50 to < 75 %; CT4 >= 75 % of lung volume infected",
    }
    infected_per_lung = infected_voxels.sum(axis=2)
    zones = {}
    for lung_index, lung_name in enumerate(LUNG_NAMES):
        zones[lung_name] = _zones_of_lung(lung_voxels[:, lung_index], infected_per_lung[:, lung_index])
    for lung_index, lung_name in enumerate(LUNG_NAMES):
        lung = int(lung_voxels[:, lung_index].sum())
        zones[f"{lung_name}_percent_infected"] = (
            100.0 * int(infected_per_lung[:, lung_index].sum()) / lung if lung else None
        )
    out["zones"] = zones
    out["zone_ct_score"] = int(sum(z["score"] for name in LUNG_NAMES for z in zones[name]))
    positive = infected_area >= rules.min_lesion_area_mm2
    out["slices"] = [
        {
            "index": i,
            "z_mm": float(z_mm[i]),
            "lung_area_mm2": float(lung_area[i]),
            "infected_area_mm2": float(infected_area[i]),
            "ratio": None if np.isnan(ratio[i]) else float(ratio[i]),
            "covid_positive": bool(positive[i]),
        }
        for i in range(lung_voxels.shape[0])
    ]
    return out
