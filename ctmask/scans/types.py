"""What the readers of scans find and give: slices, failures, and what a file holds.

A :class:`SliceRef` names one slice (a PNG, one DICOM file, one frame of a multi-frame DICOM,
one axial slice of a NIfTI volume) and the series and study it belongs to; reading it gives
a :class:`DecodedSlice`: the windowed pixels in the file's own pixel frame, and how they were
rendered. A slice or file that cannot be read is a :class:`Failure`. Finding the slices
(:func:`ctmask.scans.listing.collect_sources`) and decoding them
(:func:`ctmask.scans.decode.read_slice`) live beside this module, shared with training.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ctmask.core.errors import DataError


@dataclass
class Failure:
    """A slice that could not be processed, and why.

    Attributes:
        file: the file (or slice key, ``path#frame``).
        reason: what is wrong with it, for people.
        error: what kind of refusal it is, for programs (``ctmask serve`` picks its HTTP status by
            it): :class:`~ctmask.core.errors.TooLargeError`,
            :class:`~ctmask.core.errors.UnsupportedFileError`, else
            :class:`~ctmask.core.errors.DataError`. Not compared, not written.
    """

    file: str
    reason: str
    error: type[DataError] = field(default=DataError, compare=False, repr=False)

    @classmethod
    def of(cls, file: str, exc: DataError) -> Failure:
        """The failure of ``file`` that ``exc`` says (its message, its type)."""
        return cls(file, exc.message, type(exc))

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.reason}


@dataclass(frozen=True)
class SliceRef:
    """One slice to predict.

    Attributes:
        path: the file that holds it.
        frame: index of the slice inside a multi-frame DICOM or a NIfTI volume (in the
            order they are predicted, see ``position``); ``None`` for a single-slice file.
        study: study key: the DICOM StudyInstanceUID, a NIfTI file's path, or for a loose
            image its own path (every loose image is a study of one slice).
        series: series key: SeriesInstanceUID, the NIfTI path, or the image path.
        position: position along the slice normal in mm (DICOM ImagePositionPatient
            projected on the normal, NIfTI affine), or InstanceNumber when positions are
            missing; ``None`` for a loose image. Slices of a series are sorted by it.
        label: what reports call the slice, e.g. ``series_dir/IM0001`` or ``ct.nii.gz[z=12]``.
        uid: the DICOM SOPInstanceUID ("" for other files).
        identity: what the slice is, whatever its path (:func:`with_identities`): ``--resume``
            matches records on it, so another spelling of the path or a moved archive does
            not predict a slice twice.
    """

    path: str
    frame: int | None = None
    study: str = ""
    series: str = ""
    position: float | None = None
    label: str = ""
    uid: str = ""
    identity: str = ""

    @property
    def key(self) -> str:
        """Unique id of the slice across a run (used by ``--resume``): path, plus ``#frame``."""
        return self.path if self.frame is None else f"{self.path}#{self.frame}"


def with_identities(refs: list[SliceRef]) -> list[SliceRef]:
    """``refs`` with their :attr:`SliceRef.identity`: ``dicom:<SOPInstanceUID>`` for DICOM,
    ``sha256:<hex of the file's bytes>`` for other files (and DICOM without the UID), plus
    ``#<frame>`` for a frame of a multi-frame DICOM or a NIfTI slice, plus ``~<n>`` for the n-th
    slice (n >= 2, in input order) with an identity an earlier one has: files identical byte
    for byte (the same slice exported twice) are each a slice of their own, predicted once and
    resumed once. Each file is read once; one that cannot be read keeps ``path:<key>`` (it will
    fail to decode anyway)."""
    digests: dict[str, str] = {}
    seen: dict[str, int] = {}

    def digest(path: str) -> str:
        if path not in digests:
            try:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
                digests[path] = f"sha256:{h.hexdigest()}"
            except OSError:
                digests[path] = ""
        return digests[path]

    out = []
    for ref in refs:
        # A valid UID is digits and dots; any other (hostile) UID is hashed, so a '#' or '~' in it
        # cannot take another slice's frame or copy identity.
        uid = ref.uid if not ref.uid or _UID.fullmatch(ref.uid) else \
            "sha256-" + hashlib.sha256(ref.uid.encode("utf-8", "surrogateescape")).hexdigest()
        base = f"dicom:{uid}" if uid else digest(ref.path)
        if not base:
            identity = f"path:{ref.key}"
        else:
            identity = base if ref.frame is None else f"{base}#{ref.frame}"
        seen[identity] = n = seen.get(identity, 0) + 1
        out.append(replace(ref, identity=identity if n == 1 else f"{identity}~{n}"))
    return out


_UID = re.compile(r"[0-9.]{1,64}")


@dataclass
class DecodedSlice:
    """A decoded slice: float32 [H, W] pixels in [0, 1] (lung-windowed), in the file's pixel frame.

    Attributes:
        ref: which slice.
        pixels: float32 [H, W] in [0, 1].
        kind: how it was rendered, e.g. ``dicom-hu`` (HU through the modality LUT, then the
            window), ``nifti-hu``, ``image-8bit`` (taken as already windowed),
            ``image-16bit-hu+1024`` (see docs/scans.md).
        info: facts worth reporting (modality, pixel spacing, rescale, warnings).
    """

    ref: SliceRef
    pixels: np.ndarray
    kind: str
    info: dict = field(default_factory=dict)


@dataclass
class DicomSlice:
    """A DICOM slice or frame found by its headers, still to be grouped into its series and ordered
    (:func:`ctmask.scans.listing.assemble`)."""

    path: Path
    label: str
    study: str
    series: str
    frame: int | None
    ipp: np.ndarray | None
    normal: np.ndarray | None
    instance: int | None
    uid: str = ""  # SOPInstanceUID: the slice's identity for `infer --resume`


@dataclass(frozen=True)
class FileTask:
    """One file found while listing the inputs, to be probed (:func:`~ctmask.scans.listing.probe_file`).

    Attributes:
        path: the file.
        label: what reports call it (relative to the input folder's parent).
        explicit: named on the command line (taken whatever its suffix) rather than found in a folder.
    """

    path: str
    label: str
    explicit: bool


@dataclass
class FileProbe:
    """What a file holds (:func:`~ctmask.scans.listing.probe_file`): ready slices (images, NIfTI),
    DICOM slices still to be grouped into series and ordered, or the reason it was refused.
    Picklable: probes may be computed in other processes (``infer --ray``) and assembled in the
    caller."""

    slices: list[SliceRef] = field(default_factory=list)
    dicom: list[DicomSlice] = field(default_factory=list)
    failure: str | None = None
    error: type[DataError] = DataError  # what kind of refusal ``failure`` is
    non_image: str = ""  # a DICOM object without an image, skipped: its modality (else SOP class)

    def refuse(self, exc: DataError) -> None:
        """Refuse the file for ``exc`` (its message and its kind)."""
        self.failure, self.error = exc.message, type(exc)
