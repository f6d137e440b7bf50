"""Bad inputs to covfast.io: each raises a one-line InputError (exit code 3) naming the file and the problem,
without allocating for data that is not there and without leaving files behind."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_io import reoriented, unique_hu, write_dicom_series, write_nifti

from covfast.errors import EXIT_BAD_INPUT, InputError, OutputError
from covfast.io import find_inputs, load_array, load_mask_like, load_volume, write_nifti_like

RAS = np.diag([0.8, 0.8, 2.0, 1.0])


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def expect_input_error(folder: Path, call, named, *phrases) -> InputError:
    """Run ``call``; check the InputError names ``named`` and each phrase, and that ``folder`` is unchanged."""
    before = tree(folder)
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{named}: ")
    for phrase in phrases:
        assert phrase in message, message
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert tree(folder) == before
    return caught.value


def peak_allocation(call) -> int:
    """Peak bytes Python allocated while ``call`` ran (numpy buffers included)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def raw_nifti(path: Path, shape, dtype=np.int16, data_bytes: int = 0, compress: bool = False) -> Path:
    """A single-file NIfTI-1 whose header claims ``shape`` but which holds only ``data_bytes`` of voxel data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(RAS, code=1)
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\0" * 4 + b"\1" * data_bytes
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    expect_input_error(tmp_path, lambda: load_volume(missing), missing, "does not exist")
    expect_input_error(tmp_path, lambda: find_inputs([str(missing)]), missing, "does not exist")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.nii.gz", b"plain text, not a volume"),
        ("picture.nii", b"\x89PNG\r\n\x1a\n" + b"\0" * 400),
    ],
)
def test_neither_nifti_nor_dicom(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    expect_input_error(tmp_path, lambda: load_volume(path), path, "neither a NIfTI file", "nor a DICOM")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    expect_input_error(tmp_path, lambda: load_volume(path), path, "empty file (0 bytes)")


def without_orientation(path: Path, zooms) -> Path:
    """A NIfTI-1 with qform and sform codes 0 (only pixdim gives the grid) holding a small non-blank volume."""
    image = nib.Nifti1Image(unique_hu((6, 7, 8)), None)
    image.header["pixdim"][1:4] = zooms
    nib.save(image, path)
    return path


def test_no_orientation_and_no_voxel_size(tmp_path, capfd):
    path = without_orientation(tmp_path / "bare.nii.gz", [0.7, 0.7, 0.0])
    expect_input_error(tmp_path, lambda: load_volume(path), path, "no voxel size", "no qform or sform")
    assert capfd.readouterr().err == ""  # nibabel's own header-fix log line stays quiet


def test_no_orientation_is_loaded_with_a_warning(tmp_path):
    volume = load_volume(without_orientation(tmp_path / "bare.nii.gz", [0.7, 0.8, 2.5]))
    assert volume.spacing_mm == pytest.approx((2.5, 0.8, 0.7), abs=1e-6)  # canonical (D, H, W)
    assert any("no orientation" in w and "right and left may be swapped" in w for w in volume.warnings)
    oriented = load_volume(write_nifti(tmp_path / "ras.nii.gz", unique_hu((6, 7, 8)), RAS))
    assert not any("no orientation" in w for w in oriented.warnings)


def test_gzip_that_is_not_nifti(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"hello " * 200))
    expect_input_error(tmp_path, lambda: load_volume(path), path, "not a NIfTI file")


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images")
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "without DICOM files")
    expect_input_error(tmp_path, lambda: find_inputs([str(folder)]), folder, "no NIfTI files", "DICOM series")


def test_truncated_gzip(tmp_path):
    source, affine = reoriented(unique_hu((8, 9, 10)), (1, 1, 1), ("R", "A", "S"))
    whole = write_nifti(tmp_path / "whole.nii.gz", source, affine).read_bytes()
    for name, cut in [("half.nii.gz", len(whole) // 2), ("head.nii.gz", 40), ("trailer.nii.gz", len(whole) - 4)]:
        path = tmp_path / name
        path.write_bytes(whole[:cut])
        expect_input_error(tmp_path, lambda p=path: load_volume(p), path, "truncated")


def test_truncated_uncompressed(tmp_path):
    path = raw_nifti(tmp_path / "short.nii", (64, 64, 40), data_bytes=1000)
    expect_input_error(tmp_path, lambda: load_volume(path), path, "truncated", "(64, 64, 40)", "holds 1,000")


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 6, 2), (8, 8, 6, 3, 1)])
def test_not_3d(tmp_path, shape):
    path = write_nifti(tmp_path / "bad.nii.gz", np.full(shape, -1000, np.int16), RAS)
    expect_input_error(tmp_path, lambda: load_volume(path), path, f"{len(shape)}D array", "expected a 3D CT volume")
    expect_input_error(tmp_path, lambda: load_array(np.full(shape, -1000.0)), "<array>", f"{len(shape)}D array")


@pytest.mark.parametrize("value", [-1000, 0, 40])
def test_blank_volume(tmp_path, value):
    path = write_nifti(tmp_path / "blank.nii.gz", np.full((6, 7, 8), value, np.int16), RAS)
    expect_input_error(tmp_path, lambda: load_volume(path), path, f"same value ({value})", "blank volume")
    expect_input_error(tmp_path, lambda: load_array(np.full((6, 7, 8), float(value))), "<array>", "blank volume")


def test_zero_dimension(tmp_path):
    path = raw_nifti(tmp_path / "zero.nii", (8, 0, 6))
    expect_input_error(tmp_path, lambda: load_volume(path), path, "zero dimension")
    expect_input_error(tmp_path, lambda: load_array(np.zeros((4, 0, 5))), "<array>", "zero dimension")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(tmp_path, bad_value):
    data = np.full((6, 7, 8), -1000.0, np.float32)
    data[2, 3, 4] = bad_value
    path = write_nifti(tmp_path / "nan.nii.gz", data, RAS)
    expect_input_error(tmp_path, lambda: load_volume(path), path, "NaN or infinite")
    expect_input_error(tmp_path, lambda: load_array(data), "<array>", "NaN or infinite")


@pytest.mark.parametrize("compress", [False, True])
def test_enormous_header_refused_before_allocating(tmp_path, compress):
    path = raw_nifti(tmp_path / ("huge.nii.gz" if compress else "huge.nii"), (4096, 4096, 4096), compress=compress)
    peak = peak_allocation(lambda: expect_input_error(tmp_path, lambda: load_volume(path), path, "68,719,476,736"))
    assert peak < 4 * 2**20


def test_header_larger_than_the_file(tmp_path):
    # Within max_voxels, but a 1 MB .nii.gz cannot hold 100 M voxels: refused once its real content is known.
    path = raw_nifti(tmp_path / "liar.nii.gz", (512, 512, 400), data_bytes=2**20, compress=True)
    peak = peak_allocation(lambda: expect_input_error(tmp_path, lambda: load_volume(path), path, "holds 1,048,576"))
    assert peak < 16 * 2**20
    expect_input_error(tmp_path, lambda: load_volume(path, max_voxels=10**6), path, "more than the limit 1,000,000")


def test_windowed_8bit_nifti_and_array(tmp_path):
    grey = (np.arange(6 * 7 * 8) % 256).reshape(6, 7, 8).astype(np.uint8)
    path = write_nifti(tmp_path / "windowed.nii.gz", grey, RAS)
    expect_input_error(tmp_path, lambda: load_volume(path), path, "windowed 8-bit export", "not Hounsfield units")
    expect_input_error(tmp_path, lambda: load_array(grey.astype(np.float32)), "<array>", "windowed 8-bit export")


def test_no_negative_values_are_not_hounsfield_units(tmp_path):
    stored = unique_hu((6, 7, 8), start=0) * 7  # 0..2,345: e.g. HU + 1024 without the rescale intercept
    path = write_nifti(tmp_path / "unscaled.nii.gz", stored, RAS)
    expect_input_error(tmp_path, lambda: load_volume(path), path, "no negative values (range 0..2345)",
                       "not Hounsfield units")
    expect_input_error(tmp_path, lambda: load_array(stored.astype(np.float32)), "<array>", "no negative values")


def test_windowed_8bit_dicom(tmp_path):
    folder = tmp_path / "jpg_export"
    write_dicom_series(folder, unique_hu((4, 5, 6), start=0) % 200, bits=8, rescale=False)
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "windowed 8-bit export")


def rewrite_dicom(folder: Path, change) -> None:
    """Apply ``change(dataset)`` to every file of a DICOM folder."""
    import pydicom

    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        change(dataset)
        dataset.save_as(path)


def test_dicom_not_ct_or_no_pixel_spacing(tmp_path):
    folder = tmp_path / "mr"
    write_dicom_series(folder, unique_hu((4, 5, 6)))
    rewrite_dicom(folder, lambda d: setattr(d, "Modality", "MR"))
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "is a MR series, not CT")
    rewrite_dicom(folder, lambda d: setattr(d, "Modality", "CT"))
    assert load_volume(folder).hu.shape == (4, 5, 6)
    rewrite_dicom(folder, lambda d: delattr(d, "PixelSpacing"))
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "no PixelSpacing")


def test_dicom_missing_slices(tmp_path):
    folder = tmp_path / "gap"
    write_dicom_series(folder, unique_hu((8, 4, 4)), spacing=(2.0, 1.0, 1.0), skip=(4, 5))
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "missing slices", "gap of 6.00 mm", "2.00 mm")


def test_dicom_mixed_series_unknown_choice(tmp_path):
    folder = tmp_path / "mixed"
    first = write_dicom_series(folder, unique_hu((4, 4, 4)), seed=3)
    second = write_dicom_series(folder, unique_hu((3, 4, 4)), seed=4)
    expect_input_error(tmp_path, lambda: load_volume(folder, series="1.2.3"), folder, "no series 1.2.3", first, second)


def test_dicom_single_slice_and_single_file(tmp_path):
    folder = tmp_path / "one"
    write_dicom_series(folder, unique_hu((1, 4, 4)))
    expect_input_error(tmp_path, lambda: load_volume(folder), folder, "single slice")
    file = next(folder.iterdir())
    expect_input_error(tmp_path, lambda: load_volume(file), file, "single DICOM file", "folder")


def test_mask_not_on_the_volume_grid(tmp_path):
    source, affine = reoriented(unique_hu((4, 5, 6)), (2.0, 1.0, 1.0), ("R", "A", "S"))
    volume = load_volume(write_nifti(tmp_path / "ct.nii.gz", source, affine))
    moved = affine.copy()
    moved[0, 3] += 5.0
    cases = {
        "shape.nii.gz": (np.zeros((6, 5, 5), np.uint8), affine, "mask shape"),
        "moved.nii.gz": (np.zeros(source.shape, np.uint8), moved, "affine differs"),
        "labels.nii.gz": (np.full(source.shape, 255, np.uint8), affine, "expected labels 0/1 or 0/1/2"),
        "soft.nii.gz": (np.full(source.shape, 0.5, np.float32), affine, "fractional"),
    }
    for name, (data, mask_affine, phrase) in cases.items():
        path = write_nifti(tmp_path / name, data, mask_affine)
        expect_input_error(tmp_path, lambda p=path: load_mask_like(p, volume), path, phrase)
    missing = tmp_path / "missing.nii.gz"
    expect_input_error(tmp_path, lambda: load_mask_like(missing, volume), missing, "does not exist")


def test_unwritable_output_leaves_nothing(tmp_path):
    volume = load_array(unique_hu((3, 4, 5)))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "mask.nii.gz"
    with pytest.raises(OutputError) as caught:
        write_nifti_like(volume, np.zeros((3, 4, 5), np.uint8), target)
    assert str(caught.value).startswith(f"{target}: cannot write")
    assert tree(tmp_path) == ["a_file"]
