"""Synthetic patients written as real CT DICOM series (and optionally NIfTI volumes).

Each patient is one study with one axial CT series of ``slices_per_patient`` slices drawn by
:func:`ctmask.data.synth.generate_slice`, stored as a PACS export would::

    OUT/dicom/SYNTH-0001/<SeriesNumber>_<desc>/IM0001, IM0002, ...   DICOM Part 10, no suffix
    OUT/nifti/SYNTH-0001.nii.gz                                     with ``nifti=True``
    OUT/manifest.json                                               patients, UIDs, files, labels
    OUT/synth.json                                                  summary and description

A normal patient has normal slices only; a pneumonia or COVID-19 patient has one contiguous
run of lesion slices (30-70% of the series) among normal ones. The pixel format, slice order,
file naming and outside-of-scan-circle padding vary over patients in a fixed cycle
(:data:`PIXEL_FORMATS`, see :func:`_plan`) so readers meet the variants real scanners write.
Everything (pixels, UIDs, dates) depends only on (seed, patients, slices_per_patient): the
same arguments give the same bytes for any number of workers.
"""

from __future__ import annotations

import datetime
import gzip
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctmask.core.errors import DataError
from ctmask.core.fileio import atomic_path, write_bytes_atomic, write_json_atomic
from ctmask.core.presets import CLASS_NAMES
from ctmask.data.synth import DESCRIPTION as SLICE_DESCRIPTION
from ctmask.data.synth import generate_slice, run_tasks
from ctmask.data.synth_shapes import SIZE

GENERATOR = "ctmask.data.synth_dicom"
GENERATOR_VERSION = "1.0"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PIXEL_SPACING_MM = 0.7
SLICE_THICKNESS_MM = 5.0
LESION_FRACTION = (0.3, 0.7)
INDEX_BASE = 1_000_000_000
"""``generate_slice`` index of the first slice: far above the PNG benchmark's indices, so a DICOM
set never repeats a slice of a PNG set of the same seed (train on one, test on the other)."""
SERIES_DESC = "SYNTH_CHEST_5MM"
_PATIENT_RE = re.compile(r"^SYNTH-\d{4,}$")
_SERIES_RE = re.compile(r"^\d+_[A-Z0-9_]+$")
_FILE_RE = re.compile(r"^IM\d{4,}$")
_NIFTI_RE = re.compile(r"^SYNTH-\d{4,}\.nii\.gz$")

DICOM_DESCRIPTION = (
    "SYNTHETIC patients, not patient data. Every slice is an independent draw of "
    "ctmask.data.synth.generate_slice (see slice_description): consecutive slices of a series "
    "do NOT continue each other in 3-D (the anatomy and lesions are redrawn on every slice), "
    "so the series are valid DICOM geometry-wise but not anatomically coherent volumes. "
    "Normal patients have normal slices only; pneumonia / COVID-19 patients have one contiguous "
    "run of lesion slices covering 30-70% of the series, the other slices are normal. "
    "Pixel formats, slice order (head->feet or feet->head), file-name order (shuffled for "
    "some patients: sort by ImagePositionPatient, not by file name) and PixelPaddingValue "
    "outside the reconstruction circle vary over patients in a fixed cycle (see each "
    "patient's pixel_format, order and shuffled_filenames)."
)

COORDINATES = (
    "DICOM uses LPS+ (x to the patient's Left, y to Posterior, z to Superior/head). Every slice "
    "has ImageOrientationPatient [1,0,0,0,1,0]: column index c runs along +x, row index r along "
    "+y, and ImagePositionPatient is the centre of pixel (r=0, c=0), so pixel (r, c) of a slice "
    "lies at LPS (x0 + c*0.7, y0 + r*0.7, z). The NIfTI volume is data[i, j, k] = HU of DICOM "
    "pixel (r=j, c=i) of the k-th slice in increasing z (feet -> head; k is each slice's "
    "nifti_k), and its affine maps (i, j, k) to RAS+ (x_RAS = -x_LPS, y_RAS = -y_LPS, "
    "z_RAS = z_LPS): affine = [[-0.7, 0, 0, -x0], [0, -0.7, 0, -y0], [0, 0, 5, z_min], [0, 0, 0, 1]] "
    "(qform and sform code 1, scanner coordinates; orientation codes L, P, S). The NIfTI holds "
    "the DICOM modality-LUT output (stored * slope + intercept) as int16, padding pixels "
    "included (like dcm2niix)."
)


@dataclass(frozen=True)
class PixelFormat:
    """How a patient's pixels are stored (real scanners differ in exactly these).

    Attributes:
        name: short id written to the manifest.
        signed: PixelRepresentation 1 (int16) or 0 (uint16).
        bits_stored: BitsStored (12 or 16; BitsAllocated is always 16).
        intercept: RescaleIntercept (RescaleSlope is 1).
        padding: PixelPaddingValue stored outside the reconstruction circle, or None.
        windows: (center, width) pairs, the lung window first.
    """

    name: str
    signed: bool
    bits_stored: int
    intercept: float
    padding: int | None
    windows: tuple[tuple[float, float], ...]

    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest representable stored value."""
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


LUNG, MEDIASTINUM = (-600.0, 1500.0), (40.0, 400.0)
PIXEL_FORMATS: tuple[PixelFormat, ...] = (
    PixelFormat("uint12-intercept-1024", False, 12, -1024.0, None, (LUNG,)),
    PixelFormat("int16-intercept0-padding-2000", True, 16, 0.0, -2000, (LUNG,)),
    PixelFormat("uint16-intercept-1024", False, 16, -1024.0, None, (LUNG, MEDIASTINUM)),
    PixelFormat("int12-intercept0-padding-2000", True, 12, 0.0, -2000, (LUNG, MEDIASTINUM)),
)
"""Patient ``p`` uses ``PIXEL_FORMATS[p % 4]``."""


@dataclass(frozen=True)
class PatientPlan:
    """Everything that defines one patient; made in the parent so workers only draw and write."""

    index: int
    patient_id: str
    label: int
    pixel_format: PixelFormat
    head_first: bool  # InstanceNumber 1 is the most superior slice
    file_of_instance: tuple[int, ...]  # file number (1-based) holding InstanceNumber n + 1
    lesion: tuple[int, int]  # [start, stop) in anatomical index k (feet -> head); empty for normal
    z_min: float
    x0: float
    y0: float
    series_number: int
    study_date: str
    study_time: str
    sex: str
    age: int
    study_uid: str
    series_uid: str
    frame_uid: str
    slices: int
    seed: int
    key: str  # entropy for the SOP instance UIDs

    @property
    def series_folder(self) -> str:
        return f"dicom/{self.patient_id}/{self.series_number}_{SERIES_DESC}"


def _uid(key: str, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[key, *map(str, parts)]))


def _plan(patients: int, slices: int, seed: int) -> list[PatientPlan]:
    """Labels (balanced round-robin, shuffled), lesion runs, geometry, dates and UIDs per patient."""
    key = f"{GENERATOR}/{GENERATOR_VERSION}/seed={seed}/patients={patients}/slices={slices}"
    labels = np.arange(patients) % len(CLASS_NAMES)
    np.random.default_rng([int(seed), 0xD1C0, 0]).shuffle(labels)
    plans = []
    for p in range(patients):
        rng = np.random.default_rng([int(seed), 0xD1C0, 1, p])
        label = int(labels[p])
        n_lesion = max(1, int(round(slices * rng.uniform(*LESION_FRACTION)))) if label else 0
        start = int(rng.integers(0, slices - n_lesion + 1)) if label else 0
        order = np.arange(slices)
        if p % 3:  # two patients in three: file names do not follow InstanceNumber
            rng.shuffle(order)
        date = datetime.date(2020, 3, 1) + datetime.timedelta(days=int(rng.integers(0, 366)))
        secs = int(rng.integers(7 * 3600, 19 * 3600))
        patient_id = f"SYNTH-{p + 1:04d}"
        plans.append(PatientPlan(
            index=p, patient_id=patient_id, label=label, pixel_format=PIXEL_FORMATS[p % len(PIXEL_FORMATS)],
            head_first=p % 2 == 0, file_of_instance=tuple(int(i) + 1 for i in order),
            lesion=(start, start + n_lesion), z_min=round(-float(rng.uniform(60.0, 200.0)), 1),
            x0=round(-PIXEL_SPACING_MM * (SIZE - 1) / 2, 2), y0=round(-PIXEL_SPACING_MM * (SIZE - 1) / 2
                                                                       + float(rng.uniform(-20.0, 20.0)), 1),
            series_number=int(rng.integers(2, 6)), study_date=date.strftime("%Y%m%d"),
            study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
            sex="MF"[int(rng.integers(0, 2))], age=int(rng.integers(25, 90)),
            study_uid=_uid(key, patient_id, "study"), series_uid=_uid(key, patient_id, "series"),
            frame_uid=_uid(key, patient_id, "frame"), slices=slices, seed=int(seed), key=key,
        ))
    return plans


def outside_circle() -> np.ndarray:
    """bool [512, 512]: pixels outside the reconstruction circle (padding where a format has it)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    centre = (SIZE - 1) / 2
    return np.hypot(xx - centre, yy - centre) > SIZE / 2


def to_stored(hu: np.ndarray, fmt: PixelFormat, pad: np.ndarray | None = None) -> np.ndarray:
    """HU -> stored values ``round(HU - intercept)`` clipped to the format (slope 1); ``pad``
    pixels get the padding value."""
    lo, hi = fmt.stored_range()
    stored = np.clip(np.round(hu.astype(np.float64) - fmt.intercept), lo, hi)
    if fmt.padding is not None and pad is not None:
        stored[pad] = fmt.padding
    return stored.astype(np.int16 if fmt.signed else np.uint16)


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = repr(round(float(value), 4))
    return text[:-2] if text.endswith(".0") else text


def _save_dicom(path: Path, ds) -> None:
    """Write ``ds`` as a DICOM Part 10 file, atomically."""
    with atomic_path(path) as tmp:
        if "enforce_file_format" in inspect.signature(ds.save_as).parameters:  # pydicom >= 3
            ds.save_as(tmp, enforce_file_format=True)
        else:  # pydicom 2.4 takes the encoding from these attributes
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(tmp, write_like_original=False)


def _dataset(plan: PatientPlan, instance: int, z: float, stored: np.ndarray):
    """The CT Image Storage data set of one slice (InstanceNumber ``instance``, 1-based)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    fmt = plan.pixel_format
    sop_uid = _uid(plan.key, plan.patient_id, "instance", instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = plan.study_time
    ds.AccessionNumber = f"SYN{plan.index + 1:07d}"
    ds.Modality = "CT"
    ds.Manufacturer = "ctmask synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC CT CHEST (not patient data)"
    ds.SeriesDescription = SERIES_DESC
    ds.PatientName = f"SYNTH^{plan.patient_id.split('-')[1]}"
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = plan.sex
    ds.PatientAge = f"{plan.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(SLICE_THICKNESS_MM)
    ds.KVP = "120"
    ds.SpacingBetweenSlices = _ds(SLICE_THICKNESS_MM)
    ds.SoftwareVersions = f"{GENERATOR} {GENERATOR_VERSION}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.study_uid, plan.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(plan.x0), _ds(plan.y0), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = plan.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(z)
    ds.ImageComments = "SYNTHETIC image (ctmask.data.synth), not patient data"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [_ds(PIXEL_SPACING_MM), _ds(PIXEL_SPACING_MM)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, fmt.bits_stored, fmt.bits_stored - 1
    ds.PixelRepresentation = int(fmt.signed)
    if fmt.padding is not None:
        ds.PixelPaddingValue = fmt.padding
    ds.BurnedInAnnotation = "NO"
    centers, widths = [_ds(c) for c, _ in fmt.windows], [_ds(w) for _, w in fmt.windows]
    ds.WindowCenter = centers if len(centers) > 1 else centers[0]
    ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    explain = ["LUNG", "MEDIASTINUM"][: len(fmt.windows)]
    ds.WindowCenterWidthExplanation = explain if len(explain) > 1 else explain[0]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(fmt.intercept), "1", "HU"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2" if fmt.signed else "<u2").tobytes()
    return ds


def _nifti_bytes(volume: np.ndarray, plan: PatientPlan) -> bytes:
    """A gzipped NIfTI-1 file (int16 HU, RAS+ affine, see :data:`COORDINATES`); mtime 0 so the
    bytes are reproducible."""
    import nibabel as nib

    affine = np.array([[-PIXEL_SPACING_MM, 0, 0, -plan.x0], [0, -PIXEL_SPACING_MM, 0, -plan.y0],
                       [0, 0, SLICE_THICKNESS_MM, plan.z_min], [0, 0, 0, 1]], np.float64)
    img = nib.Nifti1Image(volume.astype(np.int16), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"SYNTHETIC ctmask, not patient data"
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=3, mtime=0)


def _write_patient(task: tuple[str, PatientPlan, bool]) -> dict:
    """Draw and write one patient's series (and NIfTI); returns its manifest entry."""
    out, plan, nifti = task
    out = Path(out)
    fmt = plan.pixel_format
    pad = outside_circle() if fmt.padding is not None else None
    folder = out / plan.series_folder
    n = plan.slices
    volume = np.empty((SIZE, SIZE, n), np.int16) if nifti else None
    slices = []
    for instance in range(1, n + 1):
        k = n - instance if plan.head_first else instance - 1  # anatomical index, feet -> head
        label = plan.label if plan.lesion[0] <= k < plan.lesion[1] else 0
        index = INDEX_BASE + plan.index * n + k
        s = generate_slice(plan.seed, index, label)
        stored = to_stored(s.hu, fmt, pad)
        z = round(plan.z_min + k * SLICE_THICKNESS_MM, 2)
        name = f"IM{plan.file_of_instance[instance - 1]:04d}"
        _save_dicom(folder / name, _dataset(plan, instance, z, stored))
        if volume is not None:
            volume[:, :, k] = (stored.astype(np.int32) + int(fmt.intercept)).T
        slices.append({"file": name, "InstanceNumber": instance, "z": z, "label": label,
                       "class": CLASS_NAMES[label], "nifti_k": k, "generator_index": index,
                       "lesion_pixels": int((s.mask >= 2).sum()),
                       "SOPInstanceUID": _uid(plan.key, plan.patient_id, "instance", instance)})
    nifti_path = None
    if volume is not None:
        nifti_path = f"nifti/{plan.patient_id}.nii.gz"
        write_bytes_atomic(out / nifti_path, _nifti_bytes(volume, plan))
    fmt_info = asdict(fmt)
    fmt_info["windows"] = [list(w) for w in fmt.windows]
    return {
        "PatientID": plan.patient_id, "PatientName": f"SYNTH^{plan.patient_id.split('-')[1]}",
        "StudyInstanceUID": plan.study_uid, "SeriesInstanceUID": plan.series_uid,
        "FrameOfReferenceUID": plan.frame_uid, "SeriesNumber": plan.series_number, "StudyDate": plan.study_date,
        "label": plan.label, "class": CLASS_NAMES[plan.label], "series_folder": plan.series_folder,
        "nifti": nifti_path, "pixel_format": fmt_info,
        "order": "head_to_feet" if plan.head_first else "feet_to_head",
        "shuffled_filenames": list(plan.file_of_instance) != list(range(1, n + 1)),
        "lesion_slices": sum(s["label"] > 0 for s in slices),
        "ImagePositionPatient_xy": [plan.x0, plan.y0], "slices": slices,
    }


def _check_out_dir(out: Path) -> None:
    """Allow a missing/empty folder or an earlier synth --dicom output; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        ok = json.loads((out / "synth.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError("refusing to write into a non-empty folder that is not a synth --dicom output", out,
                        hint="choose a new or empty folder")


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete files of an earlier run that this run did not write (our own name patterns only)
    and the folders they leave empty."""
    dicom = out / "dicom"
    if dicom.is_dir():
        for patient in [p for p in dicom.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name)]:
            for series in [s for s in patient.iterdir() if s.is_dir() and _SERIES_RE.match(s.name)]:
                for f in series.iterdir():
                    if _FILE_RE.match(f.name) and f.relative_to(out).as_posix() not in keep:
                        f.unlink()
                if not any(series.iterdir()):
                    series.rmdir()
            if not any(patient.iterdir()):
                patient.rmdir()
    nifti = out / "nifti"
    if nifti.is_dir():
        for f in nifti.iterdir():
            if _NIFTI_RE.match(f.name) and f.relative_to(out).as_posix() not in keep:
                f.unlink()


def synthesize_dicom(
    out: str | Path,
    patients: int = 12,
    slices_per_patient: int = 24,
    seed: int = 0,
    workers: int | None = None,
    nifti: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``patients`` synthetic CT studies as DICOM series (plus NIfTI volumes with ``nifti``).

    Args:
        out: new or empty folder, or the output of an earlier call (it is overwritten).
        patients: number of patients (>= 1), classes balanced round-robin then shuffled.
        slices_per_patient: slices per series (>= 1), 5 mm apart.
        seed: data-set seed; the bytes depend only on (seed, patients, slices_per_patient).
        workers: processes, one patient per task; None = ``os.cpu_count()``, 1 = run inline.
        nifti: also write ``nifti/<PatientID>.nii.gz`` (needs nibabel).
        progress: optional ``callable(n_done, n_total)`` called after every patient.

    Returns:
        The summary also written to ``synth.json`` plus ``out_dir`` and ``manifest``
        (the path of ``manifest.json``).

    Raises:
        DataError: ``out`` is non-empty and not an earlier synth --dicom output.
    """
    if patients < 1 or slices_per_patient < 1:
        raise ValueError(f"patients and slices_per_patient must be >= 1, got {patients}, {slices_per_patient}")
    if nifti:
        import nibabel  # noqa: F401  (fail before writing anything)
    out = Path(out)
    _check_out_dir(out)
    plans = _plan(patients, slices_per_patient, seed)
    out.mkdir(parents=True, exist_ok=True)
    header = {"generator": GENERATOR, "version": GENERATOR_VERSION, "status": "writing", "seed": int(seed)}
    write_json_atomic(out / "synth.json", header)  # marks the folder as ours even if we crash

    tasks = [(str(out), plan, nifti) for plan in plans]
    entries: list[dict] = run_tasks(_write_patient, tasks, workers, progress)
    keep = {f"{e['series_folder']}/{s['file']}" for e in entries for s in e["slices"]}
    keep |= {e["nifti"] for e in entries if e["nifti"]}
    _remove_stale(out, keep)

    parameters = {
        "seed": int(seed), "patients": patients, "slices_per_patient": slices_per_patient, "nifti": nifti,
        "rows": SIZE, "columns": SIZE, "pixel_spacing_mm": PIXEL_SPACING_MM,
        "slice_thickness_mm": SLICE_THICKNESS_MM, "spacing_between_slices_mm": SLICE_THICKNESS_MM,
        "lesion_fraction": list(LESION_FRACTION), "generator_index": "INDEX_BASE + patient_index * "
        "slices_per_patient + nifti_k", "index_base": INDEX_BASE,
        "pixel_formats": "patient p uses pixel_formats[p % 4]; InstanceNumber 1 is the head for even p; file "
                         "names are shuffled when p % 3 != 0",
    }
    data = "SYNTHETIC, not patient data"
    manifest = {"generator": GENERATOR, "version": GENERATOR_VERSION, "data": data,
                "description": DICOM_DESCRIPTION, "slice_description": SLICE_DESCRIPTION,
                "coordinates": COORDINATES, "parameters": parameters, "patients": entries}
    write_json_atomic(out / "manifest.json", manifest)
    classes = {c: sum(e["label"] == k for e in entries) for k, c in enumerate(CLASS_NAMES)}
    slice_classes = {c: sum(s["label"] == k for e in entries for s in e["slices"]) for k, c in enumerate(CLASS_NAMES)}
    summary = {**header, "status": "complete", "data": data, "patients": patients,
               "slices_per_patient": slices_per_patient, "classes": classes, "slice_classes": slice_classes,
               "dicom_dir": "dicom", "nifti_dir": "nifti" if nifti else None, "manifest": "manifest.json",
               "three_d_continuity": False, "description": DICOM_DESCRIPTION,
               "slice_description": SLICE_DESCRIPTION}
    write_json_atomic(out / "synth.json", summary)
    return {**summary, "out_dir": str(out)}
