"""``ctmask infer`` on real-scan inputs end to end: synthetic DICOM series (``ctmask synth
--dicom``), a NIfTI volume, pydicom's CT slice, broken files among good ones; per-slice and
per-study outputs, overlays, the HTML report, ``--resume`` and the exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import invoke


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicomset")
    r = invoke("synth", out, "--dicom", "--patients", 3, "--slices-per-patient", 5, "--nifti", "--workers", 1, "-q")
    assert r.exit_code == 0, r.output
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_infer_over_dicom_series_gives_slices_studies_overlays_and_report(small_onnx, dicom_set, tmp_path):
    manifest = json.loads((dicom_set / "manifest.json").read_text())
    out, studies, report, overlays = (tmp_path / "slices.jsonl", tmp_path / "studies.csv", tmp_path / "run.html",
                                      tmp_path / "overlays")
    r = invoke("infer", small_onnx, dicom_set / "dicom", "--out", out, "--studies", studies, "--report", report,
               "--overlays", overlays, "-q")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out)
    assert len(recs) == 15 and len({r["key"] for r in recs}) == 15
    # one study per patient; within a series, slices come in position order (files are shuffled on disk)
    by_study: dict[str, list] = {}
    for rec in recs:
        by_study.setdefault(rec["study"], []).append(rec)
    assert set(by_study) == {p["StudyInstanceUID"] for p in manifest["patients"]}
    for p in manifest["patients"]:
        got = [rec["position"] for rec in by_study[p["StudyInstanceUID"]]]
        assert got == sorted(got)
        z_of = {s["file"].split("/")[-1]: s["z"] for s in p["slices"]}
        for rec in by_study[p["StudyInstanceUID"]]:
            assert rec["position"] == pytest.approx(z_of[rec["file"].split("/")[-1]], abs=1e-3)
    # per-study CSV: three rows with the classes' probabilities
    rows = studies.read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("study,class")
    # overlays: a PNG per slice, of the slice's own size, the boxes inside it
    for rec in recs:
        with Image.open(rec["overlay"]) as im:
            assert im.size == (rec["size"][1], rec["size"][0])
        for x1, y1, x2, y2 in rec.get("top_boxes", []):
            assert 0 <= x1 <= x2 <= rec["size"][1] and 0 <= y1 <= y2 <= rec["size"][0]
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and all(p["StudyInstanceUID"] in html for p in manifest["patients"])


def test_nifti_volume_and_pydicom_ct_slice(small_onnx, dicom_set, tmp_path):
    from pydicom.data import get_testdata_file

    vol = next((dicom_set / "nifti").glob("*.nii.gz"))
    ct = get_testdata_file("CT_small.dcm")
    out = tmp_path / "p.jsonl"
    r = invoke("infer", small_onnx, vol, ct, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    recs = read_jsonl(out)
    nifti = [rec for rec in recs if rec["file"] == str(vol)]
    assert len(nifti) == 5 and [rec["frame"] for rec in nifti] == list(range(5))
    assert [rec["position"] for rec in nifti] == sorted(rec["position"] for rec in nifti)
    assert {rec["kind"] for rec in nifti} == {"nifti-hu"}
    (ct_rec,) = [rec for rec in recs if rec["file"] == str(ct)]
    assert ct_rec["kind"] == "dicom-hu" and ct_rec["size"] == [128, 128]


def test_broken_inputs_are_reported_and_skipped_never_a_traceback(small_onnx, dicom_set, tmp_path):
    series = next((dicom_set / "dicom").iterdir())
    mixed = tmp_path / "mixed"
    shutil.copytree(next(series.iterdir()), mixed / "series")
    good = sorted((mixed / "series").iterdir())
    (mixed / "series" / "IM9999").write_bytes(good[0].read_bytes()[:150])  # a DICOM cut to 150 bytes
    bomb = Image.new("L", (1, 1))
    bomb.save(mixed / "bomb.png")
    data = bytearray((mixed / "bomb.png").read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR declares 30000 x 30000
    (mixed / "bomb.png").write_bytes(bytes(data))
    Image.new("L", (1, 1)).save(mixed / "tiny.png")
    (mixed / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    r = invoke("infer", small_onnx, mixed, "--out", out, "-q")
    assert r.exit_code == 1, r.output  # some inputs skipped
    assert "Traceback" not in r.output
    skipped = {line.split(":")[0].removeprefix("skipped ") for line in r.output.splitlines()
               if line.startswith("skipped ")}
    assert {str(mixed / "series" / "IM9999"), str(mixed / "bomb.png"), str(mixed / "tiny.png")} <= skipped
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(good)  # every good slice predicted


def test_resume_predicts_only_what_is_missing(small_onnx, dicom_set, tmp_path):
    patients = sorted((dicom_set / "dicom").iterdir())
    out = tmp_path / "p.jsonl"
    r = invoke("infer", small_onnx, patients[0], "--out", out, "-q")
    assert r.exit_code == 0, r.output
    first = read_jsonl(out)
    r = invoke("infer", small_onnx, *patients, "--out", out, "--resume", "-q")
    assert r.exit_code == 0, r.output
    assert f"{len(first)} slice(s) already in" in r.output
    recs = read_jsonl(out)
    assert len(recs) == 15 and len({rec["key"] for rec in recs}) == 15 and recs[: len(first)] == first
    full = tmp_path / "full.jsonl"
    assert invoke("infer", small_onnx, *patients, "--out", full, "-q").exit_code == 0
    by_key = {rec["key"]: rec["probs"] for rec in read_jsonl(full)}
    for rec in recs:
        np.testing.assert_allclose(list(rec["probs"].values()), list(by_key[rec["key"]].values()), atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--out", "p.txt"], "use .jsonl or .csv"),
    (["--studies", "s.json"], "use .jsonl or .csv"),
    (["--report", "r.pdf"], "use .html"),
    (["--resume"], "--resume continues"),
    (["--out", "same.jsonl", "--studies", "same.jsonl"], "must be different files"),
])
def test_bad_output_options_exit_2_and_write_nothing(small_onnx, dicom_set, tmp_path, args, message):
    work = tmp_path / "w"
    work.mkdir()
    args = [work / a if a.endswith((".txt", ".json", ".pdf", ".jsonl")) else a for a in args]
    r = invoke("infer", small_onnx, dicom_set / "dicom", *args, "-q")
    assert r.exit_code == 2 and message in r.output, r.output
    assert list(work.iterdir()) == []


def test_nifti_and_dicom_of_one_patient_get_the_same_slices(small_onnx, dicom_set, tmp_path):
    """Padding (-2000 HU outside the scan circle) is air in both: the DICOM through
    PixelPaddingValue, the NIfTI (which keeps the values, as dcm2niix does) as HU below any tissue."""
    manifest = json.loads((dicom_set / "manifest.json").read_text())
    out = tmp_path / "p.jsonl"
    assert invoke("infer", small_onnx, dicom_set / "dicom", dicom_set / "nifti", "--out", out, "-q").exit_code == 0
    recs = read_jsonl(out)
    for p in manifest["patients"]:
        dcm = sorted((r for r in recs if r["study"] == p["StudyInstanceUID"]), key=lambda r: r["position"])
        nii = sorted((r for r in recs if r["file"].endswith(f"{p['PatientID']}.nii.gz")), key=lambda r: r["position"])
        assert len(dcm) == len(nii) == 5
        for a, b in zip(dcm, nii):
            assert a["class"] == b["class"]
            np.testing.assert_allclose(list(a["probs"].values()), list(b["probs"].values()), atol=1e-4)


def test_csv_resume_of_loose_images_and_odd_names(small_onnx, synth_dir, tmp_path):
    import os

    src = sorted((synth_dir / "images").glob("*.png"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src[0], folder / "a.png")
    shutil.copy(src[1], folder / os.fsdecode(b"b\xff\xfe<script>.png"))  # not UTF-8, and markup
    out, studies, report = tmp_path / "p.csv", tmp_path / "s.csv", tmp_path / "r.html"
    r = invoke("infer", small_onnx, folder, "--out", out, "--studies", studies, "--report", report,
               "--overlays", tmp_path / "ov", "-q")
    assert r.exit_code == 0, r.output
    shutil.copy(src[2], folder / "c.png")
    r = invoke("infer", small_onnx, folder, "--out", out, "--studies", studies, "--report", report, "--resume", "-q")
    assert r.exit_code == 0, r.output
    assert "2 slice(s) already in" in r.output
    rows = out.read_bytes().splitlines()
    assert len(rows) == 4  # header + three slices, none twice
    assert "<script>" not in report.read_text(errors="replace").split("</style>", 1)[1].replace("&lt;script&gt;", "")


def test_resume_refuses_another_models_output(small_onnx, synth_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(json.dumps({"file": "x.png", "class": "cat", "class_index": 0, "probs": {"cat": 1.0}}) + "\n")
    before = out.read_bytes()
    r = invoke("infer", small_onnx, synth_dir / "images", "--out", out, "--resume", "-q")
    assert r.exit_code == 2 and "another model" in r.output, r.output
    assert out.read_bytes() == before


def test_localizer_and_multipage_tiff_are_refused(small_onnx, tmp_path):
    from tests_helpers import write_ct_dicom

    hu = np.full((64, 64), -500.0)
    write_ct_dicom(tmp_path / "scout.dcm", hu)
    import pydicom

    ds = pydicom.dcmread(tmp_path / "scout.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "scout.dcm")
    page = Image.fromarray(np.full((64, 64), 100, np.uint8))
    page.save(tmp_path / "pages.tif", save_all=True, append_images=[page])
    r = invoke("infer", small_onnx, tmp_path / "scout.dcm", tmp_path / "pages.tif", "--json", tmp_path / "s.json",
               "-q")
    assert r.exit_code == 1, r.output
    reasons = {Path(s["file"]).name: s["error"] for s in json.loads((tmp_path / "s.json").read_text())["skipped"]}
    # the reason, not the path (tmp_path's name holds the word "localizer" too)
    assert "a localizer (scout) image" in reasons["scout.dcm"] and "2 pages" in reasons["pages.tif"], reasons


def test_calibration_parity_and_bench_inputs_take_dicom_series_folders(dicom_set):
    """collect_images (calibrate, parity, bench) finds suffix-less DICOM and names volumes it cannot take."""
    from ctmask.runtime.predict import collect_images

    series = next((dicom_set / "dicom").iterdir())
    files, failures = collect_images([series])
    assert len(files) == 5 and not failures and all(not f.suffix for f in files)
    files, failures = collect_images([dicom_set / "nifti"])
    assert not files and any("multi-slice file" in f.reason for f in failures)


def test_single_slice_inputs_name_every_file_they_refuse(dicom_set, tmp_path):
    """A folder mixing suffix-less DICOM, an MR slice, a volume and a note: the CT slices are
    taken (sorted), the MR slice and the volume are named, nothing vanishes silently."""
    import pydicom

    from ctmask.runtime.predict import collect_images

    mixed = tmp_path / "mixed"
    shutil.copytree(next(next((dicom_set / "dicom").iterdir()).iterdir()), mixed / "ct")
    ds = pydicom.dcmread(sorted((mixed / "ct").iterdir())[0])
    ds.Modality = "MR"
    ds.SeriesInstanceUID = "1.2.3.4.5.9"
    ds.save_as(mixed / "MR0001")
    shutil.copy(next((dicom_set / "nifti").glob("*.nii.gz")), mixed / "vol.nii.gz")
    (mixed / "notes.txt").write_text("not a slice")
    files, failures = collect_images([mixed])
    assert files == sorted(files) and len(files) == 5 and all(f.parent.name == "ct" for f in files)
    reasons = {Path(f.file).name: f.reason for f in failures}
    assert "modality MR" in reasons["MR0001"] and "multi-slice" in reasons["vol.nii.gz"]
    assert set(reasons) == {"MR0001", "vol.nii.gz"}
    files, failures = collect_images([dicom_set / "nifti"])
    assert not files and all("multi-slice" in f.reason for f in failures)  # no second, misleading line


def test_parquet_resume_keeps_non_utf8_names_exactly(small_onnx, dicom_set, tmp_path):
    """Parquet strings are UTF-8: names that are not keep their bytes in names_json, so --resume
    matches them (no slice predicted twice) and the records come back with the exact keys."""
    import os

    from ctmask.runtime.parquet import read_slices

    series = sorted(next(next((dicom_set / "dicom").iterdir()).iterdir()).iterdir())
    src = tmp_path / "in"
    src.mkdir()
    for k, f in enumerate(series[:3]):
        shutil.copy(f, os.fsdecode(os.fsencode(src) + b"/caf\xe9" + str(k).encode()))
    out = tmp_path / "p.parquet"
    assert invoke("infer", small_onnx, src, "--out", out, "-q").exit_code == 0
    r = invoke("infer", small_onnx, src, "--out", out, "--resume", "--json", tmp_path / "s.json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] == 3 and summary["predicted"] == 0
    keys = [rec["key"] for rec in read_slices(out)]
    assert sorted(keys) == sorted(os.fsdecode(os.fsencode(src) + b"/caf\xe9" + str(k).encode()) for k in range(3))


def test_an_output_that_cannot_be_written_is_exit_2_without_a_traceback(small_onnx, dicom_set, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in ("afile/p.jsonl", "afile/p.parquet"):
        r = invoke("infer", small_onnx, dicom_set / "dicom", "--out", tmp_path / out, "-q")
        assert r.exit_code == 2 and "Traceback" not in r.output and "afile" in r.output, r.output


def test_a_single_valued_localizer_and_a_mid_sized_bomb_are_refused_for_what_they_are(small_onnx, tmp_path):
    """ImageType with one value (a str in pydicom) is still read; a suffix-less PNG declaring
    10000 x 10000 px (Pillow's warning zone) is refused for its size, not as 'not an image'."""
    import pydicom
    from tests_helpers import write_ct_dicom

    write_ct_dicom(tmp_path / "scout.dcm", np.full((64, 64), -500.0))
    ds = pydicom.dcmread(tmp_path / "scout.dcm")
    ds.ImageType = "LOCALIZER"
    ds.save_as(tmp_path / "scout.dcm")
    Image.new("L", (10000, 10000)).save(tmp_path / "big", format="PNG")
    r = invoke("infer", small_onnx, tmp_path / "scout.dcm", tmp_path / "big", "--json", tmp_path / "s.json", "-q")
    assert r.exit_code == 1, r.output
    reasons = {Path(s["file"]).name: s["error"] for s in json.loads((tmp_path / "s.json").read_text())["skipped"]}
    assert "a localizer (scout) image" in reasons["scout.dcm"]
    assert "too many pixels" in reasons["big"] or "maximum" in reasons["big"], reasons


def test_outputs_under_a_file_are_refused_before_anything_runs(small_onnx, dicom_set, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "ok.jsonl"
    for opt, name in (("--studies", "s.csv"), ("--report", "r.html")):
        r = invoke("infer", small_onnx, dicom_set / "dicom", "--out", out, opt, tmp_path / "afile" / name, "-q")
        assert r.exit_code == 2 and "is a file, not a folder" in r.output, r.output
        assert not out.exists()  # refused before the slices were written


def test_study_parquet_keeps_non_utf8_names_exactly(small_onnx, tmp_path):
    import os

    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    name = os.fsdecode(os.fsencode(src) + b"/x\xff.png")
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(name, format="PNG")
    out = tmp_path / "s.parquet"
    assert invoke("infer", small_onnx, src, "--studies", out, "-q").exit_code == 0
    (row,) = pq.read_table(out).to_pylist()
    assert json.loads(row["names_json"])["study"] == name  # exact, where `study` holds U+FFFD


def test_infer_names_what_it_ignored_and_predicts_a_copied_instance_once(small_onnx, tmp_path):
    """A folder of RT plans next to a CT slice and a copy of it: the run's output counts the ignored
    non-image objects by modality and predicts the instance once; a NIfTI of unknown orientation is skipped
    with the reason."""
    import nibabel as nib
    from pydicom.data import get_testdata_file

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("rtplan.dcm", "rtplan_truncated.dcm", "ExplVR_BigEndNoMeta.dcm", "CT_small.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    shutil.copy(folder / "CT_small.dcm", folder / "CT_small_copy.dcm")
    nib.Nifti1Image(np.zeros((64, 64, 2), np.int16), None).to_filename(str(folder / "unknown.nii"))
    out = tmp_path / "p.jsonl"
    r = invoke("infer", small_onnx, folder, "--out", out, "-q", "--json", tmp_path / "s.json")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "warning: ignored 3 non-image DICOM objects: RTPLAN 3" in r.output
    assert "scans/CT_small_copy.dcm copies scans/CT_small.dcm" in r.output
    assert [rec["file"] for rec in read_jsonl(out)] == [str(folder / "CT_small.dcm")]
    skipped = json.loads((tmp_path / "s.json").read_text())["skipped"]
    assert [s["file"] for s in skipped] == [str(folder / "unknown.nii")]
    assert "qform_code and sform_code are both 0" in skipped[0]["error"]
