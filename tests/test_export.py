"""The exporter: one ONNX graph per checkpoint, the graph contract, metadata, atomic writes."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from tests_helpers import assert_rois_match
from typer.testing import CliRunner

from ctmask.cli.main import app
from ctmask.core.errors import CheckpointError, ExportError, ModelError
from ctmask.core.fileio import sha256_file
from ctmask.core.presets import SMALL
from ctmask.core.spec import FORMAT, OUTPUTS, PARITY_TOLERANCES, GraphSpec
from ctmask.exporter import onnx_export
from ctmask.exporter.onnx_export import default_opset, export_onnx, graph_problems
from ctmask.runtime.runner import OnnxRuntimeRunner


def output_dims(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def test_small_graph_contract_and_metadata(small_onnx, cls_ckpt):
    dims = output_dims(small_onnx)
    s, n = SMALL.image_size, SMALL.n_rois
    assert list(dims) == ["images", "rois", "logits", "probs", "boxes", "labels"] == ["images", *OUTPUTS]
    for name, tail in {"images": [1, s, s], "rois": [n, 5], "logits": [3], "probs": [3], "boxes": [n, 4],
                       "labels": [n]}.items():
        assert isinstance(dims[name][0], str) and dims[name][0], f"{name}: batch must be symbolic"
        assert dims[name][1:] == tail, f"{name}: only the batch may be symbolic, got {dims[name]}"
    model = onnx.load(str(small_onnx))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert "NonZero" not in ops and {"NonMaxSuppression", "RoiAlign", "TopK"} <= ops
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) >= 18
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ctmask.format"] == FORMAT == "ctmask-onnx/3"
    spec = GraphSpec.from_metadata(meta, small_onnx)
    assert (spec.preset, spec.image_size, spec.n_rois) == ("small", s, n)
    assert spec.checkpoint_sha256 == sha256_file(cls_ckpt)
    from ctmask.training.checkpoint import load_checkpoint

    # The weights' identity travels with the graph, and the pre-processing it was trained with.
    ck = load_checkpoint(cls_ckpt)
    assert ck.verified and len(spec.weights_sha256) == 64 and meta["ctmask.weights_sha256"] == ck.weights_sha256
    assert json.loads(meta["ctmask.preprocess"]) == {"crop": False, "resize": "bilinear",
                                                     "window": {"level": -600.0, "width": 1500.0}}
    assert spec.opset == default_opset(model) == int(meta["ctmask.opset"]) == 18
    assert spec.class_names == ("normal", "pneumonia", "covid19") and spec.window == (-600.0, 1500.0)
    assert graph_problems(model, spec) == []


def test_graph_problems_lists_every_break(small_onnx):
    model = onnx.load(str(small_onnx))
    spec = GraphSpec.for_preset(SMALL)
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 7
    model.graph.output[2].type.tensor_type.shape.dim[0].dim_value = 4  # batch made static
    problems = graph_problems(model, spec)
    assert len(problems) == 2
    assert "logits has shape" in problems[0] and "probs has shape" in problems[1]


def test_normalisation_is_inside_the_graph(small_onnx, cls_ckpt):
    # The graph takes the [0, 1] slice; torch on the same tensor must agree.
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.evaluate import load_classifier

    x = np.random.default_rng(0).random((3, 1, SMALL.image_size, SMALL.image_size), dtype=np.float32)
    with OnnxRuntimeRunner(small_onnx) as r:
        got = r.infer({"images": x})
    model = load_classifier(load_checkpoint(cls_ckpt))
    with torch.no_grad():
        rois, logits = model(torch.from_numpy(x))  # training's forward: rois and logits only
        rois_b, logits_b, boxes = model(torch.from_numpy(x), with_boxes=True)
        rois_c, _, boxes_c, labels = model(torch.from_numpy(x), with_boxes=True, with_labels=True)
    assert torch.equal(rois, rois_b) and torch.equal(logits, logits_b)
    assert torch.equal(rois, rois_c) and torch.equal(boxes, boxes_c)
    real = rois[..., 0] > 0
    assert set(labels[real].unique().tolist()) <= {1.0, 2.0} and not labels[~real].any()
    # The graph's labels: torch's on the rows that match exactly (ties aside, the same rows).
    same = np.isclose(got["rois"], rois.numpy(), atol=1e-4).all(-1)
    assert same.mean() > 0.9 and (got["labels"][same] == labels.numpy()[same]).all()
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-3)
    np.testing.assert_allclose(got["probs"], torch.softmax(logits, -1).numpy(), atol=1e-4)
    assert_rois_match(got["rois"], rois.numpy())
    assert_boxes_match(got, rois.numpy(), boxes.numpy(), SMALL.image_size)


def assert_boxes_match(got, rois, boxes, size):
    """The graph's boxes: inside [0, S], zero on padding rows, and each matched row's box
    equal to torch's within the FP32 parity tolerance (rows matched as parity matches them)."""
    from ctmask.core.compare import align_rows
    from ctmask.exporter.parity import box_partners

    tol = PARITY_TOLERANCES["fp32"]
    assert got["boxes"].shape == (*got["rois"].shape[:2], 4) and got["boxes"].dtype == np.float32
    assert (got["boxes"] >= 0).all() and (got["boxes"] <= size).all()
    real = got["rois"][..., 0] > 0
    assert not got["boxes"][~real].any()
    assert ((got["boxes"][real][:, 2:] >= got["boxes"][real][:, :2])).all()  # x2 >= x1, y2 >= y1
    for i in range(len(rois)):
        al = align_rows(got["rois"][i], rois[i], rois.shape[1], tol)
        ranks = box_partners(al.ranks, got["rois"][i], rois[i], got["boxes"][i], boxes[i], tol)
        m = ranks >= 0
        assert m.sum() >= 0.9 * real[i].sum()  # near-ties at the cut may miss their partner
        np.testing.assert_allclose(got["boxes"][i][m], boxes[i][ranks[m]], rtol=tol["boxes"].rtol,
                                   atol=tol["boxes"].atol)


def test_padding_rows_have_zero_boxes(cls_ckpt, synth_dir, tmp_path):
    """A score threshold that leaves padding rows: their boxes are zeros in torch and in the graph."""
    import dataclasses

    from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
    from ctmask.training.evaluate import load_classifier

    ck = load_checkpoint(cls_ckpt, kind="classifier")
    padded = tmp_path / "padded.pt"
    save_checkpoint(padded, kind="classifier", preset=dataclasses.replace(ck.preset, cls_score_thresh=0.135),
                    model=ck.model)
    out = tmp_path / "padded.onnx"
    export_onnx(padded, out)
    from ctmask.scans.batch import load_slice

    files = sorted((synth_dir / "images").iterdir())[:8]
    x = np.stack([load_slice(f, SMALL.image_size) for f in files])[:, None].astype(np.float32)
    with OnnxRuntimeRunner(out) as r:
        got = r.infer({"images": x})
        assert list(got) == list(OUTPUTS)
    with torch.no_grad():
        rois, _, boxes = load_classifier(load_checkpoint(padded))(torch.from_numpy(x), with_boxes=True)
    pad = got["rois"][..., 0] == 0
    assert pad.any() and (~pad).any(), "the threshold must leave both real and padding rows"
    assert not boxes.numpy()[rois.numpy()[..., 0] == 0].any()
    assert_boxes_match(got, rois.numpy(), boxes.numpy(), SMALL.image_size)


def test_a_format_1_graph_is_refused_with_the_re_export_command(small_onnx, tmp_path):
    proto = onnx.load(str(small_onnx))
    for prop in proto.metadata_props:
        if prop.key == "ctmask.format":
            prop.value = "ctmask-onnx/1"
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    with pytest.raises(ModelError, match="ctmask-onnx/1.*older ctmask.*no RoI boxes") as exc:
        OnnxRuntimeRunner(old).activate()
    assert "ctmask export CKPT --out" in str(exc.value) and str(old) in str(exc.value)
    res = CliRunner().invoke(app, ["infer", str(old), str(tmp_path)])
    assert res.exit_code == 2 and "ctmask export CKPT --out" in res.output and "Traceback" not in res.output


def test_segmentation_checkpoint_is_refused_and_nothing_written(seg_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(CheckpointError, match="expected a classifier checkpoint"):
        export_onnx(seg_ckpt, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_paper_preset_exports_and_matches_torch(paper_graph):
    """Untrained paper-preset weights: the full-size graph, its shapes and its parity."""
    from ctmask.core.graphs import read_spec

    model, _, out = paper_graph
    assert read_spec(out).n_rois == 256 and not list(out.parent.glob(".*tmp"))
    dims = output_dims(out)
    assert dims["rois"][1:] == [256, 5] and dims["logits"][1:] == [3] and dims["images"][1:] == [1, 512, 512]
    assert dims["boxes"][1:] == [256, 4]
    assert all(isinstance(d[0], str) for d in dims.values())
    x = torch.rand(2, 1, 512, 512, generator=torch.Generator().manual_seed(1))
    with OnnxRuntimeRunner(out) as r:
        got = r.infer({"images": x.numpy()})
    with torch.no_grad():
        rois, logits, boxes = model(x, with_boxes=True)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-3)
    # Untrained weights rank many near-identical scores: near-tied rows may swap.
    assert_rois_match(got["rois"], rois.numpy())
    assert (got["boxes"] >= 0).all() and (got["boxes"] <= 512).all() and got["boxes"].shape == (2, 256, 4)


def test_an_opset_onnx_does_not_know_is_refused_before_any_work(cls_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="opset 40 does not exist"):
        export_onnx(cls_ckpt, out, opset=40)
    res = CliRunner().invoke(app, ["export", str(cls_ckpt), "--out", str(out), "--opset", "40"])
    assert res.exit_code == 2 and "opset 40 does not exist" in res.output and "between 18 and" in res.output
    assert "Traceback" not in res.output and "wrote" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_an_opset_the_exporter_silently_falls_back_from_is_refused(cls_ckpt, small_onnx, tmp_path, monkeypatch):
    """torch.onnx converts to the requested opset and, when that fails, keeps its own one
    without an error: the file would say opset 18 while ctmask reported 21."""
    monkeypatch.setattr(onnx_export, "_TRACES", OrderedDict())  # this process's real traces stay out of it
    monkeypatch.setattr(onnx_export, "trace_to_onnx", lambda model, opset: onnx.load(str(small_onnx)))
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="could not produce opset 21 .*came out at opset 18"):
        export_onnx(cls_ckpt, out, opset=21)
    assert list(tmp_path.iterdir()) == []


def test_export_at_a_newer_opset_reports_the_files_real_opset(cls_ckpt, tmp_path):
    out = tmp_path / "m21.onnx"
    res = CliRunner().invoke(app, ["export", str(cls_ckpt), "--out", str(out), "--opset", "21", "--json", "-"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    model = onnx.load(str(out))
    assert default_opset(model) == 21 == info["opset"] == int(info["metadata"]["ctmask.opset"])
    assert {p.key: p.value for p in model.metadata_props}["ctmask.opset"] == "21"
    assert "opset 21" in res.stderr
    with OnnxRuntimeRunner(out) as r:
        assert r.spec.opset == 21


def _at_opset(path, opset):
    model = onnx.load(str(path))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    return model


def test_a_graph_onnxruntime_cannot_load_is_refused_and_nothing_written(cls_ckpt, small_onnx, tmp_path, monkeypatch):
    """onnx.checker passes an opset-22 graph, but onnxruntime has no RoiAlign(22) kernel:
    export must fail naming the opset and onnxruntime's message instead of writing a file
    that cannot run. (The exporter is simulated: the real graph, its opset import set to 22.)"""
    bumped = _at_opset(small_onnx, 22)
    onnx.checker.check_model(bumped, full_check=True)  # what export used to rely on
    problem = onnx_export.onnxruntime_problem(bumped)
    if problem is None:
        pytest.skip("the installed onnxruntime runs this graph at opset 22")
    monkeypatch.setattr(onnx_export, "_TRACES", OrderedDict())  # this process's real traces stay out of it
    monkeypatch.setattr(onnx_export, "trace_to_onnx", lambda model, opset: _at_opset(small_onnx, opset))
    out = tmp_path / "m22.onnx"
    res = CliRunner().invoke(app, ["export", str(cls_ckpt), "--out", str(out), "--opset", "22"])
    assert res.exit_code == 2, res.output
    assert "opset 22" in res.output and problem in res.output and "nothing was written" in res.output
    assert "Traceback" not in res.output and "passed" not in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_export_at_opset_22_writes_only_what_onnxruntime_runs(cls_ckpt, tmp_path):
    """The real exporter at opset 22: either the file is written and onnxruntime runs it,
    or export fails naming the opset (onnxruntime 1.2x: RoiAlign(22) not implemented)."""
    out = tmp_path / "m22.onnx"
    res = CliRunner().invoke(app, ["export", str(cls_ckpt), "--out", str(out), "--opset", "22"])
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        with OnnxRuntimeRunner(out) as r:
            got = r.infer({"images": np.zeros((1, 1, r.spec.image_size, r.spec.image_size), np.float32)})
        assert got["probs"].shape == (1, 3)
    else:
        assert res.exit_code == 2 and "opset 22" in res.output and "onnxruntime" in res.output, res.output
        assert list(tmp_path.iterdir()) == []
