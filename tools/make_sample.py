"""Make covfast's shipped quick-start volume, covfast/data/sample_ct.nii.gz, from COVID-CT-MD case P001.

Operations, all in Hounsfield units on the canonical grid (D inferior -> superior, H anterior -> posterior,
W right -> left) of the 512 x 512 x 148 DICOM series:
  1. area averaging of each 2 x 2 x 2 block of voxels (2 x 2 in-plane, pairs of adjacent 2 mm slices: a 4 mm
     thick-slice reconstruction), 148 x 512 x 512 -> 74 x 256 x 256;
  2. rounding to the nearest integer HU, int16;
  3. the RAS affine of the coarser grid: each new voxel centre is the centre of its 2 x 2 x 2 source block;
  4. stored in the DICOM's (column, row, slice) order, qform and sform codes 1, gzip level 9 (mtime 0, so the
     file is reproducible byte for byte).
It also writes covfast/data/SAMPLE.md with the resulting shape, spacing, size and SHA-256.

Usage: python tools/make_sample.py [--source ../shared/data/covid-ct-md/P001] [--out covfast/data]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from covfast.io import canonical_affine, load_volume
from covfast.io.inputs import SAMPLE_NAME

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "covid-ct-md" / "P001"
FACTOR = 2

SAMPLE_MD = """# Sample volume: `sample_ct.nii.gz`

The quick-start input (`covfast infer {name} -o out/`; in Python `covfast.io.sample_path()`).
Made by `python tools/make_sample.py` (see its docstring) from real, public data:

- Source: COVID-CT-MD (Afshar et al., Scientific Data 8:121, 2021), case `P001` (COVID-19), a Siemens
  chest CT series of {src_slices} DICOM slices, {src_rows} x {src_cols}, JPEG-lossless, HU via RescaleSlope/Intercept;
  voxel {src_spacing} mm (slice, row, column). Series UID `{series_uid}`.
  Radiologists marked infection on {infected_slices} of its {src_slices} slices (`labels.json`).
- Operations (in HU, canonical grid): mean over each 2 x 2 x 2 block (2 x 2 in-plane area averaging and
  averaging of adjacent slice pairs, i.e. a 4 mm thick-slice reconstruction); round to integer HU, int16;
  affine of the coarser grid (each voxel centre = centre of its source block); stored in the DICOM's
  (column, row, slice) order with qform/sform codes 1; gzip level 9, mtime 0.
- Result: shape {shape} (NIfTI array order: columns right->left, rows anterior->posterior, slices
  inferior->superior), voxel {spacing} mm, HU range {hu_min}..{hu_max}, {size_bytes:,} bytes ({size_mb:.2f} MB).
- SHA-256: `{sha256}`
"""


def downsample(hu: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor^3 blocks; trailing voxels that do not fill a block are dropped.

    Args:
        hu: [D, H, W] HU, any real dtype.
        factor: block edge in voxels.

    Returns:
        [D // f, H // f, W // f] float64 block means.
    """
    d, h, w = (n // factor for n in hu.shape)
    blocks = hu[: d * factor, : h * factor, : w * factor].astype(np.float64)
    return blocks.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))


def block_affine(canonical: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the block-averaged grid: new index i maps to old index factor * i + (factor - 1) / 2."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return canonical @ scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="COVID-CT-MD P001 DICOM folder")
    parser.add_argument("--out", type=Path, default=REPO / "covfast" / "data", help="output folder")
    args = parser.parse_args(argv)

    volume = load_volume(args.source)
    coarse = np.rint(downsample(volume.hu, FACTOR)).astype(np.int16)
    affine_dhw = block_affine(canonical_affine(volume.affine, volume.source_shape), FACTOR)
    # Canonical (D, H, W) -> the DICOM's (column, row, slice) order: reverse the axes and the affine's columns.
    data = np.asfortranarray(coarse.transpose(2, 1, 0))
    affine = affine_dhw[:, [2, 1, 0, 3]]
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"covfast sample: COVID-CT-MD P001, 2x2x2 mean"
    payload = gzip.compress(image.to_bytes(), compresslevel=9, mtime=0)

    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / SAMPLE_NAME
    target.write_bytes(payload)
    labels_path = args.source.parent / "labels.json"
    infected = "?"
    if labels_path.exists():
        infected = sum(json.loads(labels_path.read_text())[args.source.name]["infection_slice_labels"])
    summary = SAMPLE_MD.format(
        name=f"covfast/data/{SAMPLE_NAME}",
        src_slices=volume.hu.shape[0],
        src_rows=volume.hu.shape[1],
        src_cols=volume.hu.shape[2],
        src_spacing=" x ".join(f"{s:g}" for s in volume.spacing_mm),
        series_uid=volume.series_uid,
        infected_slices=infected,
        shape=" x ".join(str(n) for n in data.shape),
        spacing=" x ".join(f"{s:.6g}" for s in image.header.get_zooms()),
        hu_min=int(coarse.min()),
        hu_max=int(coarse.max()),
        size_bytes=len(payload),
        size_mb=len(payload) / 2**20,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    (args.out / "SAMPLE.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
