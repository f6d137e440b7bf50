"""Check a written segmentation.dcm against the NIfTI masks of the same run, voxel for voxel, on a real series.

    python benchmarks/dicom_seg_check.py OUT_FOLDER DICOM_FOLDER

OUT_FOLDER is one input's output folder of ``covfast infer DICOM_FOLDER --dicom-seg``. The SEG is read back with
highdicom, frame by frame for every source SOPInstanceUID of DICOM_FOLDER; the NIfTI masks are mapped to the source
images' layout through the series' own geometry (covfast's loader). Printed per segment: voxels in the SEG, voxels in
the NIfTI mask, and whether the two agree everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_folder")
    parser.add_argument("dicom_folder")
    args = parser.parse_args()

    import highdicom as hd

    from covfast.io.inputs import load_volume

    out = Path(args.out_folder)
    volume = load_volume(args.dicom_folder)
    seg = hd.seg.segread(out / "segmentation.dcm")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    uids = [header.SOPInstanceUID for header in volume.source_headers]
    frames = seg.get_pixels_by_source_instance(uids, segment_numbers=list(range(1, len(labels) + 1)),
                                               ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    lung = volume.from_source(np.asarray(nib.load(out / "lung_mask.nii.gz").dataobj))
    masks = [lung == 1, lung == 2]
    if len(labels) > 2:
        infection = volume.from_source(np.asarray(nib.load(out / "infection_mask.nii.gz").dataobj))
        masks += [infection == 1, infection == 2] if len(labels) == 4 else [infection > 0]
    ok = True
    for k, (label, mask) in enumerate(zip(labels, masks)):
        expected = volume.to_source(mask).transpose(2, 1, 0)  # [slice, row, column] of the source images
        same = bool(np.array_equal(frames[..., k] > 0, expected))
        ok &= same
        print(f"{label}: SEG {int(frames[..., k].sum())} voxels, NIfTI {int(expected.sum())}, identical {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
