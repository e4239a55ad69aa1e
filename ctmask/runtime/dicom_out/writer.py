"""Per study, the DICOM result objects of one run written as files (what ``--dicom-out`` does).

Layout (file names depend only on the model's sha256 and the study, so a rerun replaces the
files; SOP Instance UIDs on the model, the source instances and what the object shows, so a
rerun of the same run makes the same UIDs and an object that says something else another)::

    DIR/<StudyInstanceUID>/ctmask-sr-<model12>.dcm        Comprehensive 3D SR, TID 1500
    DIR/<StudyInstanceUID>/ctmask-gsps-<model12>.dcm      Grayscale Softcopy Presentation State
    DIR/<StudyInstanceUID>/ctmask-sc-<model12>-<n>.dcm    Secondary Capture of driving slice n (--dicom-sc)

``<model12>`` is the first 12 hex digits of the model file's sha256. Only studies read from
DICOM get objects; the others are named in one warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctmask.core.errors import DataError
from ctmask.core.fileio import atomic_path, output_error
from ctmask.core.spec import GraphSpec
from ctmask.runtime.dicom_out.context import NOT_FOR_CLINICAL_USE, Algorithm, SourceSlice, file_sha256, read_source
from ctmask.scans.types import Failure

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class StudyObjects:
    """The files written for one study (``sc``: one per driving slice, with ``--dicom-sc``)."""

    study: str
    sr: str
    gsps: str
    sc: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [self.sr, self.gsps, *self.sc]

    def to_dict(self) -> dict:
        return {"study": self.study, "sr": self.sr, "gsps": self.gsps, "sc": self.sc}


@dataclass(frozen=True)
class DicomOptions:
    """Where and what: ``folder`` (``--dicom-out``), ``sc`` (``--dicom-sc``), ``top`` (detections
    shown per slice, ``--top-rois``), ``force_modality`` (``--force-modality``: the captures decode
    their slices again as the run read them)."""

    folder: Path
    sc: bool = False
    top: int = 5
    force_modality: bool = False


def write_dicom_results(records: list[dict], studies: list[dict], spec: GraphSpec, model: Path,
                        options: DicomOptions, warn: Callable[[str], None]) -> tuple[list[StudyObjects],
                                                                                     list[Failure]]:
    """Write the SR, the GSPS (and the SCs) of every study read from DICOM.

    Args:
        records: every slice record of the run (``Prediction.to_dict``).
        studies: the study records (``StudyPrediction.to_dict``).
        model: the model file run (its sha256 names the algorithm and seeds the UIDs).
        warn: told about the studies that get no objects because they are not DICOM.

    Returns:
        the objects written per study, and one failure per DICOM study whose objects could
        not be made (its sources unreadable or not decodable again, a multi-frame source): the
        other studies are written. A study's objects are all made before any is written, so
        a failed study gets no file.

    Raises:
        OutputPathError: a file could not be written (nothing half-written is left).
    """
    algorithm = Algorithm(file_sha256(model), spec.precision, spec.head)
    by_study: dict[str, list[dict]] = {}
    for rec in records:
        by_study.setdefault(str(rec.get("study") or rec["file"]), []).append(rec)
    written, failures, not_dicom = [], [], []
    for study in studies:
        members = by_study.get(str(study["study"]), [])
        if not members or not all(str(r.get("kind", "")).startswith("dicom") for r in members):
            not_dicom.append(str(study["study"]))
            continue
        try:
            with warnings.catch_warnings():  # highdicom's advice on the source's own values (a one-part
                # PatientName), repeated per object, is nothing the user of infer can act on
                warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)")
                written.append(_write_study(study, members, spec, algorithm, options))
        except (_Refused, ValueError, AttributeError, KeyError, TypeError) as exc:  # highdicom refuses the data
            failures.append(Failure(str(study["study"]), f"no DICOM result objects written: {exc}"))
    if not_dicom:
        warn(f"--dicom-out: no DICOM objects written for {len(not_dicom)} stud{'y' if len(not_dicom) == 1 else 'ies'} "
             f"read from PNG / NIfTI / other non-DICOM files (e.g. {not_dicom[0]}): only DICOM inputs get DICOM "
             "outputs (their source instances are what the objects reference)")
    return written, failures


class _Refused(Exception):
    """A study whose objects cannot be made (said in the failure)."""


def _sources(members: list[dict], study_uid: str) -> dict[str, SourceSlice]:
    """Each member's record with its source headers, by slice key."""
    out = {}
    for rec in members:
        if rec.get("frame") is not None:
            raise _Refused(f"{rec['file']} is a frame of a multi-frame file (not supported yet)")
        try:
            ds = read_source(rec["file"])
        except Exception as exc:  # any reading error of pydicom's: the study's failure, named
            raise _Refused(f"source {rec['file']} cannot be read back ({exc.__class__.__name__}: {exc})") from None
        uid = str(getattr(ds, "SOPInstanceUID", ""))
        if not _UID.match(uid) or str(getattr(ds, "StudyInstanceUID", "")) != study_uid:
            raise _Refused(f"source {rec['file']} has no valid SOPInstanceUID in study {study_uid}")
        out[str(rec.get("key") or rec["file"])] = SourceSlice(rec, ds)
    return out


def _write_study(study: dict, members: list[dict], spec: GraphSpec, algorithm: Algorithm,
                 options: DicomOptions) -> StudyObjects:
    from ctmask.runtime.dicom_out.gsps import build_gsps
    from ctmask.runtime.dicom_out.sc import build_sc
    from ctmask.runtime.dicom_out.sr import build_sr
    from ctmask.runtime.overlays import shown_detections

    study_uid = str(study["study"])
    if not _UID.match(study_uid) or len(study_uid) > 64:
        raise _Refused(f"study key {study_uid!r} is no valid StudyInstanceUID")
    sources = _sources(members, study_uid)
    for s in sources.values():
        s.detections = shown_detections(_Rec(s.record), options.top)
    driving = [sources[d["key"]] for d in study["driving"] if d["key"] in sources]
    boxed = [s for s in sources.values() if s.detections]
    seed = sorted(s.uid for s in sources.values())
    shown = _digest(study, driving, list(sources.values()), algorithm)  # what the SR and GSPS say
    folder = options.folder / study_uid
    tag = algorithm.tag
    describe = f"ctmask {{}} ({NOT_FOR_CLINICAL_USE})"
    sr = build_sr(study, driving, boxed, algorithm, algorithm.uid("series", "sr", study_uid),
                  algorithm.uid("sr", study_uid, shown, *seed), describe.format("SR")[:64])
    gsps = build_gsps(boxed or driving, algorithm, spec.window, algorithm.uid("series", "gsps", study_uid),
                      algorithm.uid("gsps", study_uid, shown, *seed), describe.format("GSPS")[:64])
    try:
        captures = [build_sc(s, n, algorithm, spec.window, algorithm.uid("series", "sc", study_uid),
                             algorithm.uid("sc", study_uid, s.uid, _digest(None, [], [s], algorithm)),
                             describe.format("SC")[:64], options.force_modality)
                    for n, s in enumerate(driving, 1)] if options.sc else []
    except DataError as exc:  # a slice that no longer decodes: this study's failure (an output error is the run's)
        raise _Refused(f"a capture cannot be made ({exc})") from None
    # every object made before the first is written: a study that fails gets no file
    objects = StudyObjects(study_uid, str(_save(sr, folder / f"ctmask-sr-{tag}.dcm")),
                           str(_save(gsps, folder / f"ctmask-gsps-{tag}.dcm")))
    for n, sc in enumerate(captures, 1):
        objects.sc.append(str(_save(sc, folder / f"ctmask-sc-{tag}-{n}.dcm")))
    keep = {Path(p).name for p in objects.files}
    for stale in folder.glob(f"ctmask-sc-{tag}-*.dcm"):  # an earlier run's captures of slices no longer driving
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return objects


def _digest(study: dict | None, driving: list[SourceSlice], sources: list[SourceSlice], algorithm: Algorithm) -> str:
    """sha256 of what an object shows: the study call, the driving instances, each source's call,
    probabilities and shown detections, the ctmask version (no paths). Part of the SOP Instance
    UID's name, so an object whose content differs (another --top-rois or --study-top-k, another
    ctmask's rule) is another instance: DICOM gives one content one UID, and a PACS keeping the
    first of two instances with one UID would keep the stale one."""
    import hashlib
    import json

    content = {"version": algorithm.version,
               "study": None if study is None else {k: study.get(k) for k in ("class", "probs", "rule")},
               "driving": [s.uid for s in driving],
               "slices": sorted([s.uid, s.record.get("class"), s.record.get("probs"), s.detections] for s in sources)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


class _Rec:
    """A slice record seen as the prediction :func:`shown_detections` takes."""

    def __init__(self, record: dict):
        self.detections = record.get("detections")


def _save(dataset, path: Path) -> Path:
    """Write ``dataset`` as a DICOM Part 10 file, atomically."""
    from pydicom import dcmwrite

    try:
        with atomic_path(path) as tmp:
            dcmwrite(tmp, dataset, enforce_file_format=True)
    except OSError as exc:
        raise output_error(exc, path) from None
    return path
