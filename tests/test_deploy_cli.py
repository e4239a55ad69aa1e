"""ctmask export / infer / parity / bench, end to end on the small preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tests_helpers import invoke


@pytest.fixture()
def slices(synth_dir, tmp_path):
    """A folder with five good test slices and one truncated PNG."""
    folder = tmp_path / "slices"
    folder.mkdir()
    good = sorted((synth_dir / "images").glob("test_*.png"))[:5]
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "test_broken.png").write_bytes(good[0].read_bytes()[:300])
    return folder


def perturbed_graph(src: Path, dst: Path, name: str, scale: float, seed: int = 0) -> Path:
    """Copy of ``src`` with initializer ``name`` multiplied by (1 + scale * noise)."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == name:
            w = numpy_helper.to_array(init)
            noise = np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(w * (1 + scale * noise), name))
            break
    else:
        raise KeyError(name)
    onnx.save(model, str(dst))
    return dst


def test_export_command(cls_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    assert "checker (full_check) passed" in res.output
    info = json.loads((tmp_path / "e.json").read_text())
    assert info["metadata"]["ctmask.preset"] == "small" and info["metadata"]["ctmask.n_rois"] == "64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "m.onnx"]


def test_infer_skips_bad_slice_and_writes_the_rest(small_onnx, slices, tmp_path):
    out = tmp_path / "preds.jsonl"
    res = invoke("infer", small_onnx, slices, "--out", out, "-b", "4", "-q", "--json", tmp_path / "s.json")
    assert res.exit_code == 1, res.output
    assert "test_broken.png" in res.output and "cannot decode image" in res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["class"] in ("normal", "pneumonia", "covid19") for r in rows)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 and len(r["top_rois"]) == 5 for r in rows)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["predicted"] == 5 and summary["runner"]["provider"] == "CPUExecutionProvider"
    assert [s["file"] for s in summary["skipped"]] == [str(slices / "test_broken.png")]


def test_infer_from_a_checkpoint_runs_the_pytorch_path(cls_ckpt, small_onnx, slices, tmp_path):
    for model, name in ((cls_ckpt, "torch.jsonl"), (small_onnx, "onnx.jsonl")):
        res = invoke("infer", model, slices, "--out", tmp_path / name, "-q", "--json", tmp_path / (name + ".json"))
        assert res.exit_code == 1, res.output
    assert json.loads((tmp_path / "torch.jsonl.json").read_text())["runner"]["backend"] == "torch-cpu"
    torch_rows = [json.loads(line) for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    onnx_rows = [json.loads(line) for line in (tmp_path / "onnx.jsonl").read_text().splitlines()]
    assert [r["class"] for r in torch_rows] == [r["class"] for r in onnx_rows]


def test_infer_csv(small_onnx, slices, tmp_path):
    (slices / "test_broken.png").unlink()
    out = tmp_path / "preds.csv"
    res = invoke("infer", small_onnx, slices, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert lines[0] == ("file,class,class_index,prob_normal,prob_pneumonia,prob_covid19,n_rois,top_roi_score,"
                        "key,id,label,study,series,position,frame,kind,size,top_boxes,overlay")
    assert len(lines) == 6


@pytest.mark.parametrize("kind", ["junk", "foreign"])
def test_infer_with_a_bad_model_writes_nothing(kind, slices, tmp_path, foreign_model):
    model = tmp_path / "model.onnx"
    if kind == "junk":
        model.write_bytes(b"\x08\x07garbage")
    else:
        shutil.copy(foreign_model, model)
    out = tmp_path / "preds.jsonl"
    res = invoke("infer", model, slices, "--out", out, "-q")
    assert res.exit_code == 2
    assert str(model) in res.output
    assert ("not a loadable ONNX model" if kind == "junk" else "no ctmask metadata") in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_infer_never_imports_torch(small_onnx, slices, tmp_path):
    """A subprocess in which importing torch raises: infer must still work."""
    out = tmp_path / "p.jsonl"
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from ctmask.cli.main import app\n"
        f"sys.argv = ['ctmask', 'infer', {str(small_onnx)!r}, {str(slices)!r}, '--out', {str(out)!r}, '-q']\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('torch loaded:', any(m == 'torch' or m.startswith('torch.') for m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "exit 1" in proc.stdout, proc.stdout + proc.stderr  # 1: the broken slice was skipped
    assert "torch loaded: False" in proc.stdout
    assert len(out.read_text().splitlines()) == 5


def test_parity_passes_on_the_exported_graph(cls_ckpt, small_onnx, synth_dir, tmp_path):
    out = tmp_path / "parity.json"
    res = invoke("parity", cls_ckpt, small_onnx, "--images", synth_dir / "images", "--json", out, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["n_images"] == 24 and report["argmax_agreement"] == 1.0
    outs = report["outputs"]
    assert set(outs) == {"rois.score", "rois.deltas", "rois.order", "boxes", "labels", "logits", "probs", "s.logits",
                         "probs.softmax"}
    assert outs["logits"]["max_abs"] <= 1e-3 and outs["rois.score"]["max_abs"] <= 1e-4
    for r in outs.values():
        assert {"max_abs", "mean_abs", "max_rel", "mean_rel", "required_atol", "passed"} <= set(r)
    rows = report["rois"]
    assert rows["rows"] == 24 * 64 and rows["unmatched"] == rows["missing"] == rows["intruders"] == 0
    assert report["reference_candidates"] == 64 and report["precision"] == "fp32" and not report["warnings"]


def test_parity_catches_a_perturbed_graph(cls_ckpt, small_onnx, synth_dir, tmp_path):
    # 1% noise on the box-regression weights: scores and classes are untouched, only the
    # RoI deltas move. Tie-robust matching must not hide that.
    bad = perturbed_graph(small_onnx, tmp_path / "bad.onnx", "model.ranker.box_predictor.bbox_pred.weight", 0.01)
    out = tmp_path / "parity.json"
    res = invoke("parity", cls_ckpt, bad, "--images", synth_dir / "images", "--json", out, "-q", "--no-noise")
    assert res.exit_code == 1, res.output
    report = json.loads(out.read_text())
    assert not report["passed"] and "rois.deltas" in report["failures"]
    assert report["outputs"]["rois.score"]["passed"]
    assert report["failing_slices"] and all("rois.deltas" in f["max_abs"] for f in report["failing_slices"])
    assert report["failing_slices"][0]["file"].endswith(".png")
    assert "FAILED" in res.output


def test_parity_catches_a_perturbed_checkpoint(cls_ckpt, small_onnx, synth_dir, tmp_path):
    import torch

    from ctmask.training.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(cls_ckpt)
    state = dict(ck.model)
    key = "detector.backbone.body.layer1.0.conv1.weight"
    state[key] = state[key] * 1.02
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, kind="classifier", preset=ck.preset, model=state)
    assert not torch.equal(state[key], ck.model[key])
    out = tmp_path / "parity.json"
    res = invoke("parity", bad, small_onnx, "--images", synth_dir / "images", "--json", out, "-q", "--no-noise")
    assert res.exit_code == 1
    report = json.loads(out.read_text())
    # The detector's rows move: they are no longer the graph's candidates one to one.
    assert "rois.rows" in report["failures"] and report["rois"]["unmatched"] > 0
    assert "different checkpoint" in report["warnings"][0]


def test_polygraphy_judges_onnxruntime_against_saved_torch_outputs(cls_ckpt, small_onnx, synth_dir, tmp_path):
    polygraphy = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(polygraphy).exists():
        pytest.skip("polygraphy is not installed (pip install polygraphy)")
    saved = tmp_path / "poly"
    res = invoke("parity", cls_ckpt, small_onnx, "--images", synth_dir / "images", "--polygraphy", saved, "-q",
                 "--no-noise")
    assert res.exit_code == 0, res.output
    assert (saved / "inputs.json").exists() and (saved / "reference_outputs.json").exists()

    def polygraphy_run(model):
        cmd = [polygraphy, "run", str(model), "--onnxrt",
               "--load-inputs", str(saved / "inputs.json"), "--load-outputs", str(saved / "reference_outputs.json"),
               "--atol", "logits:1e-3", "probs:1e-4", "rois:1e-3", "--rtol", "logits:0", "probs:0", "rois:1e-3",
               "--check-error-stat", "rois:median", "logits:max", "probs:max"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    ok = polygraphy_run(small_onnx)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "PASSED" in ok.stdout and "'logits'" in ok.stdout
    bad = perturbed_graph(small_onnx, tmp_path / "bad.onnx", "model.classifier.net.4.bias", 0.5)
    assert polygraphy_run(bad).returncode != 0


def test_bench_runs_every_backend_on_the_same_inputs(cls_ckpt, small_onnx, tmp_path):
    out = tmp_path / "bench.json"
    res = invoke("bench", small_onnx, "--checkpoint", cls_ckpt, "-b", "1", "-b", "2", "--warmup", "1",
                 "--iterations", "2", "--json", out, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    got = {(r["backend"], r["batch_size"]) for r in report["results"]}
    assert {("onnxruntime-cpu", 1), ("onnxruntime-cpu", 2), ("torch-cpu", 1), ("torch-cpu", 2)} <= got
    for r in report["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and r["throughput"] > 0
        assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 0
    assert set(report["speedup"]["onnxruntime-cpu"]) == {"1", "2"}
    assert "vs torch" in res.output


def test_bench_without_checkpoint_uses_the_one_in_metadata(small_onnx, slices, tmp_path):
    (slices / "test_broken.png").unlink()
    out = tmp_path / "b.json"
    res = invoke("bench", small_onnx, "--backend", "torch-cpu", "-b", "3", "--warmup", "0", "--iterations", "1",
                 "--images", slices, "--json", out, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["input"] == str(slices) and [r["backend"] for r in report["results"]] == ["torch-cpu"]
    res = invoke("bench", small_onnx, "--backend", "tpu", "-q")
    assert res.exit_code == 2 and "unknown backend" in res.output


def test_json_to_stdout_is_the_only_stdout(cls_ckpt, small_onnx, slices, tmp_path):
    """With ``--json -`` stdout carries the JSON alone; ``export --json -`` is in test_export."""
    (slices / "test_broken.png").unlink()
    runs = {
        "infer": ("infer", small_onnx, slices, "--json", "-"),
        "infer --out": ("infer", small_onnx, slices, "--out", tmp_path / "p.jsonl", "--json", "-"),
        "parity": ("parity", cls_ckpt, small_onnx, "--images", slices, "--json", "-"),
        "bench": ("bench", small_onnx, "--backend", "onnxruntime-cpu", "-b", "1", "--warmup", "0",
                  "--iterations", "1", "--images", slices, "--json", "-"),
    }
    reports, stderr = {}, {}
    for what, args in runs.items():
        res = invoke(*args)
        assert res.exit_code == 0, (what, res.output)
        reports[what] = json.loads(res.stdout)  # nothing but the JSON
        stderr[what] = res.stderr
    # Without --out the predictions themselves are in the JSON (and printed to stderr).
    preds = reports["infer"]["predictions"]
    assert len(preds) == 5 and all(p["file"] in stderr["infer"] for p in preds)
    assert reports["infer --out"]["out"] == str(tmp_path / "p.jsonl") and "predictions" not in reports["infer --out"]
    assert "passed" in reports["parity"] and reports["bench"]["results"]


# ---------------------------------------------------------------- a model trained on body-cropped slices


@pytest.fixture(scope="module")
def crop_model(seg_ckpt, synth_dir, tmp_path_factory):
    """A classifier trained with ``crop=True`` (heads, one epoch on 8 slices) and its graph."""
    from ctmask.core.presets import SMALL
    from ctmask.data.covidx import read_split
    from ctmask.exporter.onnx_export import export_onnx
    from ctmask.training.train_cls import ClsTrainOptions, train_classifier

    out = tmp_path_factory.mktemp("crop") / "cls-crop.pt"
    train = read_split(synth_dir / "train_COVIDx_CT.txt")[:8]
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, crop=True)
    train_classifier(SMALL, seg_ckpt, train, None, out, opts, False)
    model = out.with_suffix(".onnx")
    export_onnx(out, model)
    return out, model


def test_crop_trained_graph_carries_the_crop_and_infer_crops_like_training(crop_model, synth_dir, tmp_path):
    import torch

    from ctmask.core.presets import SMALL
    from ctmask.data.covidx import read_split
    from ctmask.runtime.predict import CropBoxes
    from ctmask.runtime.runner import OnnxRuntimeRunner
    from ctmask.scans.batch import load_batch
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.datasets import ClassificationDataset

    ckpt, model = crop_model
    assert load_checkpoint(ckpt).preprocessing.crop
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(meta["ctmask.preprocess"])["crop"] is True
    split = synth_dir / "test_COVIDx_CT.txt"
    entries = read_split(split)
    files = [e.path for e in entries]
    training_view = torch.stack([ClassificationDataset(entries, SMALL.image_size, crop=True)[i][0]
                                 for i in range(len(entries))]).numpy()
    with OnnxRuntimeRunner(model) as r:
        assert r.spec.crop
        loaded = load_batch(files, r.spec, CropBoxes.from_split(split))
        batch, ok, failures = loaded.batch, loaded.paths, loaded.failures
        whole = load_batch(files, r.spec).batch
        expected = r.infer({"images": training_view})["probs"]
    assert ok == files and not failures
    np.testing.assert_array_equal(batch, training_view)  # bit for bit what training fed the model
    assert np.abs(whole - training_view).max() > 0.1  # and the crop matters

    # The CLI: copies of the slices in another folder (boxes matched by file name) plus one
    # slice the split file does not list.
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    stray = sorted((synth_dir / "images").glob("train_*.png"))[0]
    shutil.copy(stray, folder / stray.name)
    out = tmp_path / "p.jsonl"
    res = invoke("infer", model, folder, "--out", out, "-q")
    assert res.exit_code == 2 and "trained on slices cropped to their body box" in res.output
    assert "--boxes" in res.output and "Traceback" not in res.output and not out.exists()
    res = invoke("infer", model, folder, "--boxes", split, "--out", out, "-q", "--json", "-")
    assert res.exit_code == 1, res.output  # the stray slice has no box
    summary = json.loads(res.stdout)
    assert summary["crop"] is True and summary["predicted"] == len(files)
    assert [s["file"] for s in summary["skipped"]] == [str(folder / stray.name)]
    assert "no crop box" in summary["skipped"][0]["error"]
    rows = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    got = np.array([[rows[f.name]["probs"][c] for c in ("normal", "pneumonia", "covid19")] for f in files])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)  # records round to 6 decimals
    res = invoke("infer", model, folder, "--uncropped", "-q", "--json", "-")
    assert res.exit_code == 0 and "warning:" in res.stderr and json.loads(res.stdout)["crop"] is False
    # evaluate crops as the classifier was trained unless told otherwise.
    res = invoke("evaluate", ckpt, "--split", split, "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["crop"] is True
    torch_probs = np.array([p["probs"] for p in report["predictions"]])
    np.testing.assert_allclose(torch_probs, expected, rtol=0, atol=1e-4)
