"""Stage 1: lung mask with right/left labels from a chest CT volume in Hounsfield units.

A classical, model-free segmentation tuned to be fast on a CPU (well under a second for a
512 x 512 x 148 volume on two cores) while keeping dense, consolidated and ground-glass lung inside
the mask, which a plain air threshold would leave out and so understate the infected fraction:

1. Work on an in-plane subsampled grid (about 1.25 mm) and upsample the labels at the end.
2. Air (HU below ``air_threshold_hu``) split into 3D components; components touching the in-plane
   border are outside air (around the body, under the table) and dropped.
3. The largest remaining component holds the lungs, the bronchial tree and the trachea. The trachea
   and the extrapulmonary main bronchi are tracked slice by slice from the top, starting from a small
   air disc near the midline, and removed; this disconnects the two lungs unless they touch.
4. The lungs are the remaining large components lying mostly in the thorax (bowel and stomach gas
   lie below them). Two components are labelled by their side; a single one spanning both sides
   (lungs touching at the anterior or posterior junction) is cut per slice along the valley of its
   column profile near the midline.
5. Dense lung is recovered per lung and per axial slice: a morphological closing with a large,
   nearly round structuring element (``closing_radius_mm``) fills subpleural and perihilar
   concavities left by consolidation (bone excluded), hole filling adds vessels, nodules and
   lesions enclosed by aerated lung, and shallow posterior convex-hull pockets (at most
   ``pocket_depth_mm`` deep) add dependent consolidation lying in a band along the chest wall.

Orientation is the pipeline's canonical one: D = slices inferior -> superior, H = rows
anterior -> posterior, W = columns patient right -> patient left (right lung at low W).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import cc3d
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from covfast.pipeline import morphology

BACKGROUND, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2

# In-plane connectivity only: a slice's holes and components must not leak through neighbouring slices.
_SLICE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_SLICE_CROSS[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def lung_mask(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    air_threshold_hu: float = -320.0,
    work_spacing_mm: float = 1.25,
    closing_radius_mm: float = 12.0,
    pocket_depth_mm: float = 20.0,
    bone_threshold_hu: float = 200.0,
    trachea_max_area_mm2: float = 700.0,
    trachea_max_offset_mm: float = 20.0,
    min_lung_volume_ml: float = 30.0,
    min_second_lung_fraction: float = 0.05,
    device: str = "cpu",
) -> np.ndarray:
    """Segment the lungs and label them right (1) and left (2).

    Args:
        hu: [D, H, W] int16 or float32 Hounsfield units in canonical orientation (D inferior -> superior,
            H anterior -> posterior, W patient right -> patient left).
        spacing_mm: (d, h, w) voxel spacing in millimetres.
        air_threshold_hu: voxels below this are aerated (lung parenchyma is about -850 HU, soft tissue
            about +40 HU; -320 HU separates them with a wide margin for noise and partial volume).
        work_spacing_mm: target in-plane spacing of the working grid; rows and columns are subsampled
            by ``round(work_spacing_mm / spacing)`` (at least 1) and the labels upsampled back.
        closing_radius_mm: radius of the per-slice closing that pulls dense lung (consolidation,
            atelectasis) bordering the pleura or the hilum into the mask. Concavities narrower than
            about twice this are filled; the heart and mediastinum are much wider and stay out.
        pocket_depth_mm: dense lung between the lung and its per-slice convex hull, on the chest-wall side,
            is added when the pocket is at most this deep (the heart and the liver dome are deeper).
        bone_threshold_hu: voxels at or above this are never added by the closing (ribs, spine).
        trachea_max_area_mm2: largest axial cross-section still counted as trachea or main bronchus;
            an adult trachea is about 150-450 mm^2, a 2D air region merging with lung is larger.
        trachea_max_offset_mm: how far from the midline of the air region the trachea may start.
        min_lung_volume_ml: a volume whose largest air component inside the body is smaller has no
            lungs and gets an all-zero mask.
        min_second_lung_fraction: a second component counts as the other lung only if it holds at
            least this fraction of the largest component's volume.
        device: where the large morphological filters run: ``cpu`` (scipy) or a torch device such as ``cuda``
            (:mod:`covfast.pipeline.morphology`; the labels are bit-identical).

    Returns:
        [D, H, W] uint8 labels: 0 background, 1 right lung, 2 left lung.

    Raises:
        ValueError: ``hu`` is not a 3D real array or ``spacing_mm`` is not three positive finite numbers.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D [D, H, W] array, got shape {hu.shape}")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise ValueError(f"hu must hold integer or floating Hounsfield units, got dtype {hu.dtype}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be three positive finite numbers, got {spacing_mm!r}")
    labels_full = np.zeros(hu.shape, dtype=np.uint8)
    if hu.size == 0:
        return labels_full

    step_h = max(1, round(work_spacing_mm / spacing[1]))
    step_w = max(1, round(work_spacing_mm / spacing[2]))
    work_hu = hu[:, ::step_h, ::step_w]
    work_spacing = (spacing[0], spacing[1] * step_h, spacing[2] * step_w)
    voxel_ml = work_spacing[0] * work_spacing[1] * work_spacing[2] / 1000.0

    def air_lungs(inner_air_full: np.ndarray, midline_w: float):
        """(lungs, box, inner air in the box, trachea in the box) from the air enclosed by the body, or None."""
        if not inner_air_full.any():
            return None
        # Everything up to the dense-lung recovery happens inside the air's bounding box (about half the grid):
        # nothing outside it is air, so the results are the same voxel for voxel.
        box = morphology.bounding_box(inner_air_full)
        inner_air = inner_air_full[box]
        # A one-voxel erosion breaks the partial-volume bridges across the diaphragm that join the lung
        # bases to stomach and colon gas; the labels grow back into the full air mask afterwards.
        core_air = ndi.binary_erosion(inner_air, structure=ndi.generate_binary_structure(3, 1))
        # Lungs, bronchi and trachea need not be one component: narrow bronchi may close at this threshold.
        large_air = cc3d.dust(
            core_air, threshold=max(1, int(min_second_lung_fraction * min_lung_volume_ml / voxel_ml)), connectivity=6
        )
        if not large_air.any():
            return None
        trachea = _trachea(large_air, midline_w - box[2].start, work_spacing, trachea_max_area_mm2,
                           trachea_max_offset_mm)
        lungs = _select_lungs(large_air & ~trachea, min_lung_volume_ml / voxel_ml, min_second_lung_fraction,
                              image_centre_w=work_hu.shape[2] / 2 - box[2].start)
        return None if lungs is None else (lungs, box, inner_air, trachea)

    # NaN compares False, so it never counts as air.
    air = work_hu < air_threshold_hu
    found = air_lungs(*_inner_air(air))
    if not _plausible_pair(found, voxel_ml):
        # No pair of lungs of plausible size: a field of view narrower than the chest may have cut a lung at the
        # image's edge, and air touching the edge counts as air around the body. Try again keeping the air that is
        # a cut lung (_cut_lungs); take that result when it holds more lung. Complete scans never get here.
        again = air_lungs(*_inner_air(air, work_spacing))
        if again is not None and np.count_nonzero(again[0]) > (0 if found is None else np.count_nonzero(found[0])):
            found = again
    if found is None:
        return labels_full
    lungs, box, inner_air, trachea = found
    backend = _morphology_backend(device)
    labels = np.zeros(work_hu.shape, dtype=np.uint8)
    labels[box] = _grow_back(lungs, inner_air & ~_dilate_in_box(trachea, 2), backend=backend)
    # The dense lung may reach beyond the air's box: this step runs on the whole grid (in boxes of its own).
    labels = _recover_dense_lung(labels, work_hu, work_spacing, closing_radius_mm, bone_threshold_hu, pocket_depth_mm,
                                 backend=backend)
    _upsample_into(labels, step_h, step_w, labels_full)
    return labels_full


def _morphology_backend(device: str) -> str:
    """scipy on the CPU (faster there than torch's pools on few cores), torch on any other device."""
    return "scipy" if device == "cpu" else device


def _inner_air(air: np.ndarray, spacing: tuple[float, float, float] | None = None) -> tuple[np.ndarray, float]:
    """Air enclosed by the body: drop 3D air components that touch the in-plane border, except lungs cut by the
    image's edge (:func:`_cut_lungs`, when ``spacing`` is given).

    Args:
        air: [D, H, W] bool aerated voxels.
        spacing: (d, h, w) mm of ``air``'s grid; None: every border-touching component is outside air.

    Returns:
        [D, H, W] bool air that does not touch the first/last row or column, or is a cut lung (touching the first or
        last slice is allowed: the lungs and trachea are cut there when the scan does not cover them fully), and the
        body's midline column: the mean column of everything that is not outside air.
    """
    components, count = cc3d.connected_components(air, connectivity=6, return_N=True)
    border_ids = _in_plane_border_ids(components)
    border_ids = border_ids[border_ids != 0]
    if spacing is not None and border_ids.size:
        border_ids = np.setdiff1d(border_ids, _cut_lungs(air, components, border_ids, spacing))
    outside = _members(components, border_ids, count)
    inside_per_column = outside.shape[0] * outside.shape[1] - np.count_nonzero(outside, axis=(0, 1))
    if inside_per_column.sum() == 0:
        midline_w = (air.shape[2] - 1) / 2
    else:
        midline_w = float(np.average(np.arange(air.shape[2]), weights=inside_per_column))
    return (components != 0) & ~outside, midline_w


# Two lungs of plausible size (see _plausible_pair): together at least this much air, the smaller at least this share
# of the larger.
_PLAUSIBLE_LUNGS_ML = 500.0
_PLAUSIBLE_SMALLER_SHARE = 0.15


def _plausible_pair(found, voxel_ml: float) -> bool:
    """Whether the air-stage lungs (``air_lungs``' result in :func:`lung_mask`, or None) are a right and a left lung
    of plausible size: both labels present, the smaller at least :data:`_PLAUSIBLE_SMALLER_SHARE` of the larger, and
    together at least :data:`_PLAUSIBLE_LUNGS_ML` of aerated lung."""
    if found is None:
        return False
    counts = np.bincount(found[0].ravel(), minlength=3)[1:3]
    return bool(counts.min() >= _PLAUSIBLE_SMALLER_SHARE * counts.max() and counts.sum() * voxel_ml >= _PLAUSIBLE_LUNGS_ML)


# A lung cut by a narrow field of view (see _cut_lungs): share of its voxels inside the body's outline, and the
# least in-plane radius it holds somewhere.
_CUT_LUNG_HULL_SHARE = 0.95
_CUT_LUNG_MIN_RADIUS_MM = 15.0
_CUT_LUNG_GRID_MM = 5.0
# Least area of the per-slice holes (vessels) of a cut lung's air relative to the air: cut lungs of the COVID-CT-MD
# volumes 0.012-0.027, air around the body 0.001-0.002 (training/analysis/cut_fov_check.py --hole-shares).
_CUT_LUNG_MIN_HOLE_SHARE = 0.006


def _cut_lungs(air: np.ndarray, components: np.ndarray, border_ids: np.ndarray,
               spacing: tuple[float, float, float]) -> np.ndarray:
    """Labels among ``border_ids`` (air components touching the in-plane border) that are lungs cut by the image's
    edge, not air around the body.

    A field of view narrower than the chest cuts the body, and a lung then reaches the image's edge. Air around the
    body surrounds it; a cut lung still lies between the chest wall's tissue in front of and behind it. So a
    component counts as a cut lung when at least :data:`_CUT_LUNG_HULL_SHARE` of it lies inside the per-slice convex
    hull of the non-air voxels (body, table, clothing) and, unlike the air inside a hollow table or under a blanket,
    it is thick: a square of side 2 x :data:`_CUT_LUNG_MIN_RADIUS_MM` fits in it somewhere in-plane. Both tests run
    on a coarser in-plane grid (about :data:`_CUT_LUNG_GRID_MM`), which is plenty for shapes this large. Last, it
    must hold vessels (:data:`_CUT_LUNG_MIN_HOLE_SHARE`). :func:`lung_mask` asks only when the usual rule found no
    plausible pair of lungs (:func:`_plausible_pair`).
    """
    step_h = max(1, round(_CUT_LUNG_GRID_MM / spacing[1]))
    step_w = max(1, round(_CUT_LUNG_GRID_MM / spacing[2]))
    coarse = components[:, ::step_h, ::step_w]
    count = int(components.max())
    sizes = np.bincount(coarse.ravel(), minlength=count + 1)
    in_hull = np.bincount(coarse[_convex_hull_per_slice(~air[:, ::step_h, ::step_w])], minlength=count + 1)
    side = (max(1, round(2 * _CUT_LUNG_MIN_RADIUS_MM / (spacing[1] * step_h))),
            max(1, round(2 * _CUT_LUNG_MIN_RADIUS_MM / (spacing[2] * step_w))))
    cut = []
    # Too small to hold the square: not a lung (and specks of noise along the edge cost no time below).
    big = sizes[border_ids] >= side[0] * side[1]
    for i in border_ids[big & (in_hull[border_ids] >= _CUT_LUNG_HULL_SHARE * sizes[border_ids])]:
        member = coarse == i
        box = morphology.bounding_box(member)
        if not ndi.minimum_filter(member[box].view(np.uint8), size=(1, *side), mode="constant", cval=0).any():
            continue
        # Lung holds vessels: small islands of tissue that are holes of its air in each slice. Air around the body
        # (under it, beside it, where the body reaches the image's edge too) holds almost none.
        member = components == i
        box = morphology.bounding_box(member)
        air_box = member[box]
        vessels = np.count_nonzero(fill_holes_per_slice(air_box) & ~air_box)
        if vessels >= _CUT_LUNG_MIN_HOLE_SHARE * np.count_nonzero(air_box):
            cut.append(i)
    return np.asarray(cut, dtype=border_ids.dtype)


def _members(labels: np.ndarray, ids, count: int) -> np.ndarray:
    """Bool array: where integer ``labels`` (values 0..``count``) is one of ``ids``; ``np.isin`` by a lookup table."""
    table = np.zeros(count + 1, dtype=bool)
    table[np.asarray(ids, dtype=np.intp)] = True
    return table[labels]


def _in_plane_border_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted unique labels on the first/last row and column of every slice of [D, H, W] ``labels``."""
    return np.unique(
        np.concatenate(
            [
                labels[:, 0, :].ravel(),
                labels[:, -1, :].ravel(),
                labels[:, :, 0].ravel(),
                labels[:, :, -1].ravel(),
            ]
        )
    )


def _trachea(
    air: np.ndarray,
    midline_w: float,
    spacing: tuple[float, float, float],
    max_area_mm2: float,
    max_offset_mm: float,
) -> np.ndarray:
    """Track the trachea and extrapulmonary main bronchi downward from the top of the scan.

    The trachea enters the scan as a small air disc near the midline; going down, it stays a small 2D
    region overlapping the one above, splits at the carina into the main bronchi, and each bronchus
    stops being small where it opens into the lung at the hilum. Apical lung also starts small but lies
    lateral to the midline and never overlaps the tracked airway.

    Args:
        air: [D, H, W] bool large air components inside the body (lungs, bronchi, trachea, bowel gas).
        midline_w: the body's midline column.
        spacing: (d, h, w) spacing of ``air`` in mm.
        max_area_mm2: largest cross-section still counted as airway.
        max_offset_mm: largest distance of the trachea's first disc from the midline.

    Returns:
        [D, H, W] bool trachea and extrapulmonary main bronchi (empty when the scan misses them).
    """
    trachea = np.zeros_like(air)
    pixel_mm2 = spacing[1] * spacing[2]
    max_pixels = max_area_mm2 / pixel_mm2
    occupied = np.flatnonzero(air.any(axis=(1, 2)))
    lowest_start = occupied[0] + (occupied[-1] - occupied[0]) // 2
    above = None
    for z in range(occupied[-1], occupied[0] - 1, -1):
        regions, count = cc3d.connected_components(air[z], connectivity=8, return_N=True)
        if count == 0:
            break
        areas = np.bincount(regions.ravel(), minlength=count + 1)
        if above is None:
            # The seed is the small region closest to the midline, sought only in the upper half.
            if z < lowest_start:
                break
            centers_w = ndi.mean(np.arange(regions.shape[1])[None, :], regions, np.arange(1, count + 1))
            offsets_mm = np.abs(np.asarray(centers_w) - midline_w) * spacing[2]
            small = (areas[1:] <= max_pixels) & (offsets_mm <= max_offset_mm)
            if not small.any():
                continue
            ids = [1 + int(np.argmin(np.where(small, offsets_mm, np.inf)))]
        else:
            ids = [i for i in np.unique(regions[above]) if i and areas[i] <= max_pixels]
            if not ids:
                break
        above = _members(regions, ids, count)
        trachea[z] = above
    return trachea


def _dilate_in_box(mask: np.ndarray, steps: int) -> np.ndarray:
    """[D, H, W] bool 6-connected dilation of ``mask`` by ``steps``, computed only in its bounding box."""
    dilated = np.zeros_like(mask)
    if not mask.any():
        return dilated
    box = tuple(slice(max(0, side.start - steps), side.stop + steps) for side in morphology.bounding_box(mask))
    dilated[box] = ndi.binary_dilation(mask[box], iterations=steps)
    return dilated


def _grow_back(labels: np.ndarray, air: np.ndarray, steps: int = 2, backend: str = "scipy") -> np.ndarray:
    """Grow eroded lung labels back over ``air`` by a few 6-connected steps (where lungs meet, left wins).

    Args:
        labels: [D, H, W] uint8 lung labels on the eroded air.
        air: [D, H, W] bool air the labels may grow into.
        steps: growth steps; one undoes the erosion, a second recovers thin partial-volume rims.
        backend: ``scipy`` or a torch device (:mod:`covfast.pipeline.morphology`).

    Returns:
        [D, H, W] uint8 grown labels.
    """
    for _ in range(steps):
        grown = morphology.cross_dilation(labels, backend)
        labels = np.where(air & (labels == 0), grown, labels)
    return labels


def _select_lungs(candidates: np.ndarray, min_voxels: float, min_second_fraction: float,
                  image_centre_w: float | None = None) -> np.ndarray | None:
    """Pick the lung components and label them right (1) and left (2).

    Args:
        candidates: [D, H, W] bool airway tree without the trachea.
        min_voxels: smallest volume of the largest component, in voxels.
        min_second_fraction: smallest size of the second component relative to the largest.
        image_centre_w: the image's centre column in ``candidates``' columns (it may be a box of the image); None:
            the centre of ``candidates``.

    Returns:
        [D, H, W] uint8 labels, or None when there is no lung.
    """
    components, count = cc3d.largest_k(candidates, k=2, connectivity=6, return_N=True)
    if count == 0:
        return None
    stats = cc3d.statistics(components)
    voxels = stats["voxel_counts"]
    # largest_k does not number the components by size.
    first, second = (1, 2) if count == 1 or voxels[1] >= voxels[2] else (2, 1)
    if voxels[first] < min_voxels:
        return None
    if count == 2 and voxels[second] >= min_second_fraction * voxels[first]:
        # Stomach and bowel gas lie below the lungs; the other lung spans the same heights as the first.
        box = stats["bounding_boxes"][second]
        z_split = max(box[0].start, math.ceil(stats["centroids"][first][0]))
        upper_voxels = np.count_nonzero(components[z_split : box[0].stop, box[1], box[2]] == second)
        if upper_voxels >= 0.25 * voxels[second]:
            right = first if stats["centroids"][first][2] < stats["centroids"][second][2] else second
            labels = np.zeros(components.shape, dtype=np.uint8)
            labels[components == right] = RIGHT_LUNG
            labels[components == (first + second - right)] = LEFT_LUNG
            return labels
    return _split_joined_lungs(components == first, image_centre_w)


# Largest ratio of the lung voxels in the cut columns to the band's per-slice maximum column counts that still counts
# as two lungs touching; a single lung has no valley at its midline (ratio near 1).
_SINGLE_LUNG_VALLEY = 0.25


def _split_joined_lungs(lungs: np.ndarray, image_centre_w: float | None = None) -> np.ndarray:
    """Label one lung component right/left, cutting it per slice where the two lungs touch.

    The two lungs meet only along thin junction lines in front of and behind the mediastinum, so the
    column profile (lung voxels per column) of a slice has its minimum there. The cut is sought within
    a band around the component's midline. A single lung (e.g. after pneumonectomy) has no such valley
    there: when the cut columns hold more than ``_SINGLE_LUNG_VALLEY`` of the band's per-slice maxima (joined
    lungs on real scans: 0.01-0.04), or a side would keep under 5 % of the voxels, it keeps one label.

    Args:
        lungs: [D, H, W] bool a single lung component.
        image_centre_w: the image's centre column in ``lungs``' columns; None: the centre of ``lungs``.

    Returns:
        [D, H, W] uint8 labels 0/1/2.
    """
    width = lungs.shape[2]
    per_column = np.count_nonzero(lungs, axis=(0, 1))
    columns = np.flatnonzero(per_column)
    # The mean column of the lung voxels (an exact integer sum over the count, as the mean of their indices).
    midline = round(float(int(per_column @ np.arange(width)) / int(per_column.sum())))
    half_band = max(1, int(0.15 * (columns[-1] - columns[0] + 1)))
    lo, hi = max(0, midline - half_band), min(width, midline + half_band + 1)
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    profile = lungs[:, :, lo:hi].sum(axis=1)
    # Prefer the lowest count, then the column nearest the midline.
    distance = np.abs(np.arange(lo, hi) - midline)
    cut_in_band = np.argmin(profile * (2 * width) + distance[None, :], axis=1)
    cut = lo + cut_in_band
    valley = profile[np.arange(len(cut)), cut_in_band].sum() / max(1, int(profile.max(axis=1).sum()))
    left_side = np.arange(width)[None, None, :] >= cut[:, None, None]
    labels[lungs] = RIGHT_LUNG
    labels[lungs & left_side] = LEFT_LUNG
    left_fraction = np.count_nonzero(labels == LEFT_LUNG) / np.count_nonzero(lungs)
    if valley > _SINGLE_LUNG_VALLEY or min(left_fraction, 1.0 - left_fraction) < 0.05:
        # Nothing worth a second label: one lung, on the side of the image where it lies.
        centre = width / 2 if image_centre_w is None else image_centre_w
        labels[lungs] = RIGHT_LUNG if midline < centre else LEFT_LUNG
    return labels


def _round_element(radius_h: float, radius_w: float) -> list[tuple[int, int, int]]:
    """Per-slice nearly round structuring element as filter sizes of three centred rectangles.

    The rectangles are inscribed in the ellipse with these radii (corners at 22.5, 45 and 67.5 degrees).
    A union of rectangles keeps every morphological step a separable 1D max/min filter, much faster
    than a disk footprint: dilation by a union is the maximum of the dilations, erosion the minimum.
    """
    sizes = []
    for angle in (math.pi / 8, math.pi / 4, 3 * math.pi / 8):
        half_h = round(radius_h * math.sin(angle))
        half_w = round(radius_w * math.cos(angle))
        sizes.append((1, 2 * half_h + 1, 2 * half_w + 1))
    return sizes


def _round_closing(mask: np.ndarray, radius_h: float, radius_w: float, backend: str = "scipy") -> np.ndarray:
    """Per-slice binary closing of [D, H, W] bool ``mask`` by :func:`_round_element`; radii in rows, columns."""
    return morphology.union_closing(mask, _round_element(radius_h, radius_w), backend)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """[D, H, W] bool ``mask`` with every 2D hole of each axial slice filled.

    A hole is a 4-connected component of a slice's background that does not reach the slice's edge. Slice by slice
    with cc3d's 2D labelling: about 4x faster than one ``ndimage.label`` of the volume with an in-plane structure,
    same result (P001's lung mask, 148 x 512 x 512: 0.075 s against 0.309 s; ``benchmarks/postprocess_speed.py``,
    ``results/postprocess_cpu_2026-11-25.json``).
    """
    filled = np.array(mask, dtype=bool)
    for z in np.flatnonzero(filled.any(axis=(1, 2))):
        background, count = cc3d.connected_components(~filled[z], connectivity=4, return_N=True)
        enclosed = np.ones(count + 1, dtype=bool)
        enclosed[0] = False
        for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
            enclosed[edge] = False
        if enclosed.any():
            filled[z] |= enclosed[background]
    return filled


def _recover_dense_lung(
    labels: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    radius_mm: float,
    bone_threshold_hu: float,
    pocket_depth_mm: float,
    backend: str = "scipy",
) -> np.ndarray:
    """Add consolidated and ground-glass lung that the air threshold left out, lung by lung.

    Args:
        labels: [D, H, W] uint8 aerated lung labels (0/1/2).
        hu: [D, H, W] Hounsfield units on the same grid.
        spacing: (d, h, w) spacing in mm.
        radius_mm: closing radius.
        bone_threshold_hu: the closing never adds voxels at or above this.
        pocket_depth_mm: deepest convex-hull pocket added, see :func:`_wall_pockets`.
        backend: ``scipy`` or a torch device (:mod:`covfast.pipeline.morphology`).

    Returns:
        [D, H, W] uint8 labels including dense lung.
    """
    radius_h, radius_w = radius_mm / spacing[1], radius_mm / spacing[2]
    pad_h = math.ceil(max(radius_mm, pocket_depth_mm) / spacing[1]) + 1
    pad_w = math.ceil(max(radius_mm, pocket_depth_mm) / spacing[2]) + 1

    def grow(label: int):
        """(box, the lung with its dense part inside the box) of one lung, or None without it; reads only
        ``labels`` and ``hu``, so the two lungs can run at once."""
        lung = labels == label
        if not lung.any():
            return None
        zs, ys, xs = (np.flatnonzero(lung.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        box = (
            slice(zs[0], zs[-1] + 1),
            slice(max(0, ys[0] - pad_h), ys[-1] + pad_h + 1),
            slice(max(0, xs[0] - pad_w), xs[-1] + pad_w + 1),
        )
        lung_box = lung[box]
        allowed = (hu[box] < bone_threshold_hu) & (labels[box] == 0)
        grown = fill_holes_per_slice(lung_box | (_round_closing(lung_box, radius_h, radius_w, backend) & allowed))
        # Chebyshev distance is a close enough depth measure here and costs two 1D passes.
        near = morphology.max_filter(
            grown,
            (1, 2 * round(pocket_depth_mm / spacing[1]) + 1, 2 * round(pocket_depth_mm / spacing[2]) + 1),
            backend,
        ).view(bool)
        grown |= _wall_pockets(grown, allowed, near, lateral_sign=-1 if label == RIGHT_LUNG else 1)
        grown &= ~_domes(grown & ~lung_box, grown, labels[box] == 0)
        return box, grown

    # scipy's filters and labelling release the GIL: the two lungs in two threads take 0.6-0.7 of the time on two
    # cores. The labels are then written in a fixed order (the right lung first keeps contested voxels), as before.
    lungs = (RIGHT_LUNG, LEFT_LUNG)
    if (os.cpu_count() or 1) > 1:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="covfast-lung") as pool:
            found = list(pool.map(grow, lungs))
    else:
        found = [grow(label) for label in lungs]
    result = labels.copy()
    for label, grown_box in zip(lungs, found, strict=True):
        if grown_box is None:
            continue
        box, grown = grown_box
        result_box = result[box]
        result_box[grown & (result_box == 0)] = label
    return result


def _domes(added: np.ndarray, grown: np.ndarray, outside: np.ndarray, max_support: float = 0.6) -> np.ndarray:
    """Added regions that are cross-sections of the diaphragm or heart domes, not dense lung.

    Where the liver or heart dome bulges up into the lung, its cross-section in the slices above the dome's
    base is an island of soft tissue surrounded by lung, which hole filling would take as consolidation. Such an
    island rests on non-lung tissue: the slice below it holds the rest of the dome. Dense lung inside the lung
    mostly rests on lung. So a 3D component of the added voxels is rejected when more than ``max_support`` of
    its lower surface (voxels whose inferior neighbour is not in the component) sits on voxels that stay outside
    the lung.

    Args:
        added: [D, H, W] bool voxels added to one lung by closing, hole filling and pockets.
        grown: [D, H, W] bool that lung after the additions.
        outside: [D, H, W] bool voxels not labelled as aerated lung (either lung) before the additions.

    Returns:
        [D, H, W] bool voxels to remove again.
    """
    components = cc3d.connected_components(added, connectivity=6)
    dome_ids = np.flatnonzero(morphology.resting_on(components, outside & ~grown, max_support))
    if dome_ids.size == 0:
        return np.zeros_like(added)
    return _members(components, dome_ids, int(components.max()))


def _convex_hull_per_slice(mask: np.ndarray) -> np.ndarray:
    """[D, H, W] bool filled convex hull of each axial slice of [D, H, W] bool ``mask``."""
    hull = np.zeros_like(mask)
    width = mask.shape[2]
    rows_occupied = mask.any(axis=2)
    first = np.argmax(mask, axis=2)
    last = width - 1 - np.argmax(mask[:, :, ::-1], axis=2)
    columns = np.arange(width)
    for z in np.flatnonzero(rows_occupied.any(axis=1)):
        rows = np.flatnonzero(rows_occupied[z])
        # The row extremes carry every hull vertex, at a fraction of the points.
        points = np.concatenate([np.stack([rows, first[z, rows]], 1), np.stack([rows, last[z, rows]], 1)])
        left_x, right_x = first[z, rows].astype(np.float64), last[z, rows].astype(np.float64)
        try:
            vertices = points[ConvexHull(points).vertices].astype(np.float64)
        except QhullError:
            vertices = None  # collinear points: the row extremes already span the hull
        if vertices is not None:
            start, end = vertices, np.roll(vertices, -1, axis=0)
            rise = end[:, 0] - start[:, 0]
            # Where each edge crosses each occupied row (NaN where it does not): a convex polygon's row
            # section runs from the leftmost to the rightmost crossing.
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (rows[:, None] - start[None, :, 0]) / rise[None, :]
                crossing = np.where((t >= 0) & (t <= 1), start[None, :, 1] + t * (end - start)[None, :, 1], np.nan)
            left_x = np.fmin(left_x, np.nanmin(crossing, axis=1, initial=np.inf, where=~np.isnan(crossing)))
            right_x = np.fmax(right_x, np.nanmax(crossing, axis=1, initial=-np.inf, where=~np.isnan(crossing)))
        hull[z, rows] = (columns[None, :] >= np.ceil(left_x - 1e-6)[:, None]) & (
            columns[None, :] <= np.floor(right_x + 1e-6)[:, None]
        )
    return hull


def _wall_pockets(lung: np.ndarray, allowed: np.ndarray, near: np.ndarray, lateral_sign: int) -> np.ndarray:
    """Dense lung against the chest wall too wide for the closing: shallow convex-hull pockets on the outer side.

    Between a lung and its convex hull lie the heart, the mediastinum and, under a basal crescent, the
    liver or spleen, all deep; and dense lung pressed against the ribs, a pocket only because
    consolidation is as dense as the chest wall, usually a shallow dependent band along the back. A
    pocket is kept when at least 90 % of it lies within ``near`` (the pocket-depth band around the
    lung), its centroid is posterior of the lung's centroid (wedges of the heart border lie in front)
    and not medial of the midpoint between the lung's centroid column and its medial edge, and its area
    is at most the slice's lung area. Wall consolidation deeper than that stays out: a known limit.

    Args:
        lung: [D, H, W] bool one lung.
        allowed: [D, H, W] bool voxels that may be added (not bone, not the other lung).
        near: [D, H, W] bool voxels within the pocket depth of ``lung`` in their slice.
        lateral_sign: -1 when lateral is towards low W (right lung), +1 for the left lung.

    Returns:
        [D, H, W] bool pockets to add.
    """
    pockets = _convex_hull_per_slice(lung) & ~lung & allowed
    pocket_ids, count = ndi.label(pockets, structure=_SLICE_CROSS)
    if count == 0:
        return pockets
    stats = cc3d.statistics(pocket_ids.astype(np.uint32))
    pocket_area = stats["voxel_counts"][1:]
    shallow_area = np.bincount(pocket_ids[near].ravel(), minlength=count + 1)[1:]
    pocket_z = np.rint(stats["centroids"][1:, 0]).astype(np.intp)
    pocket_h = stats["centroids"][1:, 1]
    pocket_w = stats["centroids"][1:, 2]
    per_row = lung.sum(axis=2)
    lung_h = (per_row * np.arange(lung.shape[1])).sum(axis=1) / np.maximum(per_row.sum(axis=1), 1)
    columns = np.arange(lung.shape[2], dtype=np.float64)
    per_column = lung.sum(axis=1)
    lung_area = per_column.sum(axis=1)
    lung_w = (per_column * columns).sum(axis=1) / np.maximum(lung_area, 1)
    occupied = per_column > 0
    if lateral_sign < 0:
        medial_edge = lung.shape[2] - 1 - np.argmax(occupied[:, ::-1], axis=1)
    else:
        medial_edge = np.argmax(occupied, axis=1)
    medial_limit = (lung_w + medial_edge) / 2
    keep = (
        (shallow_area >= 0.9 * pocket_area)
        & (pocket_area <= lung_area[pocket_z])
        & (pocket_h >= lung_h[pocket_z])
        & ((pocket_w - medial_limit[pocket_z]) * lateral_sign >= 0)
    )
    return np.concatenate([[False], keep])[pocket_ids]


def _upsample_into(labels: np.ndarray, step_h: int, step_w: int, out: np.ndarray) -> None:
    """Nearest-neighbour upsampling of working-grid labels into the full-resolution ``out`` in place."""
    if step_h == 1 and step_w == 1:
        out[...] = labels
        return
    height, width = out.shape[1:]
    # Widen the rows first, then copy whole rows: contiguous copies are several times faster than one
    # strided broadcast over both axes.
    wide = np.repeat(labels, step_w, axis=2)[:, :, :width]
    for offset in range(step_h):
        out[:, offset::step_h] = wide[:, : len(range(offset, height, step_h))]
