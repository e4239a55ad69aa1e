"""Finding the slices in files and folders: listing, probing each file, assembling DICOM series.

:func:`collect_sources` expands files and folders into :class:`~ctmask.scans.types.SliceRef`
(one per slice, DICOM series and studies grouped and ordered) in three steps: :func:`list_inputs`
(no file opened), :func:`probe_file` (each file's headers; ``infer --ray`` runs them in Ray
tasks) and :func:`assemble`.

Folders are walked recursively in sorted order, hidden files and folders (``.name``) and
DICOMDIR skipped. Files with a raster or NIfTI suffix are taken as such; DICOM is a DICOM
suffix, the ``DICM`` marker, or (PACS exports: ``IM0001``, ``1.2.840...``) a file without suffix
or with a numeric one that pydicom reads (``force=True``, headers only) and that has Rows and
Columns. DICOM objects without an image (reports, presentation states, RT plans), the Secondary
Captures ``infer --dicom-sc`` writes (results, not slices: Manufacturer ``ctmask``) and other files
are skipped in folders, the DICOM ones counted by modality (else SOP class) in one
:class:`~ctmask.core.errors.CtmaskWarning` ("ignored 3 non-image DICOM objects: RTPLAN 3"); a
folder without any slice is a failure. DICOM slices sharing one SOPInstanceUID (and frame) are
copies of one instance: only the one in the largest file (a truncated copy is shorter), else the
first found, is kept, with one warning. DICOM slices are grouped by SeriesInstanceUID (files
without one: by folder) and StudyInstanceUID; ``frame`` of a multi-frame DICOM is the stored
frame index. Several slices of one DICOM series at the same position are all kept, with one
warning per series. Nothing about one file raises: it is a :class:`~ctmask.scans.types.Failure`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmask.core.errors import CtmaskWarning, DataError, UnsupportedFileError
from ctmask.scans.capture import error_text
from ctmask.scans.dicom import probe_dicom
from ctmask.scans.nifti import NiftiVolume
from ctmask.scans.sniff import NOT_AN_IMAGE, RASTER_SUFFIXES, is_raster, sniff
from ctmask.scans.types import DicomSlice, Failure, FileProbe, FileTask, SliceRef


@dataclass(frozen=True)
class _FolderMark:
    """Start (``end=False``) or end of an input folder's files in the listing."""

    root: str
    end: bool


def list_inputs(inputs: list[str | Path]) -> list[FileTask | Failure | _FolderMark]:
    """The files of ``inputs`` in input order (folders walked recursively, sorted; hidden files
    and folders skipped; each file once), paths that cannot be listed as failures. Cheap: no
    file is opened; :func:`probe_file` reads each one."""
    items: list[FileTask | Failure | _FolderMark] = []
    seen: set[str] = set()

    def add(path: Path, label: str, explicit: bool) -> None:
        try:
            key = str(path.resolve())
        except (OSError, RuntimeError):
            key = str(path.absolute())
        if key not in seen:
            seen.add(key)
            items.append(FileTask(str(path), label, explicit))

    for item in inputs:
        path = Path(item)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as exc:
            items.append(Failure(str(path), error_text("cannot read", exc)))
            continue
        if is_file:
            add(path, path.name, explicit=True)
        elif not is_dir:
            reason = "not a regular file or folder" if path.exists() else "no such file or folder"
            items.append(Failure(str(path), reason))
        else:
            items.append(_FolderMark(str(path), end=False))
            files: list[Path] = []

            def unreadable(exc: OSError, root: Path = path) -> None:
                items.append(Failure(str(exc.filename or root), error_text("cannot list folder", exc)))

            for folder, dirs, names in os.walk(path, onerror=unreadable):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                # Regular files only: opening a named pipe would wait for a writer forever.
                files.extend(p for p in (Path(folder) / n for n in names if not n.startswith(".")) if p.is_file())
            for file in sorted(files):
                try:
                    label = str(file.relative_to(path.parent)) if path.name not in ("", "..") else str(file)
                except ValueError:
                    label = str(file)
                add(file, label, explicit=False)
            items.append(_FolderMark(str(path), end=True))
    return items


def probe_file(task: FileTask, force_modality: bool = False) -> FileProbe:
    """What one file holds: its slices (headers only; no pixels are decoded), or why it is refused.

    Never raises for anything about the file: every problem is the probe's ``failure``.
    """
    path, label, explicit = Path(task.path), task.label, task.explicit
    probe = FileProbe()
    if path.name.upper() == "DICOMDIR":
        if explicit:
            probe.failure = "a DICOMDIR is the index of a DICOM medium, not an image: pass its folder"
        return probe
    try:
        kind = sniff(path)
    except OSError as exc:
        probe.failure = error_text("cannot read file", exc)
        return probe
    if kind == "image":
        probe.slices.append(SliceRef(path=str(path), study=str(path), series=str(path), label=label))
    elif kind == "nifti":
        try:
            vol = NiftiVolume.open(path)
            vol.check_present()
            probe.slices.extend(SliceRef(path=str(path), frame=k, study=str(path), series=str(path),
                                         position=vol.z_mm(k), label=f"{label}[z={k}]") for k in range(vol.nz))
        except DataError as exc:
            probe.refuse(exc)
        except Exception as exc:  # defensive: nothing about one file may stop the others
            probe.failure = error_text("cannot read NIfTI", exc)
    elif kind in ("dicom", "maybe-dicom") or explicit:
        if not probe_dicom(probe, path, label, kind == "dicom", explicit, force_modality) and explicit:
            if is_raster(path):
                probe.slices.append(SliceRef(path=str(path), study=str(path), series=str(path), label=label))
            else:
                probe.failure, probe.error = NOT_AN_IMAGE, UnsupportedFileError
    return probe


def assemble(items: list[FileTask | Failure | _FolderMark], probes: list[FileProbe]) -> tuple[list[SliceRef],
                                                                                             list[Failure]]:
    """The slices and failures of a listing (:func:`list_inputs`) from its files' probes (one per
    :class:`FileTask`, in listing order): DICOM slices grouped by series and ordered (a series
    comes where its first file does); a folder that gave no slice is a failure."""
    slots: list[list[SliceRef] | str] = []  # ready slices, or a series key
    series: dict[str, list[DicomSlice]] = {}
    failures: list[Failure] = []
    opened: list[tuple[int, int]] = []  # per open folder: slices and failures before it
    n_slices = 0
    non_image: dict[str, int] = {}
    probe_iter = iter(probes)
    for item in items:
        if isinstance(item, _FolderMark):
            if not item.end:
                opened.append((n_slices, len(failures)))
                continue
            before, failed = opened.pop()
            if n_slices == before:
                if len(failures) > failed:
                    failures.append(Failure(item.root, f"folder holds no readable slice ({len(failures) - failed} "
                                                       "files failed)"))
                else:
                    failures.append(Failure(item.root, "folder holds no image (" + " ".join(RASTER_SUFFIXES)
                                                       + "), DICOM or NIfTI file"))
        elif isinstance(item, FileTask):
            probe = next(probe_iter)
            if probe.failure is not None:
                failures.append(Failure(item.path, probe.failure, probe.error))
            if probe.slices:
                slots.append(probe.slices)
            if probe.non_image:
                non_image[probe.non_image] = non_image.get(probe.non_image, 0) + 1
            for e in probe.dicom:
                if e.series not in series:
                    series[e.series] = []
                    slots.append(e.series)
                series[e.series].append(e)
            n_slices += len(probe.slices) + len(probe.dicom)
        else:
            failures.append(item)
    if next(probe_iter, None) is not None:
        raise ValueError("more probes than files in the listing")
    copies = _drop_copies(series)
    if copies:
        copy, kept = copies[0]
        warnings.warn(f"{len(copies)} DICOM slice(s) dropped as copies of another file's (same SOPInstanceUID"
                      f"{' and frame' if copy.frame is not None else ''}; e.g. {copy.label} copies {kept.label}; the "
                      "largest file is kept): each instance is predicted once", CtmaskWarning, stacklevel=3)
    if non_image:
        n = sum(non_image.values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(non_image.items(), key=lambda kv: (-kv[1], kv[0])))
        warnings.warn(f"ignored {n} non-image DICOM object{'s' if n != 1 else ''}: {kinds}", CtmaskWarning,
                      stacklevel=3)
    refs: list[SliceRef] = []
    for slot in slots:
        if isinstance(slot, list):
            refs.extend(slot)
            continue
        for e, position in _order_series(slot, series[slot]):
            refs.append(SliceRef(path=str(e.path), frame=e.frame, study=e.study, series=e.series, position=position,
                                 label=e.label, uid=e.uid))
    return refs, failures


def _drop_copies(series: dict[str, list[DicomSlice]]) -> list[tuple[DicomSlice, DicomSlice]]:
    """Keep one slice per (SOPInstanceUID, frame) in ``series`` (edited in place): the one in the
    largest file (a truncated copy is shorter), else the first found; (dropped, kept) pairs."""
    groups: dict[tuple[str, int | None], list[DicomSlice]] = {}
    for entries in series.values():
        for e in entries:
            if e.uid:
                groups.setdefault((e.uid, e.frame), []).append(e)

    def size(e: DicomSlice) -> int:
        try:
            return e.path.stat().st_size
        except OSError:
            return -1

    pairs = []
    for group in groups.values():
        if len(group) > 1:
            kept = max(group, key=size)  # the first of the largest
            pairs += [(e, kept) for e in group if e is not kept]
    dropped = {id(e) for e, _ in pairs}
    for key in series:
        series[key] = [e for e in series[key] if id(e) not in dropped]
    return pairs


def _order_series(series: str, entries: list[DicomSlice]) -> list[tuple[DicomSlice, float | None]]:
    """Slices of one series in order: position along the slice normal, else InstanceNumber,
    else file name (and frame). Several slices at one position are kept, with a warning."""

    def name_key(e: DicomSlice) -> tuple:
        return (str(e.path), -1 if e.frame is None else e.frame)

    if all(e.ipp is not None for e in entries):
        normal = next((e.normal for e in entries if e.normal is not None), np.array([0.0, 0.0, 1.0]))
        tilted = [e for e in entries if e.normal is not None and abs(float(np.dot(e.normal, normal))) < 0.99]
        if tilted:
            warnings.warn(f"DICOM series {series}: {len(tilted)} of its {len(entries)} slices have another orientation "
                          f"than the first (e.g. {tilted[0].label}); all are ordered along the first slice's normal",
                          CtmaskWarning, stacklevel=4)
        pos = [float(np.dot(e.ipp, normal)) for e in entries]
        order = sorted(range(len(entries)), key=lambda i: (pos[i], entries[i].instance or 0, name_key(entries[i])))
        same = [(order[j - 1], order[j]) for j in range(1, len(order)) if abs(pos[order[j]] - pos[order[j - 1]]) < 1e-3]
        if same:
            a, b = same[0]
            warnings.warn(f"DICOM series {series}: {len(same)} of its {len(entries)} slices share their position "
                          f"with another (e.g. {entries[a].label} and {entries[b].label} at {pos[a]:.2f} mm); "
                          "all are kept and predicted", CtmaskWarning, stacklevel=4)
        return [(entries[i], pos[i]) for i in order]
    if all(e.instance is not None for e in entries):
        ordered = sorted(entries, key=lambda e: (e.instance, name_key(e)))
        return [(e, float(e.instance) if e.frame is None else None) for e in ordered]
    return [(e, None) for e in sorted(entries, key=name_key)]


def collect_sources(inputs: list[str | Path], force_modality: bool = False,
                    probe_all: Callable[[list[FileTask]], Iterable[FileProbe]] | None = None,
                    ) -> tuple[list[SliceRef], list[Failure]]:
    """Expand files and folders (recursively, in sorted order) into the slices to predict.

    Folders contribute raster images (:data:`RASTER_SUFFIXES`), NIfTI volumes (one slice per
    axial slice), DICOM files (a DICOM suffix, the ``DICM`` marker, or a file without suffix
    or with a numeric one that pydicom reads with ``force=True`` and that holds Rows and
    Columns); other files, hidden ones and DICOMDIR are skipped. A file given by name is
    also taken when Pillow recognises it. DICOM slices are grouped by SeriesInstanceUID
    (study: StudyInstanceUID) across all inputs and ordered by position along the slice
    normal, else InstanceNumber, else file name; a series comes where its first file does.

    Args:
        inputs: files and folders.
        force_modality: accept DICOM of modalities other than CT.
        probe_all: probes a list of files (:func:`probe_file` on each, in order; ``infer --ray``
            runs them in Ray tasks); default: one after the other here.

    Returns:
        (slices, failures): every unreadable or refused file, missing path and folder without
        any slice is a ``Failure`` (file, reason); nothing is raised for a bad file. Slices of
        a series sharing one position are kept, with a :class:`CtmaskWarning`.
    """
    items = list_inputs(inputs)
    tasks = [item for item in items if isinstance(item, FileTask)]
    if probe_all is None:
        probes = [probe_file(task, force_modality) for task in tasks]
    else:
        probes = list(probe_all(tasks))
        if len(probes) != len(tasks):
            raise ValueError(f"probe_all returned {len(probes)} probes for {len(tasks)} files")
    return assemble(items, probes)
