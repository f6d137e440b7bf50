"""Bad input through the CLI: one-line error naming the file, exit code 3, nothing written."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from covfast.cli import main
from covfast.io import sample_path


def _nifti(path, data):
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0])), str(path))
    return path


def _not_a_volume(tmp):
    path = tmp / "notes.nii.gz"
    path.write_bytes(b"this is not a NIfTI file at all" * 20)
    return path


def _truncated(tmp):
    good = _nifti(tmp / "good.nii.gz", np.full((32, 32, 16), -800, np.int16))
    data = good.read_bytes()
    path = tmp / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _two_d(tmp):
    return _nifti(tmp / "flat.nii", np.full((64, 64), -800, np.int16))


def _four_d(tmp):
    return _nifti(tmp / "series4d.nii", np.full((16, 16, 8, 3), -800, np.int16))


def _zero_dim(tmp):
    return _nifti(tmp / "empty.nii", np.zeros((16, 0, 8), np.int16))


def _nan(tmp):
    data = np.full((16, 16, 8), -800.0, np.float32)
    data[3, 4, 5] = np.nan
    return _nifti(tmp / "nan.nii.gz", data)


def _windowed(tmp):
    rng = np.random.default_rng(0)
    return _nifti(tmp / "windowed.nii.gz", rng.integers(0, 256, (32, 32, 16)).astype(np.uint8))


def _huge_header(tmp):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((30000, 30000, 30000))
    path = tmp / "huge.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(img.header.binaryblock + b"\0" * 4 + b"\0" * 16)
    return path


def _write_series(folder, positions, series_uid=None, rows=16):
    """Write an uncompressed CT series (one file per z position) into ``folder``; returns its SeriesInstanceUID."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    for n, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = str(folder / f"{series_uid[-6:]}_{n}.dcm")
        ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.Modality = "CT"
        ds.Rows, ds.Columns = rows, 16
        ds.PixelSpacing = [0.8, 0.8]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.SliceThickness = 2.0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = (200 + np.arange(rows * 16, dtype=np.uint16) % 7).reshape(rows, 16).tobytes()
        pydicom.dcmwrite(name, ds, enforce_file_format=True)
    return series_uid


def _dicom_gap(tmp):
    _write_series(tmp / "gap_series", [0.0, 2.0, 4.0, 10.0, 12.0])
    return tmp / "gap_series"


CASES = {
    "missing": (lambda tmp: tmp / "does_not_exist.nii.gz", "does_not_exist.nii.gz"),
    "not a volume": (_not_a_volume, "notes.nii.gz"),
    "truncated gzip": (_truncated, "truncated.nii.gz"),
    "2D": (_two_d, "flat.nii"),
    "4D": (_four_d, "series4d.nii"),
    "zero dimension": (_zero_dim, "empty.nii"),
    "NaN voxels": (_nan, "nan.nii.gz"),
    "8-bit windowed export": (_windowed, "windowed.nii.gz"),
    "enormous header": (_huge_header, "huge.nii.gz"),
    "DICOM gap": (_dicom_gap, "gap_series"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_3(case, tmp_path, capsys):
    make, name = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    path = make(src)
    out = tmp_path / "out"
    code = main(["infer", str(path), "-o", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 3, captured
    err = captured.err.strip()
    assert err.startswith("covfast: error:"), err
    assert name in err and "\n" not in err and "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_input_among_several_is_skipped(tmp_path, capsys):
    bad = _two_d(tmp_path)
    out = tmp_path / "out"
    code = main(["infer", str(bad), str(sample_path()), "-o", str(out), "--device", "cpu", "--no-preview", "-q"])
    assert code == 3
    captured = capsys.readouterr()
    assert "flat.nii" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["sample_ct", "summary.csv"]
    # The table has a row for the finished input only.
    assert [line.split(",")[0] for line in (out / "summary.csv").read_text().splitlines()] == ["output", "sample_ct"]


def test_infection_mask_on_wrong_grid(tmp_path, capsys):
    mask = _nifti(tmp_path / "mask.nii.gz", np.zeros((10, 10, 10), np.uint8))
    out = tmp_path / "out"
    code = main(["infer", str(sample_path()), "-o", str(out), "--infection-mask", str(mask), "--device", "cpu"])
    assert code == 3
    assert "mask.nii.gz" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_dicom_folder_with_two_series(tmp_path, capsys):
    from covfast.io import load_volume

    folder = tmp_path / "two_series"
    big = _write_series(folder, np.arange(8) * 2.0)
    small = _write_series(folder, np.arange(5) * 2.0, rows=12)
    volume = load_volume(str(folder))
    assert volume.series_uid == big and volume.hu.shape[0] == 8
    assert any(small in w or "series" in w for w in volume.warnings)
    chosen = load_volume(str(folder), series=small)
    assert chosen.series_uid == small and chosen.hu.shape == (5, 12, 16)
    out = tmp_path / "out"
    code = main(["infer", str(folder), "-o", str(out), "--series", "1.2.3.4.5.6.7", "--device", "cpu"])
    assert code == 3
    err = capsys.readouterr().err
    assert "two_series" in err and "1.2.3.4.5.6.7" in err
    assert not out.exists() or list(out.iterdir()) == []
