"""Python API: ``covfast.infer(path_or_array) -> Result``; the CLI is a thin layer over this."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from covfast.errors import InputError
from covfast.pipeline.severity import DEFAULT_RULES, SeverityRules


def load(path_or_array, spacing=None, series: str | None = None):
    """Load a NIfTI file, a DICOM series folder or an in-memory canonical [D, H, W] HU array as a Volume."""
    from covfast.io import load_array, load_volume

    if isinstance(path_or_array, np.ndarray):
        return load_array(path_or_array, spacing_mm=tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0))
    return load_volume(str(path_or_array), series=series)


def infer(
    path_or_array,
    spacing=None,
    *,
    out_dir=None,
    infection_mask=None,
    series: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    preview: bool = True,
    rules: SeverityRules = DEFAULT_RULES,
    progress=None,
):
    """Quantify COVID-19 infection in one chest CT volume.

    Args:
        path_or_array: path of a ``.nii``/``.nii.gz`` file or a DICOM series folder, or a [D, H, W] array of HU in
            canonical orientation (D inferior -> superior, H anterior -> posterior, W patient right -> left).
        spacing: (d, h, w) voxel size in mm for an array input.
        out_dir: when given, write report.json, lung_mask.nii.gz, infection_mask.nii.gz and preview.png there.
        infection_mask: optional path of a NIfTI infection mask (0/1 or 0/1/2) on the input's grid, or a canonical
            [D, H, W] array; it replaces the infection network.
        series: SeriesInstanceUID to take from a DICOM folder holding several series.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: slices per network batch.
        preview: draw preview.png when writing outputs.
        rules: severity thresholds (:class:`covfast.pipeline.severity.SeverityRules`).
        progress: optional callable(n_done, n_total) for the infection network.

    Returns:
        :class:`covfast.pipeline.run.Result`; ``result.report`` is what report.json holds.
    """
    from covfast.pipeline.run import analyze

    timings: dict = {}
    start = time.perf_counter()
    volume = load(path_or_array, spacing, series)
    timings["read"] = time.perf_counter() - start
    mask = None
    mask_source = None
    if infection_mask is not None:
        if isinstance(infection_mask, np.ndarray):
            if infection_mask.shape != volume.hu.shape:
                raise InputError(
                    "infection_mask", f"shape {infection_mask.shape} differs from the volume's {volume.hu.shape}"
                )
            mask, mask_source = infection_mask.astype(np.uint8), "array"
        else:
            from covfast.io import load_mask_like

            mask, mask_source = load_mask_like(str(infection_mask), volume), str(infection_mask)
    result = analyze(
        volume,
        infection_mask=mask,
        infection_mask_source=mask_source,
        device=device,
        batch_size=batch_size,
        rules=rules,
        timings=timings,
        progress=progress,
    )
    if out_dir is not None:
        result.save(Path(out_dir), preview=preview)
    return result
