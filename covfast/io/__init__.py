"""CT volume input and mask output.

Reads NIfTI files and DICOM series folders into a :class:`Volume` (Hounsfield units, canonical orientation
D inferior -> superior, H anterior -> posterior, W patient right -> left) and writes masks back on the input's
exact grid. Every bad input raises :class:`covfast.errors.InputError` naming the file and the problem.
"""

from covfast.io.atomic import atomic_write
from covfast.io.dicom import load_dicom_series
from covfast.io.inputs import find_inputs, load_volume, sample_path
from covfast.io.nifti import load_mask_like, write_nifti_like
from covfast.io.volume import Volume, canonical_affine, load_array

__all__ = [
    "Volume",
    "atomic_write",
    "canonical_affine",
    "find_inputs",
    "load_array",
    "load_dicom_series",
    "load_mask_like",
    "load_volume",
    "sample_path",
    "write_nifti_like",
]
