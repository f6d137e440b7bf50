"""Rewrite a real single-frame DICOM CT series as one enhanced (multi-frame) CT file and check that covfast loads the
same volume from both, voxel for voxel.

    python benchmarks/enhanced_ct_check.py ../shared/data/covid-ct-md/P001 [--keep FILE]

The frames keep the series' own positions, orientation, pixel spacing and rescale (in per-frame and shared functional
groups), stored in reverse order; pixel data are written uncompressed. Printed: shapes, whether the HU, affine,
spacing and slice positions agree, and the load times of both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def to_enhanced(folder: Path, out: Path) -> None:
    slices = []
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, IsADirectoryError, OSError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            slices.append(ds)
    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_CT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, meta.MediaStorageSOPInstanceUID
    for name in ("Modality", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns",
                 "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation"):
        if name in first:
            setattr(ds, name, first.data_element(name).value)
    ds.NumberOfFrames = len(slices)
    measures, plane = pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing = first.PixelSpacing
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, pixels = [], []
    for source in reversed(slices):
        groups, position, transform = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        position.ImagePositionPatient = source.ImagePositionPatient
        transform.RescaleSlope = source.get("RescaleSlope", 1)
        transform.RescaleIntercept = source.get("RescaleIntercept", 0)
        groups.PlanePositionSequence, groups.PixelValueTransformationSequence = Sequence([position]), Sequence([transform])
        frames.append(groups)
        pixels.append(source.pixel_array)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).astype(pixels[0].dtype.newbyteorder("<")).tobytes()
    ds.save_as(out, enforce_file_format=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series")
    parser.add_argument("--keep", help="write the enhanced file here (default: a temporary file)")
    args = parser.parse_args()

    from covfast.io.inputs import load_volume

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.keep or Path(scratch) / "enhanced.dcm")
        to_enhanced(Path(args.series), out)
        start = time.perf_counter()
        series = load_volume(args.series)
        series_s = time.perf_counter() - start
        start = time.perf_counter()
        enhanced = load_volume(out)
        enhanced_s = time.perf_counter() - start
        checks = {
            "hu": np.array_equal(series.hu, enhanced.hu),
            "affine": np.allclose(series.affine, enhanced.affine, atol=1e-4),
            "spacing": np.allclose(series.spacing_mm, enhanced.spacing_mm),
            "z": np.allclose(series.z_mm, enhanced.z_mm, atol=1e-4),
        }
        print(f"series {series.hu.shape} {series_s:.2f} s, enhanced file {out.stat().st_size / 1e6:.0f} MB "
              f"{enhanced.hu.shape} {enhanced_s:.2f} s; identical: {checks}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
