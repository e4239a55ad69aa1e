"""The one table of what an input may declare, inflate to or hold, checked before the memory is spent.

A small file can declare far more than it holds: a PNG of 65 bytes 20000 x 20000 pixels, a
Deflated DICOM of 1 MB a 1 GiB tag, a ``.nii.gz`` of 500 KB a 512 MiB slice, a 15 MB DICOM
300,000 sequence items (each a Python object when parsed). The readers
(:mod:`ctmask.scans`) check each of these limits on what the file declares, or while
streaming it (inflating with a cap, counting items without building them), and refuse the
file with a :class:`~ctmask.core.errors.DataError` naming it and the limit.

With these limits, reading one input (probe and decode of a slice) takes at most
:data:`PEAK_BYTES_BOUND` of memory above what the process held before; nothing read stays
in memory after the slice is decoded, but for the thread's cursor into the gzip stream of the
NIfTI volume being read (its decoder state, no voxels).
"""

from __future__ import annotations

from ctmask.core.preprocess import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

MiB = 1 << 20

MAX_SLICES = 8192
"""Most slices one file may declare (frames of a DICOM, slices of a NIfTI volume)."""

MAX_SLICE_BYTES = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 4
"""Most bytes one stored slice may hold (256 MiB: 8192 x 8192 values of 4 bytes, the size of the
decoded float32 slice); an 8192 x 8192 float64 NIfTI slice (512 MiB) is refused."""

MAX_INFLATED_BYTES = MAX_SLICE_BYTES
"""Most bytes a Deflated Explicit VR DICOM (1.2.840.10008.1.2.1.99) may inflate to: pydicom
inflates the whole data set at once, so the stream is first inflated here, chunk by chunk and
counted, and refused past this."""

MAX_SEQUENCE_ITEMS = 16 * MAX_SLICES
"""Most sequence items (all sequences, nested ones included) one DICOM file may hold: an enhanced
CT of :data:`MAX_SLICES` frames has about 9 per frame. pydicom builds a Python object per item
(about 1 KB each), so they are counted on the raw bytes first."""

MAX_VOLUME_BYTES = 8 << 30
"""Most bytes a NIfTI volume may declare (its voxels as stored): it is never held whole, but a
``.nii.gz`` is inflated once while its slices are read, and this bounds that work."""

MAX_NIFTI_HEADER_BYTES = 64 * MiB
"""Most bytes before a NIfTI file's voxels (header and extensions, which nibabel reads whole)."""

PEAK_BYTES_BOUND = 4 * MAX_SLICE_BYTES
"""The memory one input may take while it is read (1 GiB): four times the largest slice."""

LIMITS = {
    "image_side": [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE],
    "slices_per_file": MAX_SLICES,
    "slice_bytes": MAX_SLICE_BYTES,
    "dicom_inflated_bytes": MAX_INFLATED_BYTES,
    "dicom_sequence_items": MAX_SEQUENCE_ITEMS,
    "nifti_volume_bytes": MAX_VOLUME_BYTES,
    "nifti_header_bytes": MAX_NIFTI_HEADER_BYTES,
    "peak_bytes_per_input": PEAK_BYTES_BOUND,
}
"""Every limit above by name (``ctmask serve`` shows it in ``/metadata``)."""


def mib(n: int) -> str:
    """``n`` bytes in MiB for messages (``"512 MiB"``)."""
    return f"{n / MiB:,.0f} MiB" if n >= MiB else f"{n:,} bytes"
