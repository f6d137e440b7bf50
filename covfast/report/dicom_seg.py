"""The masks as a DICOM Segmentation object (``segmentation.dcm``) that references the input series.

For DICOM inputs (a series of slices, or one enhanced multi-frame image), ``covfast infer --dicom-seg`` writes the right and left lung and the infection (GGO and
consolidation, or one infection segment when only the single-class model ran) as one binary DICOM SEG instance in the
input's study, one frame per source slice that has a segment in it, for viewers and archives that take DICOM SEG
to overlay on the original images. highdicom (``pip install covfast[dicom]``) builds the object; the
frames follow the source images' own pixel layout, whatever the orientation of the series.

Segment codes: the lungs are SCT 39607008 "Lung" with the laterality modifier
SCT 24028007 "Right" / SCT 7771000 "Left" (category SCT 91723000 "Anatomical Structure"); GGO is DCM 112120 "Ground
glass opacity"; consolidation SCT 95436008 "Lung consolidation" (the only one not in pydicom's code dictionary); the
single-class infection SCT 52988006 "Lesion"
(category SCT 49755003 "Morphologically Abnormal Structure").
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from covfast.errors import UsageError

FILENAME = "segmentation.dcm"
SERIES_NUMBER = 9901
# Type 2 attributes of the patient and study modules: highdicom copies them from the source, and anonymised series
# often lack them; they are then written empty, as the standard allows.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def require_highdicom() -> None:
    """Raise a UsageError (exit 2) naming the install command when highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UsageError("--dicom-seg needs highdicom: pip install 'covfast[dicom]'") from None


def missing_attributes(headers, multiframe: bool = False) -> list[str]:
    """Attributes a DICOM SEG needs that the source headers lack (empty when it can be written); a multi-frame
    image keeps its geometry in functional groups (checked when the slices were loaded)."""
    required = _REQUIRED[:5] if multiframe else _REQUIRED
    return [name for name in required if any(name not in ds for ds in headers)]


def _segments(version: str, infection: bool, multiclass: bool) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="covfast", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    anatomy, abnormal = codes.SCT.AnatomicalStructure, codes.SCT.MorphologicallyAbnormalStructure
    kinds = [("right lung", anatomy, codes.SCT.Lung, codes.SCT.Right),
             ("left lung", anatomy, codes.SCT.Lung, codes.SCT.Left)]
    if infection and multiclass:
        kinds += [("ground-glass opacity", abnormal, codes.DCM.GroundGlassOpacity, None),
                  ("consolidation", abnormal, hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation"), None)]
    elif infection:
        kinds += [("infection", abnormal, codes.SCT.Lesion, None)]
    segments = []
    for number, (label, category, kind, side) in enumerate(kinds, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        if side is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(side.value, side.scheme_designator, side.meaning)
            ]
        segments.append(description)
    return segments


def write_dicom_seg(volume, lung: np.ndarray, infection: np.ndarray | None, path, version: str) -> None:
    """Write the lung and infection masks of a DICOM input as a binary DICOM SEG file.

    Args:
        volume: the :class:`covfast.io.Volume` of a DICOM series (``source_headers`` set by the loader).
        lung: [D, H, W] uint8 canonical lung labels (1 right, 2 left).
        infection: [D, H, W] uint8 canonical infection mask (0/1, or 0/1/2 for GGO / consolidation) or None.
        path: the file to write.
        version: covfast's version, recorded as the algorithm's and the software's.

    Raises:
        ValueError: the volume is not a DICOM series with headers, or the headers lack what a SEG needs.
    """
    import highdicom as hd

    headers = getattr(volume, "source_headers", None)
    frame_numbers = getattr(volume, "source_frames", None)
    if volume.kind != "dicom":
        raise ValueError("a DICOM SEG needs a DICOM series input")
    if not headers:
        raise ValueError("the slices come from several multi-frame images; a DICOM SEG references one, or a series")
    missing = missing_attributes(headers, multiframe=frame_numbers is not None)
    if missing:
        raise ValueError(f"the series lacks {', '.join(missing)}")
    multiclass = infection is not None and bool((infection == 2).any())
    # Source grid (columns, rows, slices in the loader's order) -> frames [slice, row, column] of each source image.
    masks = [lung == 1, lung == 2]
    if infection is not None:
        masks += [infection == 1, infection == 2] if multiclass else [infection > 0]
    pixels = np.stack([volume.to_source(mask).transpose(2, 1, 0) for mask in masks], axis=-1)
    if frame_numbers is not None:  # the enhanced image's frame order, not the slices' spatial order
        stored = np.empty_like(pixels)
        stored[np.asarray(frame_numbers)] = pixels
        pixels = stored
    sources = []
    for header in headers:
        source = copy.copy(header)  # shallow: only top-level attributes are added
        for name in _TYPE2_COPIED:
            if name not in source:
                setattr(source, name, "")
        sources.append(source)
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(version, infection is not None, multiclass),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covfast",
        manufacturer_model_name="covfast",
        software_versions=version,
        device_serial_number="none",
        series_description="covfast lungs and infection",
        content_label="COVFAST",
        content_description="lungs (right, left) and COVID-19 infection",
    )
    segmentation.save_as(Path(path))
