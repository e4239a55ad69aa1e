"""``ctmask synth --dicom``: synthetic patients as DICOM series (and NIfTI volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests_helpers import invoke

from ctmask.core.fileio import sha256_file
from ctmask.data.synth import generate_slice
from ctmask.data.synth_dicom import (
    LESION_FRACTION,
    PIXEL_FORMATS,
    PIXEL_SPACING_MM,
    SLICE_THICKNESS_MM,
    outside_circle,
    synthesize_dicom,
)

pydicom = pytest.importorskip("pydicom")
SEED, PATIENTS, SLICES = 5, 4, 6  # four patients: every pixel format once


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom") / "set"
    pytest.importorskip("nibabel")
    synthesize_dicom(out, PATIENTS, SLICES, seed=SEED, workers=1, nifti=True)
    return out


@pytest.fixture(scope="module")
def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def series(out, entry):
    """{InstanceNumber: (path, dataset)} of a manifest patient, read from the files found on disk."""
    folder = out / entry["series_folder"]
    found = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        found[int(ds.InstanceNumber)] = (path, ds)
    return found


def test_layout_tags_and_uids(out, manifest):
    assert manifest["data"].startswith("SYNTHETIC") and "not patient data" in manifest["data"]
    assert [e["PatientID"] for e in manifest["patients"]] == [f"SYNTH-{p:04d}" for p in range(1, PATIENTS + 1)]
    assert sorted(p.name for p in (out / "dicom").iterdir()) == [e["PatientID"] for e in manifest["patients"]]
    studies, all_sops = set(), set()
    for entry in manifest["patients"]:
        series_dirs = [p.name for p in (out / "dicom" / entry["PatientID"]).iterdir()]
        assert series_dirs == [entry["series_folder"].split("/")[-1]]
        files = series(out, entry)
        assert sorted(files) == list(range(1, SLICES + 1))
        by_number = {s["InstanceNumber"]: s for s in entry["slices"]}
        uids = set()
        for n, (path, ds) in files.items():
            assert path.suffix == "" and path.name.startswith("IM") and by_number[n]["file"] == path.name
            assert path.read_bytes()[128:132] == b"DICM"
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == by_number[n]["SOPInstanceUID"]
            for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
                assert pydicom.uid.UID(uid).is_valid, uid
            uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SeriesNumber,
                      ds.PatientID, str(ds.PatientName), ds.StudyDate))
            all_sops.add(ds.SOPInstanceUID)
            assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
            assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16) and ds.BitsStored in (12, 16)
            assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation in (0, 1)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == [PIXEL_SPACING_MM] * 2
            assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == SLICE_THICKNESS_MM
            assert float(ds.RescaleSlope) == 1 and ds.RescaleType == "HU"
            assert float(np.atleast_1d(ds.WindowCenter)[0]) == -600 and float(np.atleast_1d(ds.WindowWidth)[0]) == 1500
        assert len(uids) == 1, "one study and one series per patient"
        study, series_uid, _, number, pid, name, _ = uids.pop()
        assert (study, series_uid, pid, number) == (entry["StudyInstanceUID"], entry["SeriesInstanceUID"],
                                                    entry["PatientID"], entry["SeriesNumber"])
        assert name == entry["PatientName"] and entry["series_folder"].endswith(f"/{number}_SYNTH_CHEST_5MM")
        studies.add(study)
    assert len(studies) == PATIENTS and len(all_sops) == PATIENTS * SLICES
    formats = {(e["pixel_format"]["signed"], e["pixel_format"]["intercept"]) for e in manifest["patients"]}
    assert formats == {(False, -1024.0), (True, 0.0)}


def test_hu_matches_the_generator_and_padding(out, manifest):
    circle = outside_circle()
    assert 50_000 < circle.sum() < 60_000
    padded = 0
    for entry in manifest["patients"]:
        files = series(out, entry)
        for s in entry["slices"]:
            ds = files[s["InstanceNumber"]][1]
            stored = ds.pixel_array
            assert stored.dtype == (np.int16 if ds.PixelRepresentation else np.uint16)
            hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            ref = generate_slice(SEED, s["generator_index"], s["label"]).hu
            inside = ~circle if "PixelPaddingValue" in ds else np.ones_like(circle)
            assert np.abs(hu - ref)[inside].max() <= 0.5
            if "PixelPaddingValue" in ds:
                padded += 1
                assert entry["pixel_format"]["padding"] == ds.PixelPaddingValue == -2000
                np.testing.assert_array_equal(stored == ds.PixelPaddingValue, circle)
            else:
                assert entry["pixel_format"]["padding"] is None
    assert padded == SLICES * sum(f.padding is not None for f in PIXEL_FORMATS[:PATIENTS])


def test_positions_order_and_lesion_runs(out, manifest):
    shuffled = []
    for entry in manifest["patients"]:
        files = series(out, entry)
        z = [float(files[n][1].ImagePositionPatient[2]) for n in sorted(files)]
        step = np.diff(z)
        assert np.allclose(np.abs(step), SLICE_THICKNESS_MM) and (np.all(step > 0) or np.all(step < 0))
        assert (step[0] < 0) == (entry["order"] == "head_to_feet")
        for n, (path, ds) in files.items():
            assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
            assert [float(v) for v in ds.ImagePositionPatient[:2]] == entry["ImagePositionPatient_xy"]
        assert [s["z"] for s in sorted(entry["slices"], key=lambda s: s["InstanceNumber"])] == z
        names_follow = all(path.name == f"IM{n:04d}" for n, (path, _) in files.items())
        assert names_follow != entry["shuffled_filenames"]
        shuffled.append(entry["shuffled_filenames"])
        labels = [s["label"] for s in sorted(entry["slices"], key=lambda s: s["z"])]
        if entry["label"] == 0:
            assert labels == [0] * SLICES
        else:
            run = [k for k, v in enumerate(labels) if v]
            assert set(labels) == {0, entry["label"]} or len(run) == SLICES
            assert run == list(range(run[0], run[-1] + 1)), "lesion slices are contiguous"
            lo, hi = LESION_FRACTION
            assert round(SLICES * lo) <= len(run) <= round(SLICES * hi)
    assert any(shuffled) and not all(shuffled)
    assert {e["label"] for e in manifest["patients"]} == {0, 1, 2}


def test_nifti_matches_dicom_hu_and_geometry(out, manifest):
    nib = pytest.importorskip("nibabel")
    for entry in manifest["patients"]:
        img = nib.load(out / entry["nifti"])
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16 and data.shape == (512, 512, SLICES)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.header.get_zooms(), (PIXEL_SPACING_MM, PIXEL_SPACING_MM, SLICE_THICKNESS_MM))
        files = series(out, entry)
        for s in entry["slices"]:
            ds = files[s["InstanceNumber"]][1]
            hu = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
            np.testing.assert_array_equal(data[:, :, s["nifti_k"]].T, hu)
            x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
            r, c = 20, 300  # DICOM pixel (row, column) -> LPS -> RAS
            lps = np.array([x0 + c * PIXEL_SPACING_MM, y0 + r * PIXEL_SPACING_MM, z])
            ras = img.affine @ np.array([c, r, s["nifti_k"], 1.0])
            np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


def test_same_seed_same_bytes_for_any_worker_count(out, tmp_path):
    again = tmp_path / "again"
    synthesize_dicom(again, PATIENTS, SLICES, seed=SEED, workers=2, nifti=True)

    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}

    first, second = digests(out), digests(again)
    assert len(first) == 2 + PATIENTS * (SLICES + 1)  # synth.json, manifest.json, DICOM files, NIfTI volumes
    assert first == second
    assert not [p for p in out.rglob("*.tmp")]


def test_synth_json_describes_the_data(out):
    summary = json.loads((out / "synth.json").read_text())
    assert summary["status"] == "complete" and summary["three_d_continuity"] is False
    assert "SYNTHETIC" in summary["description"] and "NOT continue each other in 3-D" in summary["description"]
    assert sum(summary["classes"].values()) == PATIENTS


def test_error_leaves_no_half_written_file(tmp_path, monkeypatch):
    import ctmask.data.synth_dicom as sd

    calls = [0]

    def failing(seed, index, label):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return generate_slice(seed, index, label)

    monkeypatch.setattr(sd, "generate_slice", failing)
    with pytest.raises(RuntimeError, match="boom"):
        synthesize_dicom(tmp_path / "x", 1, 4, seed=0, workers=1)
    files = [p for p in (tmp_path / "x").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["IM0001", "IM0002", "synth.json"]  # complete files only
    for p in files:
        if p.name.startswith("IM"):
            pydicom.dcmread(p).pixel_array  # noqa: B018


def test_cli_dicom(tmp_path):
    out = tmp_path / "cli"
    res = invoke("synth", out, "--dicom", "--patients", 3, "--slices-per-patient", 4, "-q")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    expected = [[c, "1", "patients"] for c in ("normal", "pneumonia", "covid19")]
    assert [line.split()[:3] for line in lines[:3]] == expected
    assert all(str(out / "dicom") in line for line in lines[:3]) and "SYNTHETIC" in res.output
    assert len(list((out / "dicom").rglob("IM*"))) == 12 and not (out / "nifti").exists()
    # rerun smaller into the same folder: files of the earlier run are removed
    res = invoke("synth", out, "--dicom", "--patients", 2, "--slices-per-patient", 2, "--workers", 1, "-q")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "dicom").rglob("IM*"))
    assert on_disk == sorted(f"{e['series_folder']}/{s['file']}" for e in manifest["patients"] for s in e["slices"])
    assert len(on_disk) == 4 and sorted(p.name for p in (out / "dicom").iterdir()) == ["SYNTH-0001", "SYNTH-0002"]


@pytest.mark.parametrize("args", [("--patients", "3"), ("--slices-per-patient", "4"), ("--nifti",)])
def test_cli_dicom_options_need_dicom(tmp_path, args):
    res = invoke("synth", tmp_path / "o", "--slices", "9", *args, "-q")
    assert res.exit_code == 2 and "--dicom" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    res = invoke("synth", tmp_path / "f", "--dicom", "--patients", 1, "--slices-per-patient", 1, "-q")
    assert res.exit_code == 2 and "non-empty" in res.output
    res = invoke("synth", tmp_path / "g", "--dicom", "--slices", 9, "-q")
    assert res.exit_code == 2 and "--slices" in res.output
