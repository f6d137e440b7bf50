"""segmentation.dcm: the masks of a DICOM input as a DICOM SEG on the source images' own pixels
(covfast/report/dicom_seg.py)."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_io import write_dicom_series, write_enhanced_ct

from covfast.errors import UsageError
from covfast.io.inputs import load_volume
from covfast.report import dicom_seg

hd = pytest.importorskip("highdicom")

RIGHT, LEFT, GGO, CONSOLIDATION = -800, -700, -300, 100


def _series(folder, orientation, attributes=None):
    """A small series whose voxel values name the segment they belong to, written with ``orientation``."""
    hu = np.full((6, 12, 10), -1000, dtype=np.int16)
    hu[1:4, 2:6, 1:4] = RIGHT
    hu[2:5, 3:9, 6:9] = LEFT
    hu[2, 3:5, 2:3] = GGO
    hu[3, 6:8, 7] = CONSOLIDATION
    uids = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    write_dicom_series(folder, hu, orientation=orientation, attributes={**uids, **(attributes or {})})
    return uids


def _masks(volume):
    """Canonical lung and infection masks read off the loaded HU, with no use of the geometry."""
    lung = np.select([volume.hu == RIGHT, volume.hu == LEFT], [1, 2], 0).astype(np.uint8)
    infection = np.select([volume.hu == GGO, volume.hu == CONSOLIDATION], [1, 2], 0).astype(np.uint8)
    return lung, infection


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0)],
                         ids=["axial", "rotated", "transposed"])
def test_segments_lie_on_the_source_images_pixels(tmp_path, orientation):
    uids = _series(tmp_path / "series", orientation)
    volume = load_volume(tmp_path / "series")
    lung, infection = _masks(volume)
    path = tmp_path / "seg.dcm"

    dicom_seg.write_dicom_seg(volume, lung, infection, path, "test")

    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["right lung", "left lung", "ground-glass opacity",
                                                             "consolidation"]
    assert seg.StudyInstanceUID == uids["StudyInstanceUID"]
    assert seg.FrameOfReferenceUID == uids["FrameOfReferenceUID"]
    files = sorted((tmp_path / "series").iterdir())
    assert len(files) == 6
    for file in files:
        source = pydicom.dcmread(file)
        hu = source.pixel_array.astype(np.int32) * int(source.RescaleSlope) + int(source.RescaleIntercept)
        got = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3, 4],
                                                ignore_spatial_locations=True,
                                                assert_missing_frames_are_empty=True)[0]
        for segment, value in enumerate((RIGHT, LEFT, GGO, CONSOLIDATION)):
            np.testing.assert_array_equal(got[..., segment], hu == value, err_msg=f"{file.name} segment {segment + 1}")


def test_one_infection_segment_without_classes_and_anonymised_headers(tmp_path):
    _series(tmp_path / "series", (1, 0, 0, 0, 1, 0))
    volume = load_volume(tmp_path / "series")
    assert "PatientName" not in volume.source_headers[0]  # as in anonymised series; written empty
    lung, infection = _masks(volume)
    dicom_seg.write_dicom_seg(volume, lung, (infection > 0).astype(np.uint8), tmp_path / "seg.dcm", "test")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["right lung", "left lung", "infection"]
    assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert seg.PatientName == ""


def test_what_cannot_have_a_seg_is_refused_with_the_reason(tmp_path):
    write_dicom_series(tmp_path / "bare", np.arange(-1000, -952, dtype=np.int16).reshape(3, 4, 4))  # no frame UID
    bare = load_volume(tmp_path / "bare")
    empty = np.zeros(bare.hu.shape, np.uint8)
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        dicom_seg.write_dicom_seg(bare, empty, None, tmp_path / "seg.dcm", "test")
    from covfast.api import load

    array = load(np.arange(-1000, -952, dtype=np.int16).reshape(3, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="DICOM series"):
        dicom_seg.write_dicom_seg(array, empty, None, tmp_path / "seg.dcm", "test")
    assert not (tmp_path / "seg.dcm").exists()


def test_missing_highdicom_is_a_usage_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(UsageError, match="covfast\\[dicom\\]"):
        dicom_seg.require_highdicom()


def test_infer_writes_segmentation_dcm_for_dicom_and_a_note_for_nifti(tmp_path):
    import nibabel as nib
    from test_lung import _chest_phantom

    import covfast

    chest = _chest_phantom(1.25)
    write_dicom_series(tmp_path / "chest", chest["hu"], spacing=chest["spacing"],
                       attributes={"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()})
    lesions = (chest["ggo"] | chest["consolidation"]).astype(np.uint8)
    result = covfast.infer(tmp_path / "chest", out_dir=tmp_path / "out", infection_mask=lesions, dicom_seg=True)
    assert result.report["outputs"]["dicom_seg"] == "segmentation.dcm"
    seg = hd.seg.segread(tmp_path / "out" / "segmentation.dcm")
    assert seg.number_of_segments == 3
    total = sum(seg.get_pixels_by_source_instance(
        [h.SOPInstanceUID for h in result.volume.source_headers], segment_numbers=[1, 2, 3],
        ignore_spatial_locations=True, assert_missing_frames_are_empty=True).sum(axis=(0, 1, 2)))
    assert total == np.count_nonzero(result.lung_mask) + np.count_nonzero(result.infection_mask)

    from covfast.cli import main
    from covfast.io import write_nifti_like

    write_nifti_like(result.volume, lesions, tmp_path / "lesions.nii.gz")
    assert main(["infer", str(tmp_path / "chest"), "-o", str(tmp_path / "cli"), "-q", "--dicom-seg",
                 "--infection-mask", str(tmp_path / "lesions.nii.gz")]) == 0
    assert hd.seg.segread(tmp_path / "cli" / "chest" / "segmentation.dcm").number_of_segments == 3

    nib.save(nib.Nifti1Image(np.ascontiguousarray(result.volume.to_source(result.volume.hu)), result.volume.affine),
             tmp_path / "chest.nii.gz")
    nifti = covfast.infer(tmp_path / "chest.nii.gz", out_dir=tmp_path / "out_nifti", infection_mask=lesions,
                          dicom_seg=True)
    assert "dicom_seg" not in nifti.report["outputs"]
    assert any("segmentation.dcm" in note and "DICOM series" in note for note in nifti.report["notes"])
    assert not (tmp_path / "out_nifti" / "segmentation.dcm").exists()


def test_an_enhanced_ct_gets_a_seg_on_its_own_frames(tmp_path):
    hu = np.full((6, 12, 10), -1000, dtype=np.int16)
    hu[1:4, 2:6, 1:4] = RIGHT
    hu[2:5, 3:9, 6:9] = LEFT
    hu[2, 3:5, 2:3] = GGO
    hu[3, 6:8, 7] = CONSOLIDATION
    frame_order = [4, 1, 5, 0, 3, 2]  # frame i holds slice frame_order[i]
    file = write_enhanced_ct(tmp_path / "ct.dcm", hu, orientation=(-1, 0, 0, 0, -1, 0), frame_order=frame_order,
                             attributes={"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()})
    volume = load_volume(file)
    lung, infection = _masks(volume)
    dicom_seg.write_dicom_seg(volume, lung, infection, tmp_path / "seg.dcm", "test")

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    source = pydicom.dcmread(file)
    got = seg.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=list(range(1, 7)),
                                         segment_numbers=[1, 2, 3, 4], ignore_spatial_locations=True,
                                         assert_missing_frames_are_empty=True)
    stored = source.pixel_array.astype(np.int32) - 1024  # frame by frame as written
    for segment, value in enumerate((RIGHT, LEFT, GGO, CONSOLIDATION)):
        np.testing.assert_array_equal(got[..., segment], stored == value, err_msg=f"segment {segment + 1}")


def test_an_enhanced_ct_file_runs_end_to_end_with_its_seg(tmp_path):
    import json

    from test_lung import _chest_phantom

    from covfast.cli import main
    from covfast.io import write_nifti_like

    chest = _chest_phantom(1.25)
    file = write_enhanced_ct(tmp_path / "ct.dcm", chest["hu"], spacing=chest["spacing"],
                             attributes={"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()})
    volume = load_volume(file)
    write_nifti_like(volume, (chest["ggo"] | chest["consolidation"]).astype(np.uint8), tmp_path / "lesions.nii.gz")
    assert main(["infer", str(file), "-o", str(tmp_path / "out"), "-q", "--dicom-seg",
                 "--infection-mask", str(tmp_path / "lesions.nii.gz")]) == 0
    folder = tmp_path / "out" / "ct"  # named after the file, without .dcm
    report = json.loads((folder / "report.json").read_text())
    assert report["input"]["kind"] == "dicom" and report["lung_volume_ml"]["total"] > 100
    assert report["outputs"]["dicom_seg"] == "segmentation.dcm"
    assert hd.seg.segread(folder / "segmentation.dcm").number_of_segments == 3


def test_a_volume_split_over_two_enhanced_files_loads_but_gets_no_seg(tmp_path):
    hu = np.arange(-1000, -1000 + 6 * 4 * 4, dtype=np.int16).reshape(6, 4, 4)
    common = {"SeriesInstanceUID": generate_uid(), "StudyInstanceUID": generate_uid(),
              "FrameOfReferenceUID": generate_uid()}
    write_enhanced_ct(tmp_path / "split" / "a.dcm", hu[:3], attributes=common)
    write_enhanced_ct(tmp_path / "split" / "b.dcm", hu[3:], origin=(-100.0, -120.0, -300.0 + 3 * 2.5),
                      attributes=common)
    volume = load_volume(tmp_path / "split")
    np.testing.assert_array_equal(volume.hu, load_volume(write_enhanced_ct(tmp_path / "whole.dcm", hu)).hu)
    assert volume.source_headers is None
    with pytest.raises(ValueError, match="several multi-frame images"):
        dicom_seg.write_dicom_seg(volume, np.zeros(volume.hu.shape, np.uint8), None, tmp_path / "seg.dcm", "test")
