"""DICOM result objects (``infer --dicom-out``): dciodvfy-valid, read back equal to the JSONL record,
in the source study, deterministic; the lesion detections they show."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from tests_helpers import invoke

from ctmask.runtime.detections import MAX_DETECTIONS, detect, nms

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) not installed: `make "
                                                             "dicom3tools` installs it where apt-get and root are")


@pytest.fixture(scope="module")
def dicom_run(small_onnx, synth_dir, tmp_path_factory):
    """One ``infer`` run over two synthetic DICOM patients (normal, pneumonia) plus one PNG slice,
    with --dicom-out and --dicom-sc; its summary, warnings and folders."""
    from ctmask.backends.registry import make_runner
    from ctmask.data.synth_dicom import synthesize_dicom
    from ctmask.runtime.batch_run import PredictOptions
    from ctmask.runtime.pipeline import InferEvents, InferRequest, LocalEngine, run_infer

    root = tmp_path_factory.mktemp("dicom_out")
    synthesize_dicom(root / "syn", 2, 4, seed=1, workers=1)
    png = sorted((synth_dir / "images").glob("test_*.png"))[0]
    warnings: list[str] = []
    request = InferRequest(small_onnx, [root / "syn" / "dicom", png], out=root / "p.jsonl", studies=root / "s.jsonl",
                           predict=PredictOptions(batch_size=4, top_rois=3), dicom_out=root / "dcm", dicom_sc=True)
    summary = run_infer(request, LocalEngine(lambda: make_runner(small_onnx)), InferEvents(warn=warnings.append))
    return {"summary": summary, "warnings": warnings, "root": root, "model": small_onnx,
            "records": [json.loads(line) for line in (root / "p.jsonl").read_text().splitlines()]}


def _objects(run) -> list[Path]:
    return sorted((run["root"] / "dcm").rglob("*.dcm"))


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_each_dicom_study_gets_sr_gsps_and_scs_png_gets_a_warning(dicom_run):
    summary = dicom_run["summary"]
    assert len(summary.dicom) == 2 and not summary.failures
    for objects in summary.dicom:
        assert Path(objects["sr"]).parent.name == objects["study"]
        assert Path(objects["sr"]).is_file() and Path(objects["gsps"]).is_file()
        assert 1 <= len(objects["sc"]) <= 5
    assert any("no DICOM objects written for 1 study" in w and "only DICOM inputs" in w for w in dicom_run["warnings"])
    assert len(_objects(dicom_run)) == sum(2 + len(o["sc"]) for o in summary.dicom)


@needs_dciodvfy
def test_every_object_passes_dciodvfy(dicom_run):
    for path in _objects(dicom_run):
        assert _dciodvfy_errors(path) == [], path


@needs_dciodvfy
def test_dciodvfy_fails_an_sr_with_a_required_content_item_broken(dicom_run, tmp_path):
    sr = pydicom.dcmread(dicom_run["summary"].dicom[0]["sr"])
    procedure = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert len(procedure) == 1  # TID 1500 row 3: Procedure reported, mandatory
    del procedure[0].ConceptCodeSequence  # the coded value a CODE content item must have
    sr.save_as(tmp_path / "bad.dcm")
    assert any("ConceptCodeSequence" in e for e in _dciodvfy_errors(tmp_path / "bad.dcm"))
    sr = pydicom.dcmread(dicom_run["summary"].dicom[0]["sr"])
    del sr.ConceptNameCodeSequence  # the document title of the root content item
    sr.save_as(tmp_path / "untitled.dcm")
    assert any("ConceptNameCodeSequence" in e for e in _dciodvfy_errors(tmp_path / "untitled.dcm"))


def test_sr_reads_back_equal_to_the_jsonl_record(dicom_run):
    from ctmask.runtime.dicom_out.readback import read_report

    records = {r["id"].removeprefix("dicom:"): r for r in dicom_run["records"] if r["id"].startswith("dicom:")}
    studies = {s["study"]: s for s in dicom_run["summary"].studies}
    for objects in dicom_run["summary"].dicom:
        got, study = read_report(objects["sr"]), studies[objects["study"]]
        assert got["study"] == study["study"] and got["call"] == study["class"] and got["rule"] == study["rule"]
        assert got["probability"] == pytest.approx(study["probs"][study["class"]], abs=1e-6)
        driving = [records[str(pydicom.dcmread(d["key"], stop_before_pixels=True).SOPInstanceUID)]
                   for d in study["driving"]]
        assert [s["uid"] for s in got["slices"]] == [r["id"].removeprefix("dicom:") for r in driving]
        for s, rec in zip(got["slices"], driving):
            assert s["call"] == rec["class"] and s["probability"] == pytest.approx(rec["probs"][rec["class"]], abs=1e-6)
        want = [(uid, d) for uid, r in records.items() if r["study"] == study["study"] for d in r["detections"][:3]]
        assert len(got["regions"]) == len(want) > 0
        for region, (uid, det) in zip(sorted(got["regions"], key=lambda g: (g["uid"], -g["score"])),
                                      sorted(want, key=lambda w: (w[0], -w[1]["score"]))):
            assert region["uid"] == uid and region["lesion"] == det["lesion"]
            assert region["score"] == pytest.approx(det["score"], abs=1e-6)
            assert region["box"] == pytest.approx(det["box"], abs=1e-3)


def test_objects_are_in_the_source_study_in_new_series_with_the_algorithm(dicom_run):
    from ctmask.runtime.dicom_out.context import file_sha256

    sha = file_sha256(dicom_run["model"])
    source_series = {r["series"] for r in dicom_run["records"]}
    for objects in dicom_run["summary"].dicom:
        source = pydicom.dcmread(next(r["file"] for r in dicom_run["records"] if r["study"] == objects["study"]))
        series = set()
        for path in [objects["sr"], objects["gsps"], *objects["sc"]]:
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
            assert ds.PatientName == source.PatientName and ds.StudyDate == source.StudyDate
            assert ds.SeriesInstanceUID not in source_series and "NOT FOR CLINICAL USE" in ds.SeriesDescription
            ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "ctmask"]
            assert len(ours) == 1 and ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
            assert ours[0].DeviceSerialNumber == sha and "precision fp32" in ours[0].SoftwareVersions
            series.add(ds.SeriesInstanceUID)
        assert len(series) == 3  # SR, GSPS and SC each in a series of their own


def test_gsps_draws_the_sr_regions_on_the_source_images(dicom_run):
    from ctmask.runtime.dicom_out.readback import read_report

    for objects in dicom_run["summary"].dicom:
        regions = read_report(objects["sr"])["regions"]
        pr = pydicom.dcmread(objects["gsps"])
        drawn = []
        for ann in pr.GraphicAnnotationSequence:
            uid = ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID
            for g in ann.GraphicObjectSequence:
                pts = np.asarray(g.GraphicData, np.float64).reshape(-1, 2)
                assert g.GraphicAnnotationUnits == "PIXEL" and (pts[0] == pts[-1]).all()
                drawn.append((uid, [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()]))
        assert sorted(drawn) == sorted((r["uid"], r["box"]) for r in regions)
        assert float(pr.SoftcopyVOILUTSequence[0].WindowWidth) > 0


def test_rewriting_makes_the_same_files_and_uids(dicom_run, tmp_path):
    from ctmask.core.graphs import read_spec
    from ctmask.core.spec import GraphSpec
    from ctmask.runtime.dicom_out import DicomOptions, write_dicom_results

    summary = dicom_run["summary"]
    spec: GraphSpec = read_spec(dicom_run["model"])
    again, failures = write_dicom_results(summary.records, summary.studies, spec, dicom_run["model"],
                                          DicomOptions(tmp_path, sc=True, top=3), lambda _: None)
    assert not failures
    for first, second in zip(summary.dicom, again):
        for a, b in zip([first["sr"], first["gsps"], *first["sc"]], second.files):
            assert Path(a).name == Path(b).name
            assert pydicom.dcmread(a).SOPInstanceUID == pydicom.dcmread(b).SOPInstanceUID


def test_detections_nms_per_class_threshold_and_cap():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.04, 0.0], np.float32)
    labelled = detect(scores, boxes, np.array([1, 1, 2, 1, 0]))
    assert [(d.lesion, d.score) for d in labelled] == [("GGO", pytest.approx(0.9)),
                                                       ("consolidation", pytest.approx(0.7))]
    unlabelled = detect(scores, boxes)  # one class: the consolidation box overlaps the GGO one too
    assert [d.lesion for d in unlabelled] == ["lesion"] and unlabelled[0].box == (0.0, 0.0, 10.0, 10.0)
    many = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(150)], np.float32)
    assert len(detect(np.linspace(0.9, 0.1, 150), many)) == MAX_DETECTIONS
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_records_and_overlays_use_the_detections(dicom_run):
    for rec in dicom_run["records"]:
        dets = rec["detections"]
        assert all(d["score"] >= 0.05 for d in dets) and [d["score"] for d in dets] == sorted(
            (d["score"] for d in dets), reverse=True)
        h, w = rec["size"]
        assert all(0 <= d["box"][0] <= d["box"][2] <= w and 0 <= d["box"][1] <= d["box"][3] <= h for d in dets)


def test_codes_table_matches_the_docs_and_ps316():
    from pydicom.sr.codedict import codes

    from ctmask.runtime.dicom_out.codes import CODES

    docs = (Path(__file__).parents[1] / "docs" / "dicom.md").read_text()
    for name, concept in CODES.items():
        c = concept.code
        assert f"| {name} | {c.value} | {c.scheme_designator} | {c.meaning} | {concept.source} |" in docs, name
        assert len(c.meaning) <= 64
        if concept.source.startswith("DICOM PS3.16"):
            known = {(k.value, k.scheme_designator) for k in
                     (getattr(getattr(codes, c.scheme_designator), kw) for kw in
                      getattr(codes, c.scheme_designator).dir(c.meaning.split()[0]))}
            assert (c.value, c.scheme_designator) in known, name


def test_cli_png_input_warns_and_writes_nothing_dicom_sc_alone_is_refused(small_onnx, synth_dir, tmp_path):
    png = sorted((synth_dir / "images").glob("test_*.png"))[0]
    done = invoke("infer", small_onnx, png, "--out", tmp_path / "p.jsonl", "--dicom-out", tmp_path / "dcm", "-q")
    assert done.exit_code == 0, done.output
    assert "only DICOM inputs get DICOM outputs" in done.output and not list(tmp_path.glob("dcm/**/*.dcm"))
    refused = invoke("infer", small_onnx, png, "--out", tmp_path / "q.jsonl", "--dicom-sc", "-q")
    assert refused.exit_code == 2 and "--dicom-sc" in refused.output and not (tmp_path / "q.jsonl").exists()


def test_read_back_fails_an_sr_without_its_study_call(dicom_run, tmp_path):
    from ctmask.runtime.dicom_out.readback import read_report

    sr = pydicom.dcmread(dicom_run["summary"].dicom[0]["sr"])
    measurements = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    first = measurements.ContentSequence[0]
    assert first.ContentSequence[0].TextValue == "study call"
    del measurements.ContentSequence[0]  # the study-level measurement group, a whole content item
    sr.save_as(tmp_path / "no-call.dcm")
    with pytest.raises(ValueError, match="0 study-level groups"):
        read_report(tmp_path / "no-call.dcm")


def test_a_graph_without_labels_still_runs_with_unlabelled_detections(small_onnx, dicom_run, tmp_path):
    """A graph of the format before ``labels`` (ctmask-onnx/2): the same rows, detections named ``lesion``."""
    import onnx

    from ctmask.backends.registry import make_runner
    from ctmask.core.spec import UNLABELLED_FORMAT

    proto = onnx.load(str(small_onnx))
    del proto.graph.output[-1]
    assert [o.name for o in proto.graph.output] == ["rois", "logits", "probs", "boxes"]
    for prop in proto.metadata_props:
        if prop.key == "ctmask.format":
            prop.value = UNLABELLED_FORMAT
    onnx.save(proto, str(tmp_path / "old.onnx"))
    x = np.random.default_rng(1).random((2, 1, *make_runner(small_onnx).activate().spec.input_shape(1)[2:]),
                                        dtype=np.float32)
    with make_runner(tmp_path / "old.onnx") as old, make_runner(small_onnx) as new:
        assert not old.spec.labels and new.spec.labels
        a, b = old.infer({"images": x}), new.infer({"images": x})
    assert set(b) - set(a) == {"labels"} and np.array_equal(a["rois"], b["rois"])
    labelled = detect(b["rois"][0][:, 0], b["boxes"][0], b["labels"][0])
    assert {d.lesion for d in labelled} <= {"GGO", "consolidation"}
    assert {d.lesion for d in detect(a["rois"][0][:, 0], a["boxes"][0])} <= {"lesion"}


def test_detections_match_torchvisions_postprocess_on_random_boxes():
    """torchvision's rule: score > 0.05 (strict), remove_small_boxes(1e-2), batched NMS 0.5, top 100;
    ties, degenerate boxes (a clipped line at the border, inverted boxes) and exact-threshold scores."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(0, 40))
        xy = rng.integers(0, 20, (n, 2)).astype(np.float32)
        b = np.concatenate([xy, xy + rng.integers(-2, 12, (n, 2)).astype(np.float32)], 1)
        s = rng.choice(np.float32([0.05, 0.1, 0.3, 0.5]), n) if trial % 2 else rng.random(n).astype(np.float32)
        lab = rng.integers(1, 3, n)
        t, ts = torch.tensor(b), torch.tensor(s)
        k = torch.where(ts > 0.05)[0]
        k = k[ops.remove_small_boxes(t[k], 1e-2)]
        k = k[ops.batched_nms(t[k], ts[k], torch.tensor(lab)[k], 0.5)][:MAX_DETECTIONS].numpy()
        want = sorted((tuple(map(float, b[i])), float(s[i])) for i in k)
        assert sorted((d.box, d.score) for d in detect(s, b, lab)) == want, trial
