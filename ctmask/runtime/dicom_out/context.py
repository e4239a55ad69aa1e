"""What every result object of a run shares: the algorithm's identity, deterministic UIDs,
the contributing equipment, and the source instances read back from their files."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ctmask import __version__

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE: research output of ctmask"
"""Written where the standard has a free-text place for it (series description, content
description, contribution description) and drawn on the presentation state and the capture."""
MANUFACTURER = "ctmask"
ALGORITHM = "COVID-CT-Mask-Net"


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Algorithm:
    """The model that made the results: ``model_sha256`` (of the model file run), its
    ``precision`` and ``head``, the ctmask ``version`` that ran it, and the ``rule`` names of
    the study call (``topk-mean/1 k=5``, per study)."""

    model_sha256: str
    precision: str
    head: str
    version: str = __version__

    @property
    def tag(self) -> str:
        """Short model tag in file names: the first 12 hex digits of the model's sha256."""
        return self.model_sha256[:12]

    def software_versions(self) -> list[str]:
        """Software Versions values (LO, 64 characters each): the model's sha256 is the Device
        Serial Number (64 hex digits) and the algorithm parameters of the SR."""
        return [f"ctmask {self.version}", f"precision {self.precision}", f"head {self.head}"]

    def identification(self, rule: str | None = None):
        """TID 4019 algorithm identification (name, version, parameters: model, precision, head, rule)."""
        import highdicom as hd

        params = [f"model sha256 {self.model_sha256}", f"precision {self.precision}", f"head {self.head}"]
        return hd.sr.AlgorithmIdentification(name=ALGORITHM, version=f"ctmask {self.version}",
                                             parameters=params + ([f"rule {rule}"] if rule else []))

    def equipment(self):
        """The Contributing Equipment item naming ctmask and the model (processing equipment)."""
        import highdicom as hd

        from ctmask.runtime.dicom_out.codes import code

        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=code("processing equipment"),
            manufacturer_model_name=f"{ALGORITHM} ({self.head} head, {self.precision})",
            software_versions=self.software_versions(), device_serial_number=self.model_sha256,
            contribution_description=NOT_FOR_CLINICAL_USE)

    def uid(self, *parts: str) -> str:
        """A UID derived from the model and ``parts`` only: ``2.25.<UUID>`` (PS3.5 B.2) with a
        name-based (version 5) UUID of them, so a rerun on the same sources makes the same UIDs
        and a PACS replaces rather than duplicates."""
        name = "\x1f".join(["ctmask", self.model_sha256, *parts])
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


_NAMESPACE = uuid.UUID("6f1c3e52-8a0d-5b7e-9c41-2d7a0e5f3b19")
"""The UUID namespace of ctmask's result UIDs (a fixed, arbitrary UUID)."""


@dataclass
class SourceSlice:
    """One predicted source instance: its JSONL record and its dataset (headers only)."""

    record: dict
    dataset: object
    detections: list[dict] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)  # type: ignore[attr-defined]

    @property
    def key(self) -> str:
        return str(self.record.get("key") or self.record["file"])


TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""The Type 2 attributes of the Patient and General Study modules the result objects copy from
their source: a source that leaves one out (many exports strip them) gets it empty, Type 2's
"unknown", so the objects are still made (highdicom reads each of them)."""


def read_source(path: str | Path):
    """The headers of a source DICOM file (no pixel data), as pydicom reads them, with the
    :data:`TYPE2_PATIENT_STUDY` attributes it lacks present and empty.

    Raises:
        OSError / pydicom's InvalidDicomError: the file cannot be read back.
    """
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def body_part(dataset) -> str:
    """The source's Body Part Examined (``CHEST`` where it names none: the model reads chest CT).
    A result image or presentation state carries it, so its General Series laterality
    (type 2C, for paired body parts) is known not to apply."""
    return str(getattr(dataset, "BodyPartExamined", "") or "CHEST")
