"""DICOM result objects from odd but legal sources, without a model run: hand-made CT instances
and the records an ``infer`` run would give them (cheap; tests/test_dicom_out.py runs a model)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DCIODVFY = shutil.which("dciodvfy")


def make_ct(path: Path, study: str, series: str, rows: int = 48, cols: int = 64, **attrs) -> Path:
    """A single-frame CT Image instance (attributes: ``attrs``; ``None`` leaves one out)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    values = dict(SpecificCharacterSet="ISO_IR 100", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], Modality="CT",
                  PatientName="EDGE^CASE", PatientID="EDGE-1", PatientBirthDate="", PatientSex="O",
                  StudyDate="20200101", StudyTime="120000", ReferringPhysicianName="", StudyID="1",
                  AccessionNumber="A1", StudyInstanceUID=study, SeriesInstanceUID=series, SeriesNumber=3,
                  InstanceNumber=1, FrameOfReferenceUID=generate_uid(), PositionReferenceIndicator="",
                  ImagePositionPatient=[0, 0, 0], ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SliceThickness=5,
                  PixelSpacing=[0.7, 0.7], SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", Rows=rows,
                  Columns=cols, BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=1,
                  RescaleIntercept=0, RescaleSlope=1, KVP=120, AcquisitionNumber=1, BodyPartExamined="CHEST")
    values.update(attrs)
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.PixelData = np.full((rows, cols), -700, np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def record(path: Path, study: str, boxes: list[list[float]], cls: str = "pneumonia") -> dict:
    """The JSONL record ``infer`` writes for the slice ``path`` (its detections at ``boxes``)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    probs = {"normal": 0.2, "pneumonia": 0.5, "covid19": 0.3}
    return {"file": str(path), "key": str(path), "kind": "dicom-hu", "study": study, "class": cls, "probs": probs,
            "id": f"dicom:{ds.SOPInstanceUID}", "size": [int(ds.Rows), int(ds.Columns)],
            "detections": [{"box": b, "score": 0.9 - 0.1 * n, "lesion": "GGO"} for n, b in enumerate(boxes)]}


def study_record(study: str, records: list[dict]) -> dict:
    return {"study": study, "class": "pneumonia", "probs": {"normal": 0.2, "pneumonia": 0.5, "covid19": 0.3},
            "rule": "topk-mean/1 k=5", "driving": [{"key": r["key"]} for r in records]}


SPEC = SimpleNamespace(precision="fp32", head="heads", window=(-600.0, 1500.0))


def write(tmp_path: Path, records: list[dict], studies: list[dict], sc: bool = False, model: bytes = b"model"):
    from ctmask.runtime.dicom_out import DicomOptions, write_dicom_results

    (tmp_path / "m.onnx").write_bytes(model)
    return write_dicom_results(records, studies, SPEC, tmp_path / "m.onnx",  # type: ignore[arg-type]
                               DicomOptions(tmp_path / "dcm", sc=sc), lambda _: None)


def dciodvfy_errors(path: str | Path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, errors="replace",  # type: ignore[list-item]
                          timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_a_source_without_patient_and_study_identifiers_still_gets_its_objects(tmp_path):
    """Exports often strip Type 2 identifiers; highdicom reads each of them (PatientID was an AttributeError)."""
    study = generate_uid()
    gone = {k: None for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                              "ReferringPhysicianName", "StudyID", "AccessionNumber")}
    src = make_ct(tmp_path / "IM1", study, generate_uid(), **gone)
    recs = [record(src, study, [[4, 4, 20, 20]])]
    written, failures = write(tmp_path, recs, [study_record(study, recs)], sc=True)
    assert not failures and len(written) == 1
    for path in written[0].files:
        ds = pydicom.dcmread(path)
        assert ds.PatientID == "" and ds.StudyInstanceUID == study
        if DCIODVFY:
            assert dciodvfy_errors(path) == [], path


def test_a_study_export_holding_ctmask_results_lists_only_its_ct_slices(tmp_path):
    """A PACS export of a study after a run holds the SR, GSPS and captures: a rerun on it must not
    fail on the captures (modality OT) nor, with --force-modality, predict them as slices."""
    import warnings

    from ctmask.scans.listing import collect_sources

    study = generate_uid()
    (tmp_path / "export").mkdir()
    src = make_ct(tmp_path / "export" / "IM1", study, generate_uid())
    recs = [record(src, study, [[4, 4, 20, 20]])]
    written, failures = write(tmp_path, recs, [study_record(study, recs)], sc=True)
    assert not failures and written[0].sc
    shutil.copytree(tmp_path / "dcm", tmp_path / "export" / "results")
    for force in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            refs, failed = collect_sources([tmp_path / "export"], force_modality=force)
        assert [r.path for r in refs] == [str(src)] and not failed
        assert any("ctmask capture 1" in str(w.message) for w in seen)


def test_captures_of_a_forced_modality_decode_as_the_run_read_them(tmp_path):
    """``--force-modality --dicom-sc`` on a PT study: the capture re-read refused the modality and
    the DataError ended the run after the predictions."""
    study = generate_uid()
    src = make_ct(tmp_path / "IM1", study, generate_uid(), Modality="PT")
    recs = [record(src, study, [[4, 4, 20, 20]])]
    from ctmask.runtime.dicom_out import DicomOptions, write_dicom_results

    (tmp_path / "m.onnx").write_bytes(b"model")
    written, failures = write_dicom_results(recs, [study_record(study, recs)], SPEC,  # type: ignore[arg-type]
                                            tmp_path / "m.onnx", DicomOptions(tmp_path / "dcm", sc=True,
                                                                              force_modality=True), lambda _: None)
    assert not failures and len(written[0].sc) == 1


def test_a_study_whose_capture_cannot_be_made_gets_no_file_and_the_others_are_written(tmp_path):
    """A source that no longer decodes when its capture is drawn: that study is a failure with no
    file written (the SR and GSPS were written, then a DataError ended the run), the next study is written."""
    bad, good = generate_uid(), generate_uid()
    a = make_ct(tmp_path / "a", bad, generate_uid())
    b = make_ct(tmp_path / "b", good, generate_uid())
    ra, rb = [record(a, bad, [[4, 4, 20, 20]])], [record(b, good, [[4, 4, 20, 20]])]
    ds = pydicom.dcmread(a)
    ds.PixelData = ds.PixelData[:100]  # truncated after the prediction
    ds.save_as(a)
    written, failures = write(tmp_path, ra + rb, [study_record(bad, ra), study_record(good, rb)], sc=True)
    assert [w.study for w in written] == [good] and [f.file for f in failures] == [bad]
    assert "cannot decode" in failures[0].reason and not (tmp_path / "dcm" / bad).exists()


def test_an_unwritable_dicom_out_is_the_runs_error_not_a_study_failure(tmp_path):
    from ctmask.core.errors import DataError

    study = generate_uid()
    src = make_ct(tmp_path / "IM1", study, generate_uid())
    recs = [record(src, study, [[4, 4, 20, 20]])]
    (tmp_path / "dcm").write_text("a file where the study folder's parent should be")
    with pytest.raises(DataError, match="cannot write"):
        write(tmp_path, recs, [study_record(study, recs)])


def test_the_sr_has_an_image_library_of_its_evidence_and_without_pixel_spacing_still_a_report(tmp_path):
    """TID 1500 row 5: the Image Library (DCM 111028) lists the referenced images; a source without
    Pixel Spacing (highdicom's descriptors need it) still gets its report."""
    import highdicom as hd

    for n, spacing in enumerate(([0.7, 0.7], None)):
        study = generate_uid()
        src = make_ct(tmp_path / f"IM{n}", study, generate_uid(), PixelSpacing=spacing)
        recs = [record(src, study, [[4, 4, 20, 20]])]
        written, failures = write(tmp_path, recs, [study_record(study, recs)])
        assert not failures
        sr = pydicom.dcmread(written[0].sr)
        library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"]
        if spacing is None:
            assert library == []
            continue
        assert len(library) == 1
        entries = [e for g in library[0].ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
        assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [recs[0]["id"][6:]]
        assert hd.sr.srread(written[0].sr).content.get_image_measurement_groups()
        if DCIODVFY:
            assert dciodvfy_errors(written[0].sr) == []


def test_highdicoms_advice_on_source_values_is_not_printed(tmp_path):
    """A one-component PatientName made highdicom warn (a Python warning with its source line) once
    per object written: noise on infer's console that the user cannot act on."""
    import warnings

    study = generate_uid()
    src = make_ct(tmp_path / "IM1", study, generate_uid(), PatientName="Nunez")
    recs = [record(src, study, [[4, 4, 20, 20]])]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        written, failures = write(tmp_path, recs, [study_record(study, recs)], sc=True)
    assert written and not failures
    assert not [w for w in seen if "person name" in str(w.message)]
    assert str(pydicom.dcmread(written[0].sr).PatientName) == "Nunez"


def test_same_content_same_uids_other_content_other_uids(tmp_path):
    """The SOP Instance UIDs named only (model, sources): another --top-rois (other regions drawn)
    reused them for other content, which a PACS keeping the first instance of a UID never shows."""
    from ctmask.runtime.dicom_out import DicomOptions, write_dicom_results

    study = generate_uid()
    src = make_ct(tmp_path / "IM1", study, generate_uid())
    recs = [record(src, study, [[4, 4, 20, 20], [30, 30, 40, 40]])]
    (tmp_path / "m.onnx").write_bytes(b"model")

    def uids(top: int, out: str) -> list[str]:
        written, _ = write_dicom_results(recs, [study_record(study, recs)], SPEC, tmp_path / "m.onnx",  # type: ignore[arg-type]
                                         DicomOptions(tmp_path / out, sc=True, top=top), lambda _: None)
        return [str(pydicom.dcmread(p).SOPInstanceUID) for p in written[0].files]

    first, again, fewer = uids(5, "a"), uids(5, "b"), uids(1, "c")
    assert first == again and len(first) == 3
    assert not set(first) & set(fewer)
