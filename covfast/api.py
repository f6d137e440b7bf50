"""Python API: ``covfast.infer(path_or_array) -> Result`` and ``infer_many(paths, out_dirs)`` for several volumes;
the CLI is a thin layer over this."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covfast.errors import CovfastError, InputError
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
    batch_size: int | None = None,
    preview: bool = True,
    save_probabilities: bool = False,
    dicom_seg: bool = False,
    rules: SeverityRules = DEFAULT_RULES,
    progress=None,
    engine: str = "auto",
    precision: str | None = None,
    tta: str | None = None,
    ensemble: bool = True,
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
        batch_size: slices per network batch; None: 8 on the CPU, 32 on a GPU.
        preview: draw preview.png when writing outputs.
        save_probabilities: also write infection_prob.nii.gz (the network's infection probability, uint8 p x 255
            with scl_slope 1/255, on the input's grid) when writing outputs.
        dicom_seg: also write segmentation.dcm, the masks as a DICOM SEG referencing the input series (DICOM inputs;
            needs highdicom, ``pip install covfast[dicom]``).
        rules: severity thresholds (:class:`covfast.pipeline.severity.SeverityRules`).
        progress: optional callable(n_done, n_total) for the infection network.
        engine: inference engine of the infection networks: ``auto`` (TensorRT, torch on CUDA, onnxruntime, torch
            on the CPU, the first that is available), ``torch``, ``onnx`` or ``tensorrt``.
        precision: network precision: None (the cached TensorRT engine's on a GPU; under ``auto`` on a CPU int8 where
            it has 8-bit dot products, else fp32), ``fp32``, ``int8`` (onnxruntime on the CPU) or ``bf16`` / ``fp16``
            (torch autocast or TensorRT; onnxruntime runs fp32 or int8, so ``auto`` then takes torch).
        tta: test-time augmentation of the infection networks: None (the default,
            :data:`covfast.pipeline.infection.DEFAULT_TTA`, ``h``), ``none``, ``h`` (also the horizontally flipped slice) or
            ``hv`` (also the vertically flipped one); the probabilities are averaged.
        ensemble: average the installed U-Net partner's infection probability into the Inf-Net's (the default);
            False runs the Inf-Net alone (faster, lower Dice; see :mod:`covfast.pipeline.infection`).

    Returns:
        :class:`covfast.pipeline.run.Result`; ``result.report`` is what report.json holds.
    """
    from covfast.pipeline.run import analyze

    _check_engine(engine, precision, tta)
    volume, timings = _timed_load(path_or_array, spacing, series)
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
        engine=engine,
        precision=precision,
        tta=tta,
        ensemble=ensemble,
    )
    if out_dir is not None:
        result.save(Path(out_dir), preview=preview, probabilities=save_probabilities, dicom_seg=dicom_seg)
    return result


def _check_engine(engine: str, precision: str | None, tta: str | None = None) -> None:
    from covfast.engine.runtime import check_engine, check_precision
    from covfast.pipeline.infection import check_tta

    check_engine(engine)
    check_precision(precision)
    check_tta(tta)


def _timed_load(path_or_array, spacing=None, series: str | None = None) -> tuple:
    """:func:`load` with its duration: (Volume, ``{"read": seconds}``)."""
    start = time.perf_counter()
    volume = load(path_or_array, spacing, series)
    return volume, {"read": time.perf_counter() - start}


def infer_many(
    paths: Sequence,
    out_dirs: Sequence,
    *,
    series: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    preview: bool = True,
    save_probabilities: bool = False,
    dicom_seg: bool = False,
    rules: SeverityRules = DEFAULT_RULES,
    engine: str = "auto",
    precision: str | None = None,
    tta: str | None = None,
    ensemble: bool = True,
    progress: Callable[[int], Callable[[int, int], None] | None] | None = None,
    workers: int = 1,
) -> Iterator[tuple[int, object]]:
    """Run :func:`infer` on several volumes, overlapping file reading and writing with the computation.

    A reader thread decodes the next volume while the current one is computed, and a writer thread saves the
    previous result (gzip of the masks, preview.png) meanwhile; at most one volume is read ahead and one result
    waits to be written, so memory stays at about three volumes. The networks and engines are loaded once (the
    infection stage caches them per process). An input that fails (unreadable, bad geometry, unwritable output) is
    reported and the others still run.

    Args:
        paths: inputs (``.nii``/``.nii.gz`` files or DICOM series folders).
        out_dirs: output folder of each input, same length as ``paths``.
        series: SeriesInstanceUID to take from DICOM folders holding several series.
        device, batch_size, preview, save_probabilities, dicom_seg, rules, engine, precision, tta, ensemble: as for
            :func:`infer`.
        progress: optional callable(index) -> callable(n_done, n_total) (or None), the infection network's progress
            callback for input ``index`` (not called when ``workers`` > 1).
        workers: volumes computed at once, each in its own worker process (spawned, so CUDA works in them) that
            loads the networks once and then reads, computes and writes whole volumes. Most of the pipeline besides
            the networks (the lung mask, the lesion statistics, the preview) is CPU work, so on a GPU machine with
            many cores several workers share the GPU and multiply the throughput; each holds its own copy of the
            networks and one volume at a time (about 2.5 GB of host memory at 512 x 512 x 150).

    Yields:
        (index, outcome) in input order, once the input's outputs are written: ``outcome`` is the
        :class:`covfast.pipeline.run.Result` (with ``workers`` > 1 a :class:`Saved`, its report and output folder:
        the arrays stay in the worker), or the :class:`covfast.errors.CovfastError` that stopped it.
    """
    from covfast.pipeline.run import analyze

    if len(paths) != len(out_dirs):
        raise ValueError(f"{len(paths)} inputs but {len(out_dirs)} output folders")
    _check_engine(engine, precision, tta)
    if workers > 1 and len(paths) > 1:
        options = {"series": series, "device": device, "batch_size": batch_size, "preview": preview,
                   "save_probabilities": save_probabilities, "dicom_seg": dicom_seg, "rules": rules, "engine": engine,
                   "precision": precision, "tta": tta, "ensemble": ensemble}
        yield from _infer_in_workers(paths, out_dirs, min(workers, len(paths)), options)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="covfast-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="covfast-write") as writer:
        reading = reader.submit(_timed_load, paths[0], None, series) if paths else None
        writing: tuple[int, Future | None, object] | None = None  # (index, the write's future, outcome)
        for index, out_dir in enumerate(out_dirs):
            loaded = reading
            if index + 1 < len(paths):
                reading = reader.submit(_timed_load, paths[index + 1], None, series)
            try:
                volume, timings = loaded.result()
                outcome = analyze(volume, device=device, batch_size=batch_size, rules=rules, timings=timings,
                                  progress=progress(index) if progress else None, engine=engine,
                                  precision=precision, tta=tta, ensemble=ensemble)
            except CovfastError as exc:
                outcome = exc
            if writing is not None:
                yield _written(*writing)
            saving = None if isinstance(outcome, CovfastError) else writer.submit(
                outcome.save, Path(out_dir), preview=preview, probabilities=save_probabilities, dicom_seg=dicom_seg
            )
            writing = (index, saving, outcome)
        if writing is not None:
            yield _written(*writing)


@dataclass
class Saved:
    """What a worker process of :func:`infer_many` hands back for a volume whose outputs it wrote."""

    report: dict
    out_dir: Path


WORKER_MEMORY_GB = 3.0  # host memory one worker may take at 512 x 512 x 150 (measured peak 2.3-2.6 GB on an H100 host)
# GPU memory one worker may take: torch's allocator peaked at 618-731 MB on an H100 at 8 slices a batch, plus the CUDA
# context. The GPU default is now 32 slices a batch, not yet measured on a GPU; on the CPU in float32 a pass of the
# largest network over 32 slices and their flips (64) raised the peak RSS by 2.1 GB (benchmarks/activation_memory.py,
# results/activation_memory_cpu_2026-11-25.json), hence the margin.
WORKER_GPU_MEMORY_GB = 3.0


def _gpu_memory_gb() -> float | None:
    """Total memory of CUDA device 0 in GB, None where torch cannot tell."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    except RuntimeError:  # a driver problem: no GPU bound
        return None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo in GB, None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def default_workers(device: str, n_inputs: int) -> int:
    """Worker processes for ``covfast infer --workers auto``: one on a CPU (the networks already use every core)
    or for a single input; on a GPU three per four CPU cores, as many as the available host memory holds at
    :data:`WORKER_MEMORY_GB` each and the GPU at :data:`WORKER_GPU_MEMORY_GB` each, and at most one per input. On a 16-core H100 machine, 32 volumes of 512 x 512 x
    148 took 42.9 s with 4 workers, 35.3 s with 8, 28.3 s with 12 and 29.9 s with 16 (benchmarks/results/
    gpu_e2e_h100_2026-11-24.md)."""
    if device != "cuda" or n_inputs < 2:
        return 1
    memory, gpu_memory = _available_memory_gb(), _gpu_memory_gb()
    by_memory = int(memory // WORKER_MEMORY_GB) if memory is not None else n_inputs
    by_gpu = int(gpu_memory // WORKER_GPU_MEMORY_GB) if gpu_memory is not None else n_inputs
    return max(1, min(3 * _cores() // 4, by_memory, by_gpu, n_inputs))


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _infer_saved(path, out_dir, options: dict):
    """One volume in a worker process: read, compute, write; the report (or the error) goes back."""
    try:
        result = infer(path, out_dir=out_dir, **options)
    except CovfastError as exc:
        return exc
    return Saved(result.report, Path(out_dir))


def _infer_in_workers(paths: Sequence, out_dirs: Sequence, workers: int, options: dict) -> Iterator[tuple[int, object]]:
    """:func:`infer_many` over ``workers`` spawned processes; at most two volumes per worker are queued, and the
    outcomes come back in input order."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(max(1, _cores() // workers),)) as pool:
        pending: dict[int, Future] = {}
        submitted = 0
        for index in range(len(paths)):
            while submitted < len(paths) and submitted < index + 2 * workers:
                pending[submitted] = pool.submit(_infer_saved, paths[submitted], out_dirs[submitted], options)
                submitted += 1
            yield index, pending.pop(index).result()


def _written(index: int, saving: Future | None, outcome) -> tuple[int, object]:
    """(index, outcome) once the write ``saving`` is done; a failed write turns the outcome into its error."""
    if saving is not None:
        try:
            saving.result()
        except CovfastError as exc:
            return index, exc
    return index, outcome
