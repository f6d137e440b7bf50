"""Where in the lungs the infection lies: peripheral (subpleural) predominance and laterality.

Radiology reads the *distribution* of opacities as much as their amount. The RSNA consensus statement on COVID-19
CT reporting (Simpson et al., Radiology: Cardiothoracic Imaging 2020) calls peripheral, bilateral ground glass the
typical appearance of COVID-19 pneumonia, and lobar or segmental consolidation, centrilobular nodules and a
perihilar or unilateral distribution atypical or indeterminate; comparative series (e.g. Bai et al., Radiology 2020)
found a peripheral distribution markedly more often in COVID-19 than in other pneumonias. This module measures the
first of those features on covfast's masks, so the report can state it and the diagnosis can use it.

Peripheral = the outer third of each lung, per axial slice: for every lung (right, left) on a slice, the in-plane
distance of each lung voxel to the nearest non-lung voxel (``scipy.ndimage.distance_transform_edt`` with the pixel
spacing), divided by that lung's largest distance on the slice; voxels with a relative depth <= 1/3 are peripheral.
Both are measured on every second row and column of the slice. The lung itself has about half its area there (0.51 on the three COVID-CT-MD volumes), so the lesions' share alone
says little; the report compares the two with an odds ratio:

    OR = [f / (1 - f)] / [b / (1 - b)]

with f the infected voxels' peripheral fraction and b the lung voxels' (all lung slices); the odds add 0.5 to both
voxel counts (Haldane), so a wholly peripheral infection has a finite ratio. How firmly a scan sits on one side of 1
depends on how many lesions carry it: ``peripheral_odds_ratio_interval`` is a 95 % bootstrap interval over the 3D
lesions (resampled with replacement; the voxels of one lesion are not independent). OR > 1: the infection
favours the periphery more than the lung's own shape does ("peripheral"); OR < 1: it favours the inner lung
("central"). OR = 1 is the no-preference point; no threshold is fitted.

Measured on the shipped segmentation (``training/RESULTS.md``, "Session 13"): COVID-19 P001 OR 1.50 (f 0.61), the
community-acquired pneumonia cap001 OR 0.89 (f 0.48); per slice, the peripheral share separates P001's from
cap001's radiologist-labelled infected slices with an AUC of 0.69. Two patients are an anecdote, not a validation;
the feature is reported for what radiology already knows it means.
"""

from __future__ import annotations

import numpy as np

OUTER_FRACTION = 1.0 / 3.0
GRID_STEP = 2
BOOTSTRAP_RESAMPLES = 2000
MIN_BOOTSTRAP_LESIONS = 5
LUNG_LABELS = {"right": 1, "left": 2}
DISTRIBUTION_RULE = (
    "peripheral = the outer third of each lung per axial slice (in-plane distance to the lung border / the lung's "
    "largest on that slice <= 1/3); peripheral_odds_ratio = odds of an infected voxel being peripheral / odds of a "
    "lung voxel being peripheral (all lung slices), with a 95 % bootstrap interval over the 3D lesions; pattern "
    "'peripheral' when the odds ratio >= 1, else 'central'; "
    "bilateral when each lung holds at least min_lesion_ml of infection"
)


def _bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def peripheral_masks(lung_slice: np.ndarray, pixel_mm: tuple[float, float]) -> np.ndarray:
    """[H, W] bool: the voxels of each lung (labels 1 and 2) in that lung's outer third on this slice."""
    from scipy import ndimage

    out = np.zeros(lung_slice.shape, dtype=bool)
    for label in LUNG_LABELS.values():
        side = lung_slice == label
        if not side.any():
            continue
        box = _bbox(side)
        crop = side[box]
        depth = ndimage.distance_transform_edt(crop, sampling=pixel_mm)
        out[box] |= crop & (depth <= OUTER_FRACTION * depth.max())
    return out


def odds_ratio(sick, sick_outer, lung, lung_outer):
    """Peripheral odds ratio from voxel counts (numbers or arrays): the odds of an infected voxel being peripheral
    over the odds of a lung voxel being peripheral, with Haldane's 0.5 added to every count so that an all-peripheral
    infection stays finite."""
    return ((sick_outer + 0.5) / (sick - sick_outer + 0.5)) / ((lung_outer + 0.5) / (lung - lung_outer + 0.5))


def peripheral_grid(lung: np.ndarray, infected: np.ndarray, spacing_mm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masks the fractions are counted on, every :data:`GRID_STEP`-th row and column of each slice (a quarter of
    the distance transforms' work at step 2; the outer third of a lung is tens of pixels deep).

    Returns:
        (lung, sick, outer): [D, H', W'] lung labels, infected lung voxels, and the lungs' outer thirds.
    """
    step = GRID_STEP
    pixel_mm = (float(spacing_mm[1]) * step, float(spacing_mm[2]) * step)
    lung_grid = np.asarray(lung)[:, ::step, ::step]
    sick = (np.asarray(infected)[:, ::step, ::step] != 0) & (lung_grid > 0)
    outer = np.zeros(sick.shape, dtype=bool)
    for z in np.flatnonzero(lung_grid.reshape(lung_grid.shape[0], -1).any(axis=1)):
        outer[z] = peripheral_masks(lung_grid[z], pixel_mm)
    return lung_grid, sick, outer


def lesion_distribution(
    lung: np.ndarray,
    infected: np.ndarray | None,
    spacing_mm,
    min_lesion_ml: float = 0.5,
    infected_voxels_per_lung: tuple[int, int] | None = None,
) -> dict | None:
    """Peripheral predominance and laterality of the infection (module docstring).

    Args:
        lung: [D, H, W] uint8 lung mask, 0 background, 1 right lung, 2 left lung.
        infected: [D, H, W] infection mask (non-zero = infected; any class), or None when there is none.
        spacing_mm: (dz, dy, dx) voxel spacing in mm.
        min_lesion_ml: least infected volume of a lung for it to count as involved (``bilateral``).
        infected_voxels_per_lung: (right, left) infected voxels inside each lung when already counted (the pipeline
            passes the reduction's); otherwise they are counted here on the full grid.

    Returns:
        None without an infection mask; otherwise ``{"peripheral_fraction", "lung_peripheral_fraction",
        "peripheral_odds_ratio", "peripheral_odds_ratio_interval", "lesions_counted", "pattern", "bilateral",
        "right_share", "rule"}``; the fractions, odds ratio, its interval, pattern and share are None when no
        infected voxel lies inside the lung (the interval also below five lesions).
    """
    if infected is None:
        return None
    lung = np.asarray(lung)
    if lung.shape != np.shape(infected) or lung.ndim != 3:
        raise ValueError(f"lung and infected must be [D, H, W] of one shape, got {lung.shape} and {np.shape(infected)}")
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    if infected_voxels_per_lung is None:
        counts = np.bincount(lung[(np.asarray(infected) != 0) & (lung > 0)].ravel(), minlength=3)
        infected_voxels_per_lung = (int(counts[LUNG_LABELS["right"]]), int(counts[LUNG_LABELS["left"]]))
    per_side = dict(zip(LUNG_LABELS, map(int, infected_voxels_per_lung)))
    # The fractions on the coarser grid, the per-lung volumes (above) on the full one.
    lung_grid, sick_grid, outer_grid = peripheral_grid(lung, infected, spacing_mm)
    lung_all, lung_outer = int(np.count_nonzero(lung_grid)), int(outer_grid.sum())
    inf_all, inf_outer = int(sick_grid.sum()), int((sick_grid & outer_grid).sum())
    out = {
        "peripheral_fraction": None,
        "lung_peripheral_fraction": lung_outer / lung_all if lung_all else None,
        "peripheral_odds_ratio": None,
        "peripheral_odds_ratio_interval": None,
        "lesions_counted": None,
        "pattern": None,
        "bilateral": all(v * voxel_ml >= min_lesion_ml for v in per_side.values()),
        "right_share": None,
        "rule": DISTRIBUTION_RULE,
    }
    if inf_all and lung_all:
        ratio = float(odds_ratio(inf_all, inf_outer, lung_all, lung_outer))
        out.update(
            peripheral_fraction=inf_outer / inf_all,
            peripheral_odds_ratio=ratio,
            pattern="peripheral" if ratio >= 1.0 else "central",
            right_share=per_side["right"] / max(sum(per_side.values()), 1),
        )
        interval, lesions = _lesion_bootstrap(sick_grid, outer_grid, lung_outer, lung_all)
        out.update(peripheral_odds_ratio_interval=interval, lesions_counted=lesions)
    return out


def _lesion_bootstrap(sick: np.ndarray, outer: np.ndarray, lung_outer: int, lung_all: int) -> tuple[list | None, int]:
    """95 % interval of the peripheral odds ratio over lesions: the 3D lesions (26-connected components of the
    infected grid) are resampled with replacement :data:`BOOTSTRAP_RESAMPLES` times (fixed seed) and the ratio
    recomputed from their voxel counts; the lung side is held fixed. Voxels of one lesion are not independent, so the
    lesion, not the voxel, is the unit. None below :data:`MIN_BOOTSTRAP_LESIONS` lesions."""
    import cc3d

    labels = cc3d.connected_components(np.ascontiguousarray(sick), connectivity=26)
    # Count on the infected voxels only (a few percent of the grid).
    mine = labels[sick]
    sizes = np.bincount(mine)[1:].astype(np.float64)  # labels run 1..N without gaps: every size > 0
    peripheral = np.bincount(mine, weights=outer[sick].astype(np.float64))[1:]
    if sizes.size < MIN_BOOTSTRAP_LESIONS:
        return None, int(sizes.size)
    rng = np.random.default_rng(0)
    draws = rng.multinomial(sizes.size, np.full(sizes.size, 1.0 / sizes.size), size=BOOTSTRAP_RESAMPLES)
    ratios = odds_ratio(draws @ sizes, draws @ peripheral, lung_all, lung_outer)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return [float(low), float(high)], int(sizes.size)


def pattern_phrase(report: dict) -> str:
    """"bilateral peripheral", "unilateral central" and the like for a report with at least the diagnosis's 10 mL of
    infection, else "" (below it the few voxels found are mostly false positives and their distribution means
    nothing)."""
    from covfast.pipeline.diagnosis import MIN_INFECTED_ML

    dist = report.get("distribution") or {}
    infected = (report.get("infected_volume_ml") or {}).get("total")
    if not dist.get("pattern") or infected is None or infected < MIN_INFECTED_ML:
        return ""
    return f"{'bilateral' if dist['bilateral'] else 'unilateral'} {dist['pattern']}"
