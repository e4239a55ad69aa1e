"""What ``ctmask infer`` predicts: slices of files, DICOM series and volumes, grouped in studies.

A :class:`SliceRef` names one slice (a PNG, one DICOM file, one frame of a multi-frame DICOM,
one axial slice of a NIfTI volume) and the series and study it belongs to; reading it gives
a :class:`DecodedSlice`: the windowed pixels in the file's own pixel frame, and how they were
rendered. Finding the slices (:func:`ctmask.core.readers.collect_sources`) and decoding them
(:func:`ctmask.core.readers.read_slice`) live in :mod:`ctmask.core.readers`, shared with
training.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

import numpy as np


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
            ``image-16bit-hu+1024`` (see the README).
        info: facts worth reporting (modality, pixel spacing, rescale, warnings).
    """

    ref: SliceRef
    pixels: np.ndarray
    kind: str
    info: dict = field(default_factory=dict)
