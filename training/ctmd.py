"""The radiologists' labels of the COVID-CT-MD volumes (``../shared/data/covid-ct-md/labels.json``), per slice in
the order of covfast's canonical volume (ascending slice location, inferior to superior).

``labels.json`` lists ``slice_location_mm`` in ascending order, but its ``infection_slice_labels`` and
``infection_lobe_labels`` arrays are in the dataset's own slice order, which is **descending** slice location
(superior first). Three independent checks agree (session 12, ``training/RESULTS.md``):

- the dataset authors' reader (COVID-FACT, by the COVID-CT-MD authors) sorts the slices by SliceLocation and then
  reverses the list, so their slice 0 is the most superior one;
- read in ascending order, P001's right upper lobe would be labelled below its right lower lobe (mean slice 59.5
  against 100.5), and cap001's two lower lobes in the upper half of its lungs; reversed, the lobes fall where the
  anatomy puts them (:func:`lobe_centres`, checked by ``tests/test_training.py``);
- the shipped segmentation, which never saw cap001, ranks the slices by infected area with an AUC of 0.98 (P001)
  and 0.89 (cap001) against the reversed labels, and 0.72 / 0.57 against the labels as listed.

Every reader of these labels goes through this module, so the convention lives in one place:
:data:`LABELS_DESCENDING`.
"""

from __future__ import annotations

import numpy as np

LABELS_DESCENDING = True
"""``labels.json``'s label arrays run from the most superior slice down (see the module docstring)."""

LOBES = ("LLL", "LUL", "RLL", "RML", "RUL")


def _ascending(values) -> np.ndarray:
    array = np.asarray(values)
    return array[::-1] if LABELS_DESCENDING else array


def slice_labels(info: dict) -> np.ndarray:
    """[N] bool infection label per slice, in ascending slice location (= ``info["slice_location_mm"]``)."""
    return _ascending(info["infection_slice_labels"]).astype(bool)


def lobe_labels(info: dict) -> np.ndarray:
    """[N, 5] bool infection label per slice and lobe (:data:`LOBES` order), ascending slice location."""
    return _ascending(info["infection_lobe_labels"]).astype(bool)


def labels_at(info: dict, z_mm: np.ndarray, tolerance_mm: float = 1.0) -> np.ndarray:
    """Slice labels at the given slice positions, matched to ``slice_location_mm`` by the nearest location.

    Raises:
        ValueError: a position is further than ``tolerance_mm`` from every labelled location.
    """
    location = np.asarray(info["slice_location_mm"], dtype=np.float64)
    z_mm = np.asarray(z_mm, dtype=np.float64)
    nearest = np.abs(location[None, :] - z_mm[:, None]).argmin(axis=1)
    if np.abs(location[nearest] - z_mm).max(initial=0.0) > tolerance_mm:
        raise ValueError("slice locations of labels.json do not match the volume's slices")
    return slice_labels(info)[nearest]


def lobe_centres(info: dict) -> dict[str, float]:
    """Mean slice location (mm) of each lobe's labelled slices; lobes without a labelled slice are left out."""
    location = np.asarray(info["slice_location_mm"], dtype=np.float64)
    lobes = lobe_labels(info)
    return {name: float(location[lobes[:, k]].mean()) for k, name in enumerate(LOBES) if lobes[:, k].any()}
