"""CT volume I/O: NIfTI and DICOM reading, canonical orientation, mask writing, input discovery, the sample.

Synthetic volumes are written into tmp_path; tests on the real COVID-CT-MD data skip when ../shared/data is
missing. The writers here are also used by test_io_bad_input.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import covfast.io.dicom
from covfast.errors import InputError, OutputError
from covfast.io import (
    Volume,
    atomic_write,
    canonical_affine,
    find_inputs,
    load_array,
    load_mask_like,
    load_volume,
    sample_path,
    write_nifti_like,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
P001 = DATA / "covid-ct-md" / "P001"
needs_data = pytest.mark.skipif(not P001.is_dir(), reason="../shared/data/covid-ct-md is not present")

CANONICAL = ("S", "P", "L")


def unique_hu(shape, start=-1000) -> np.ndarray:
    """[D, H, W] int16 volume whose voxels all differ, so any misplaced voxel shows; air-like negative values."""
    return (start + np.arange(np.prod(shape))).reshape(shape).astype(np.int16)


def write_nifti(path, data, affine, qform_code=1, sform_code=1, slope=None, inter=None, qform=None) -> Path:
    """Save a NIfTI-1 file with explicit qform/sform (``qform`` may differ from the sform ``affine``)."""
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine if qform is None else qform, code=qform_code)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return Path(path)


def reoriented(canonical: np.ndarray, spacing, axcodes) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored with other array axes: (source array, its RAS affine)."""
    canonical_aff = np.zeros((4, 4))
    canonical_aff[2, 0], canonical_aff[1, 1], canonical_aff[0, 2] = spacing[0], -spacing[1], -spacing[2]
    canonical_aff[:, 3] = [12.5, -30.0, -200.0, 1.0]
    transform = ornt_transform(axcodes2ornt(CANONICAL), axcodes2ornt(axcodes))
    return apply_orientation(canonical, transform), canonical_aff @ inv_ornt_aff(transform, canonical.shape)


def _ct_dataset(sop_class: str) -> pydicom.Dataset:
    """A new CT instance of ``sop_class``: file meta (explicit VR little endian), SOP class and a new instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    return ds


def write_dicom_series(
    folder,
    hu: np.ndarray,
    spacing=(2.5, 0.8, 0.7),
    origin=(-100.0, -120.0, -300.0),
    series_uid: str | None = None,
    bits: int = 16,
    rescale: bool = True,
    slope: float = 1,
    skip: tuple = (),
    seed: int = 0,
    orientation=(1, 0, 0, 0, 1, 0),
    attributes: dict | None = None,
) -> str:
    """Write an uncompressed axial (head-first supine) DICOM series with shuffled file names.

    Args:
        folder: created if missing.
        hu: [N, rows, columns] HU in canonical order (slices inferior -> superior).
        spacing: (slice, row, column) mm.
        origin: LPS position of slice 0's first voxel.
        series_uid: SeriesInstanceUID (new if None).
        bits: 16 (stored = HU + 1024, RescaleIntercept -1024) or 8 (raw 8-bit pixels).
        rescale: write RescaleSlope/RescaleIntercept.
        slope: RescaleSlope written (HU then are ``stored * slope - 1024``, not ``hu``).
        skip: slice indices not written (to make gaps).
        seed: shuffles the file names.
        orientation: ImageOrientationPatient; slice k lies at ``origin + k * spacing[0]`` along its normal.
        attributes: further attributes written into every file (e.g. StudyInstanceUID).

    Returns:
        The SeriesInstanceUID.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = list(range(hu.shape[0]))
    random.Random(seed).shuffle(order)
    for name_index, k in enumerate(order):
        if k in skip:
            continue
        ds = _ct_dataset(CTImageStorage)
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        normal = np.cross(orientation[:3], orientation[3:])
        ds.ImagePositionPatient = [float(o + k * spacing[0] * n) for o, n in zip(origin, normal)]
        ds.ImageOrientationPatient = list(orientation)
        for name, value in (attributes or {}).items():
            setattr(ds, name, value)
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if rescale:
            ds.RescaleSlope, ds.RescaleIntercept = slope, -1024 if bits == 16 else 0
        stored = (hu[k].astype(np.int32) + (1024 if bits == 16 and rescale else 0)).astype(f"<u{bits // 8}")
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{name_index:04d}_{random.Random(k).randint(0, 9999)}.dcm", enforce_file_format=True)
    return series_uid


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def write_enhanced_ct(path, hu: np.ndarray, spacing=(2.5, 0.8, 0.7), origin=(-100.0, -120.0, -300.0),
                      orientation=(1, 0, 0, 0, 1, 0), frame_order=None, intercepts=None, positions=True,
                      attributes: dict | None = None) -> Path:
    """Write one enhanced (multi-frame) CT image file of ``hu`` ([N, rows, columns], slices inferior -> superior).

    Args:
        frame_order: canonical slice index of each stored frame (default in order).
        intercepts: per-slice RescaleIntercept written per frame (default one shared -1024).
        positions: False leaves the per-frame PlanePositionSequence out.
        attributes: further top-level attributes (e.g. StudyInstanceUID).
    """
    from pydicom.sequence import Sequence

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = list(range(hu.shape[0])) if frame_order is None else list(frame_order)
    normal = np.cross(orientation[:3], orientation[3:])
    ds = _ct_dataset(ENHANCED_CT)
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = hu.shape[1], hu.shape[2], len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    measures, plane = pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing[1], spacing[2]], spacing[0]
    plane.ImageOrientationPatient = list(orientation)
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    if intercepts is None:
        transform = pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
        shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, stored = [], []
    for k in order:
        groups = pydicom.Dataset()
        if positions:
            position = pydicom.Dataset()
            position.ImagePositionPatient = [float(o + k * spacing[0] * n) for o, n in zip(origin, normal)]
            groups.PlanePositionSequence = Sequence([position])
        intercept = -1024 if intercepts is None else intercepts[k]
        if intercepts is not None:
            transform = pydicom.Dataset()
            transform.RescaleSlope, transform.RescaleIntercept = 1, intercept
            groups.PixelValueTransformationSequence = Sequence([transform])
        frames.append(groups)
        stored.append((hu[k].astype(np.int32) - intercept).astype("<u2"))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for name, value in (attributes or {}).items():
        setattr(ds, name, value)
    ds.PixelData = np.stack(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- NIfTI


@pytest.mark.parametrize(
    "axcodes", [("S", "P", "L"), ("R", "A", "S"), ("L", "P", "S"), ("L", "A", "I"), ("A", "S", "R"), ("I", "L", "P")]
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_any_orientation_loads_canonical(tmp_path, axcodes, suffix):
    canonical = unique_hu((5, 6, 7))
    spacing = (3.0, 0.75, 0.5)
    source, affine = reoriented(canonical, spacing, axcodes)
    path = write_nifti(tmp_path / f"ct{suffix}", source, affine)

    volume = load_volume(path)

    assert volume.kind == "nifti" and volume.path == str(path)
    assert volume.hu.dtype == np.int16 and volume.hu.flags.c_contiguous
    np.testing.assert_array_equal(volume.hu, canonical)
    np.testing.assert_allclose(volume.spacing_mm, spacing)
    np.testing.assert_allclose(volume.z_mm, -200.0 + 3.0 * np.arange(5))
    assert volume.source_shape == source.shape
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(volume.to_source(volume.hu), source)
    np.testing.assert_array_equal(volume.to_source(volume.from_source(source)), source)
    np.testing.assert_allclose(canonical_affine(volume.affine, volume.source_shape)[:3, 3], [12.5, -30.0, -200.0])


def test_ras_nifti_orientation_by_hand(tmp_path):
    """Independent of nibabel's orientation code: RAS+ storage mapped to (S, P, L) by explicit indexing."""
    ras = unique_hu((4, 5, 6))  # [x: left -> right, y: posterior -> anterior, z: inferior -> superior]
    volume = load_volume(write_nifti(tmp_path / "ras.nii.gz", ras, np.diag([0.5, 0.6, 2.0, 1.0])))
    nx, ny, nz = ras.shape
    for d, h, w in [(0, 0, 0), (5, 4, 3), (2, 1, 3), (nz - 1, 0, nx - 1)]:
        assert volume.hu[d, h, w] == ras[nx - 1 - w, ny - 1 - h, d]
    np.testing.assert_allclose(volume.spacing_mm, (2.0, 0.6, 0.5), rtol=1e-6)


def test_nifti_scaling_and_dtypes(tmp_path):
    canonical = unique_hu((3, 4, 5))
    source, affine = reoriented(canonical, (1, 1, 1), ("R", "A", "S"))

    stored = (source.astype(np.int32) + 1024).astype(np.uint16)
    scaled = load_volume(write_nifti(tmp_path / "u16.nii", stored, affine, slope=1.0, inter=-1024.0))
    assert scaled.hu.dtype == np.int16
    np.testing.assert_array_equal(scaled.hu, canonical)

    halves = load_volume(write_nifti(tmp_path / "f32.nii", source.astype(np.float32) + 0.5, affine))
    assert halves.hu.dtype == np.float32
    np.testing.assert_array_equal(halves.hu, canonical + 0.5)

    whole_floats = load_volume(write_nifti(tmp_path / "f64.nii.gz", source.astype(np.float64), affine))
    assert whole_floats.hu.dtype == np.int16
    np.testing.assert_array_equal(whole_floats.hu, canonical)

    wide = source.astype(np.int32) * 40  # down to -40000: beyond int16
    assert load_volume(write_nifti(tmp_path / "i32.nii", wide, affine)).hu.dtype == np.float32


def test_trailing_singleton_4d_is_a_volume(tmp_path):
    canonical = unique_hu((3, 4, 5))
    source, affine = reoriented(canonical, (1, 1, 1), ("L", "P", "S"))
    volume = load_volume(write_nifti(tmp_path / "4d.nii.gz", source[..., None], affine))
    np.testing.assert_array_equal(volume.hu, canonical)
    assert volume.source_shape == source.shape


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_nifti_like_keeps_the_exact_grid(tmp_path, suffix):
    canonical = unique_hu((4, 5, 6))
    source, affine = reoriented(canonical, (2.0, 0.9, 0.8), ("A", "S", "R"))
    # qform and sform deliberately differ (shifted origin, other codes): both must survive.
    qform = affine.copy()
    qform[:3, 3] += [1.0, 2.0, 3.0]
    path = write_nifti(tmp_path / "ct.nii.gz", source, affine, qform_code=1, sform_code=2, qform=qform)
    volume = load_volume(path)
    mask = (volume.hu % 3).astype(np.uint8)

    out = tmp_path / f"mask{suffix}"
    write_nifti_like(volume, mask, out)

    written, original = nib.load(out), nib.load(path)
    assert written.shape == original.shape and written.get_data_dtype() == np.uint8
    for matrix in ("get_qform", "get_sform"):
        got, code = getattr(written.header, matrix)(coded=True)
        want, want_code = getattr(original.header, matrix)(coded=True)
        np.testing.assert_array_equal(got, want)
        assert code == want_code
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), volume.to_source(mask))
    np.testing.assert_array_equal(load_mask_like(out, volume), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii.gz", out.name])


def test_nifti2_loads_and_masks_keep_nifti2(tmp_path):
    canonical = unique_hu((3, 4, 5))
    source, affine = reoriented(canonical, (2.0, 1.0, 1.5), ("R", "P", "I"))
    nib.save(nib.Nifti2Image(source, affine), tmp_path / "ct2.nii.gz")
    volume = load_volume(tmp_path / "ct2.nii.gz")
    np.testing.assert_array_equal(volume.hu, canonical)
    write_nifti_like(volume, np.ones(canonical.shape, np.uint8), tmp_path / "mask2.nii.gz")
    written = nib.load(tmp_path / "mask2.nii.gz")
    assert isinstance(written, nib.Nifti2Image) and written.shape == source.shape
    np.testing.assert_allclose(written.affine, affine)


def test_load_array_is_canonical_as_given():
    hu = unique_hu((3, 4, 5)).astype(np.float32)
    volume = load_array(hu, spacing_mm=(2.0, 0.5, 0.7))
    assert volume.kind == "array" and volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_array_equal(volume.to_source(volume.hu), hu)
    assert volume.spacing_mm == (2.0, 0.5, 0.7)
    np.testing.assert_allclose(volume.z_mm, [0.0, 2.0, 4.0])
    assert volume.sha256 == hashlib.sha256(hu.astype(np.int16).tobytes()).hexdigest()


# ---------------------------------------------------------------- DICOM


def test_dicom_series_order_hu_and_geometry(tmp_path):
    hu = unique_hu((6, 4, 5))
    folder = tmp_path / "series"
    uid = write_dicom_series(folder, hu, spacing=(2.5, 0.8, 0.7), origin=(-100.0, -120.0, -300.0))
    (folder / "README.txt").write_text("not DICOM")

    volume = load_volume(folder)

    assert volume.kind == "dicom" and volume.series_uid == uid and volume.warnings == []
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.source_shape == (5, 4, 6)
    np.testing.assert_allclose(volume.spacing_mm, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(volume.z_mm, -300.0 + 2.5 * np.arange(6))
    # LPS (-100, -120, -300) is RAS (100, 120, -300); columns go to the patient's left (-x in RAS).
    expected = np.array([[-0.7, 0, 0, 100.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, expected)
    assert (volume.qform_code, volume.sform_code) == (1, 1)
    instance_order = sorted(folder.glob("*.dcm"), key=lambda p: pydicom.dcmread(p).InstanceNumber)
    assert volume.sha256 == hashlib.sha256(b"".join(p.read_bytes() for p in instance_order)).hexdigest()

    write_nifti_like(volume, (volume.hu > -990).astype(np.uint8), tmp_path / "mask.nii.gz")
    written = nib.load(tmp_path / "mask.nii.gz")
    assert written.shape == volume.source_shape
    np.testing.assert_allclose(written.affine, expected, atol=1e-5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    np.testing.assert_array_equal(load_mask_like(tmp_path / "mask.nii.gz", volume), volume.hu > -990)
    # Quantised probabilities: stored uint8, read back through scl_slope (the DICOM grid has no source header).
    levels = (np.arange(volume.hu.size) % 256).reshape(volume.hu.shape).astype(np.uint8)
    write_nifti_like(volume, levels, tmp_path / "prob.nii.gz", scale=1 / 255)
    back = nib.load(tmp_path / "prob.nii.gz")
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(volume.from_source(back.get_fdata()), levels / 255, atol=1e-6)


def test_dicom_two_series_largest_with_warning_or_chosen(tmp_path):
    folder = tmp_path / "mixed"
    big = write_dicom_series(folder, unique_hu((5, 4, 4)), seed=1)
    small = write_dicom_series(folder, unique_hu((3, 4, 4), start=-500), seed=2)

    volume = load_volume(folder)
    assert volume.series_uid == big and volume.hu.shape == (5, 4, 4)
    assert len(volume.warnings) == 1 and small in volume.warnings[0] and "--series" in volume.warnings[0]

    chosen = load_volume(folder, series=small)
    assert chosen.series_uid == small and chosen.warnings == []
    np.testing.assert_array_equal(chosen.hu, unique_hu((3, 4, 4), start=-500))


def _add_stray(folder: Path, series_uid: str, name: str, orientation=None, image_type=None, shape=(6, 5)):
    """Write one more image into ``folder``'s series: another orientation / size / ImageType (a localizer)."""
    scratch = folder.parent / f"scratch_{name}"
    write_dicom_series(scratch, unique_hu((1, *shape)), series_uid=series_uid)
    (source,) = scratch.iterdir()
    dataset = pydicom.dcmread(source)
    if orientation is not None:
        dataset.ImageOrientationPatient = orientation
    if image_type is not None:
        dataset.ImageType = image_type
    dataset.save_as(folder / f"{name}.dcm", enforce_file_format=True)


@pytest.mark.parametrize(
    "stray",
    [
        {"orientation": [1, 0, 0, 0, 0, -1], "shape": (6, 5)},  # a coronal scout of another size
        {"orientation": [1, 0, 0, 0, 0, -1], "shape": (4, 4)},  # a coronal scout of the same size
        {"image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "shape": (4, 4)},  # axial, flagged a localizer
    ],
)
def test_dicom_localizer_in_the_series_is_left_out_with_a_warning(tmp_path, stray):
    folder = tmp_path / "with_scout"
    hu = unique_hu((8, 4, 4))
    uid = write_dicom_series(folder, hu)
    _add_stray(folder, uid, "scout", **stray)
    volume = load_volume(folder)
    np.testing.assert_array_equal(volume.hu, hu)
    assert len(volume.warnings) == 1 and "left out 1 image(s)" in volume.warnings[0] and uid in volume.warnings[0]


def test_dicom_series_that_really_mixes_orientations_is_refused(tmp_path):
    folder = tmp_path / "mixed_orientation"
    uid = write_dicom_series(folder, unique_hu((6, 4, 4)))
    for k in range(4):
        _add_stray(folder, uid, f"coronal{k}", orientation=[1, 0, 0, 0, 0, -1])
    with pytest.raises(InputError, match="mixes slice orientations"):
        load_volume(folder)


@pytest.mark.parametrize("slope", [0.5, 20])
def test_dicom_rescale_beyond_int16_or_fractional_gives_float32(tmp_path, slope):
    hu = unique_hu((3, 4, 5), start=1000)  # stored 2024..2083: times 20 is beyond int16
    hu[0, 0, 0] = -1000  # some air (stored 24): a CT without negative HU is refused
    write_dicom_series(tmp_path / "series", hu, slope=slope)
    volume = load_volume(tmp_path / "series")
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, (hu.astype(np.float64) + 1024) * slope - 1024)


# ---------------------------------------------------------------- outputs and discovery


def test_atomic_write_replaces_or_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    atomic_write(target, lambda f: f.write(b"{}"))
    assert target.read_bytes() == b"{}"

    def fail(file):
        file.write(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]

    with pytest.raises(OutputError, match=re.escape(str(tmp_path / "missing" / "x.json"))):
        atomic_write(tmp_path / "missing" / "x.json", lambda f: f.write(b"{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_find_inputs_expands_folders(tmp_path):
    canonical = unique_hu((3, 4, 5))
    source, affine = reoriented(canonical, (1, 1, 1), ("R", "A", "S"))
    write_nifti(tmp_path / "b.nii.gz", source, affine)
    write_nifti(tmp_path / "a.nii", source, affine)
    (tmp_path / "notes.txt").write_text("ignored")
    write_dicom_series(tmp_path / "patient" / "study" / "series1", canonical)
    write_dicom_series(tmp_path / "patient" / "series0", canonical)

    expected = [
        str(tmp_path / "a.nii"),
        str(tmp_path / "b.nii.gz"),
        str(tmp_path / "patient" / "series0"),
        str(tmp_path / "patient" / "study" / "series1"),
    ]
    assert find_inputs([str(tmp_path)]) == expected
    series_folder = str(tmp_path / "patient" / "series0")
    assert find_inputs([series_folder, str(tmp_path / "a.nii"), series_folder]) == [
        series_folder,
        str(tmp_path / "a.nii"),
    ]


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def p001() -> Volume:
    return load_volume(P001)


@needs_data
def test_p001_loads_in_slice_location_order(p001):
    labels = json.loads((P001.parent / "labels.json").read_text())["P001"]
    assert p001.hu.shape == (148, 512, 512) and p001.hu.dtype == np.int16
    assert p001.source_shape == (512, 512, 148)
    np.testing.assert_allclose(p001.z_mm, labels["slice_location_mm"], atol=1e-3)
    first = pydicom.dcmread(P001 / labels["files_in_order"][0])
    stored = first.pixel_array.astype(np.int32) * int(first.RescaleSlope) + int(first.RescaleIntercept)
    np.testing.assert_array_equal(p001.hu[0], stored)
    np.testing.assert_allclose(p001.spacing_mm, (2.0, 0.748046875, 0.748046875))


@needs_data
def test_jpeg_lossless_decoders_agree(tmp_path, monkeypatch):
    """The libjpeg-turbo fast path (imagecodecs) and pydicom's pylibjpeg path give identical HU."""
    labels = json.loads((P001.parent / "labels.json").read_text())["P001"]
    for name in labels["files_in_order"][60:64]:
        (tmp_path / name).write_bytes((P001 / name).read_bytes())
    fast = load_volume(tmp_path)
    monkeypatch.setattr(covfast.io.dicom, "imagecodecs", None)
    plain = load_volume(tmp_path)
    assert fast.hu.shape == (4, 512, 512)
    np.testing.assert_array_equal(fast.hu, plain.hu)


@needs_data
def test_p001_hounsfield_range_and_anatomy(p001):
    hu = p001.hu
    assert -1100 <= hu.min() <= -900 and 1000 <= hu.max() <= 4000
    assert np.median(hu[:, :16, :16]) < -900  # air in the field-of-view corner
    depth, height, width = hu.shape
    # Along the midline, bone (vertebrae, and the table under the back) lies posterior (high H), the thin sternum
    # anterior.
    midline_bone = hu[:, :, width // 2 - 32 : width // 2 + 32] > 200
    assert midline_bone[:, height // 2 :].sum() > 4 * midline_bone[:, : height // 2].sum()
    # The liver dominates the patient's right side in the lower chest: soft tissue at low W.
    lower = hu[depth // 10 : depth // 4]
    liver_like = (lower > 40) & (lower < 90)
    assert liver_like[..., : width // 2].sum() > 1.5 * liver_like[..., width // 2 :].sum()


@needs_data
def test_p001_mask_round_trip_on_dicom_grid(p001, tmp_path):
    lung_like = (p001.hu < -500).astype(np.uint8)
    write_nifti_like(p001, lung_like, tmp_path / "lung.nii.gz")
    written = nib.load(tmp_path / "lung.nii.gz")
    assert written.shape == (512, 512, 148)
    np.testing.assert_allclose(written.affine, p001.affine, atol=1e-4)
    np.testing.assert_array_equal(load_mask_like(tmp_path / "lung.nii.gz", p001), lung_like)


def test_sample_loads_as_recorded():
    path = Path(sample_path())
    record = (path.parent / "SAMPLE.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in record
    assert path.stat().st_size <= 8 * 2**20
    volume = load_volume(path)
    assert volume.hu.shape == (74, 256, 256) and volume.hu.dtype == np.int16
    np.testing.assert_allclose(volume.spacing_mm, (4.0, 1.49609375, 1.49609375))
    assert -1030 <= volume.hu.min() <= -1000 and np.median(volume.hu[:, :8, :8]) < -900


@needs_data
def test_sample_is_block_mean_of_p001(p001):
    sample = load_volume(sample_path())
    block_mean = p001.hu.reshape(74, 2, 256, 2, 256, 2).mean(axis=(1, 3, 5))
    assert np.abs(sample.hu - block_mean).max() <= 0.5
    np.testing.assert_allclose(sample.z_mm, p001.z_mm.reshape(74, 2).mean(axis=1), atol=1e-3)


# ---------------------------------------------------------------- enhanced (multi-frame) DICOM CT


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0)], ids=["axial", "rotated"])
def test_enhanced_ct_loads_like_the_same_slices_as_a_series(tmp_path, orientation):
    hu = unique_hu((6, 5, 4))
    write_dicom_series(tmp_path / "series", hu, orientation=orientation)
    frame_order = [3, 0, 5, 1, 4, 2]  # stored out of order: the positions decide
    file = write_enhanced_ct(tmp_path / "enhanced" / "ct.dcm", hu, orientation=orientation, frame_order=frame_order)

    series = load_volume(tmp_path / "series")
    for target in (file, tmp_path / "enhanced"):  # the file itself or the folder holding it
        volume = load_volume(target)
        assert volume.kind == "dicom" and volume.path == str(target)
        np.testing.assert_array_equal(volume.hu, series.hu)
        np.testing.assert_allclose(volume.affine, series.affine, atol=1e-6)
        np.testing.assert_allclose(volume.spacing_mm, series.spacing_mm)
        np.testing.assert_allclose(volume.z_mm, series.z_mm)
        # What a DICOM SEG references: the one image, and its frame of each source slice (inferior -> superior here).
        assert len(volume.source_headers) == 1 and "PixelData" not in volume.source_headers[0]
        assert volume.source_frames == [frame_order.index(k) for k in range(6)]
        assert volume.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()


def test_enhanced_ct_rescales_each_frame_by_its_own_intercept(tmp_path):
    hu = unique_hu((4, 3, 3))
    file = write_enhanced_ct(tmp_path / "ct.dcm", hu, intercepts=[-1024, -1000, -2048, -1024])
    write_dicom_series(tmp_path / "series", hu)  # the same slices as a plain series, rescaled by -1024 throughout
    np.testing.assert_array_equal(load_volume(file).hu, load_volume(tmp_path / "series").hu)


def test_enhanced_ct_without_frame_positions_and_lone_slices_are_refused(tmp_path):
    file = write_enhanced_ct(tmp_path / "ct.dcm", unique_hu((3, 4, 4)), positions=False)
    with pytest.raises(InputError, match="no position or orientation"):
        load_volume(file)
    write_dicom_series(tmp_path / "series", unique_hu((3, 4, 4)))
    lone = next((tmp_path / "series").iterdir())
    with pytest.raises(InputError, match="single DICOM file; pass the folder"):
        load_volume(lone)
