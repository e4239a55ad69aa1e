"""Reduced precision: calibration sets and ranges files, FP16 with FP32 islands, INT8 Q/DQ for
both targets, the sensitivity measurement, and parity of FP16 / INT8 graphs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tests_helpers import invoke

from ctmask.core.fileio import sha256_file
from ctmask.core.graphs import content_sha256

CANDIDATES = "backbone.body,backbone.fpn,rpn_head,box_head,box_predictor,classifier"



def meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    from ctmask.runtime.runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path) as r:
        return r.infer({"images": images})


@pytest.fixture(scope="module")
def images(small_onnx, synth_dir):
    from ctmask.core.spec import GraphSpec
    from ctmask.scans.batch import load_batch

    spec = GraphSpec.from_metadata(meta(small_onnx), small_onnx)
    batch = load_batch(sorted((synth_dir / "images").glob("*.png"))[:6], spec).batch
    return batch


@pytest.fixture(scope="module")
def ranges_file(small_onnx, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranges") / "small.ranges.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir, "--size", 8, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def int8_graphs(cls_ckpt, synth_dir, tmp_path_factory):
    """INT8 graphs of both targets, every candidate block quantized, calibrated on the synth folder."""
    folder = tmp_path_factory.mktemp("int8")
    out = {}
    for target in ("tensorrt", "cpu"):
        path = folder / f"m.{target}.onnx"
        res = invoke("export", cls_ckpt, "--out", path, "--precision", "int8", "--int8-target", target,
                     "--calibration", synth_dir, "--calibration-size", 8, "--fp32-blocks", "none",
                     "--json", folder / f"{target}.json", "-q")
        assert res.exit_code == 0, res.output
        out[target] = path
    return out


def test_balanced_sample_takes_classes_in_turn():
    from ctmask.calibration.slices import balanced_sample

    labels = [0] * 50 + [1] * 5 + [2] * 20
    picked = balanced_sample(labels, 15, seed=1)
    counts = np.bincount([labels[i] for i in picked], minlength=3)
    assert list(counts) == [5, 5, 5]
    picked = balanced_sample(labels, 30, seed=1)  # class 1 runs out: the others take its turns
    assert np.bincount([labels[i] for i in picked], minlength=3)[1] == 5 and len(picked) == 30
    assert balanced_sample(labels, 30, seed=1) == picked  # deterministic
    assert len(balanced_sample([None] * 4, 10, seed=0)) == 4


def test_calibrate_writes_a_ranges_file_tied_to_its_graph(ranges_file, small_onnx):
    d = json.loads(ranges_file.read_text())
    assert d["format"] == "ctmask-ranges/1" and d["method"] == "minmax"
    assert d["graph"]["sha256"] == content_sha256(onnx.load(str(small_onnx)))
    assert len(d["slices"]) == 8 and all(len(s["sha256"]) == 64 for s in d["slices"])
    assert all(Path(s["file"]).name.startswith("train_") for s in d["slices"])  # the synth folder's training split
    labels = [s["label"] for s in d["slices"]]
    assert max(labels.count(k) for k in set(labels)) - min(labels.count(k) for k in set(labels)) <= 1
    lo_hi = list(d["ranges"].values())
    assert lo_hi and all(lo <= hi and np.isfinite([lo, hi]).all() for lo, hi in lo_hi)
    for s in d["slices"]:  # the hashes are the files' own
        assert s["sha256"] == sha256_file(s["file"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrators(method, small_onnx, synth_dir, tmp_path):
    out = tmp_path / "r.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir / "train_COVIDx_CT.txt", "--size", 3,
                 "--method", method, "--bins", 256, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["method"] == method and d["ranges"] and d["options"]["num_bins"] == 256


def test_calibrate_refuses_bad_sources_and_writes_nothing(small_onnx, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (junk / "b.dcm").write_bytes(b"not a dicom at all")
    out = tmp_path / "r.json"
    for source, message in ((empty, "holds no images"), (junk, "could be read"),
                            (tmp_path / "missing", "does not exist")):
        res = invoke("calibrate", small_onnx, "--images", source, "--out", out)
        assert res.exit_code == 2, res.output
        assert message in res.output and str(source) in res.output
        assert "Traceback" not in res.output
        assert not out.exists()
    res = invoke("calibrate", small_onnx, "--images", empty, "--out", out, "--method", "median")
    assert res.exit_code == 2 and "unknown calibration method" in res.output


def test_int8_graphs_hold_the_promised_qdq(int8_graphs):
    from ctmask.exporter.precision import qdq_summary

    for target, path in int8_graphs.items():
        proto = onnx.load(str(path))
        m = {p.key: p.value for p in proto.metadata_props}
        assert m["ctmask.precision"] == "int8" and m["ctmask.int8_target"] == target
        assert json.loads(m["ctmask.calibration"])["method"] == "minmax"
        q = qdq_summary(proto)
        assert q["quantize_linear"] > 10
        assert set(q["weight_types"]) <= {"int8", "int32"} and q["weight_zero_points"] == [0]  # symmetric weights
        if target == "tensorrt":
            assert q["activation_types"] == {"int8": q["activation_types"]["int8"]}
            assert q["activation_zero_points_all_zero"]
            assert set(q["weight_types"]) == {"int8"}  # biases stay float: TensorRT dequantizes int8 only
        else:
            assert set(q["activation_types"]) == {"uint8"}
        inits = {t.name: t for t in proto.graph.initializer}
        per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                       and numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8
                       and numpy_helper.to_array(inits[n.input[1]]).size > 1]
        assert per_channel, "weights are quantized per output channel"
        for io in (*proto.graph.input, *proto.graph.output):
            assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_graphs_run_and_keep_the_contract(int8_graphs, small_onnx, images):
    ref = run(small_onnx, images)
    for path in int8_graphs.values():
        out = run(path, images)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


def test_second_export_reuses_the_ranges_without_calibrating(int8_graphs, cls_ckpt, tmp_path, monkeypatch):
    import ctmask.calibration.collect as collect

    first = int8_graphs["tensorrt"]
    saved = first.with_name(first.stem + ".ranges.json")
    assert saved.is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(collect, "collect_ranges", no_calibration)
    out = tmp_path / "again.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--int8-target", "cpu",
                 "--calibration", saved, "--fp32-blocks", "none", "--json", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "e.json").read_text())["precision_summary"]
    assert summary["calibrated"] is False and "ranges" not in summary["files"]
    assert "no calibration ran" in res.output


def test_ranges_of_another_graph_are_refused(ranges_file, cls_ckpt, tmp_path):
    d = json.loads(ranges_file.read_text())
    d["graph"]["sha256"] = "0" * 64
    other = tmp_path / "other.ranges.json"
    other.write_text(json.dumps(d))
    out = tmp_path / "m.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--calibration", other,
                 "--fp32-blocks", "none")
    assert res.exit_code == 2, res.output
    assert "ranges were measured on" in res.output and str(other) in res.output
    assert not out.exists() and not list(tmp_path.glob("m.*"))


def test_fp32_blocks_values():
    from ctmask.core.errors import ConfigError
    from ctmask.exporter.reduced import parse_fp32_blocks

    assert parse_fp32_blocks("none") == parse_fp32_blocks(" none, none ,") == ()
    assert parse_fp32_blocks(",classifier, box_head,classifier,") == ("classifier", "box_head")
    assert parse_fp32_blocks("classifier,ranking") == ("classifier", "ranking")
    for value, message in (("", "names no block"), (" , ", "names no block"), ("none,classifier", "cannot go with"),
                           ("classifier,head", "unknown block(s) ['head']"), ("NONE", "unknown block")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_fp32_blocks(value)


def test_bad_int8_requests_write_nothing(cls_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    cases = [
        (("--precision", "int8"), "needs calibration data"),
        (("--precision", "int8", "--calibration", tmp_path / "nothing.json"), "does not exist"),
        (("--precision", "int8", "--calibration", tmp_path / "nodir"), "does not exist"),
        (("--precision", "fp16"), "--calibration"),
        (("--precision", "int8", "--int8-target", "gpu", "--calibration", tmp_path), "unknown --int8-target"),
        (("--precision", "fp16", "--fp32-blocks", "backbone,head"), "unknown block"),
        (("--precision", "fp16", "--fp32-blocks", " , "), "names no block"),
        (("--precision", "fp16", "--fp32-blocks", "none,classifier"), "cannot go with block names"),
        (("--precision", "fp32", "--calibration", tmp_path), "only apply to"),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((("--precision", "int8", "--calibration", tmp_path / "bad.json"), "not a JSON ranges file"))
    for args, message in cases:
        res = invoke("export", cls_ckpt, "--out", out, *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
        assert not out.exists()


def test_fp32_islands_really_stay_fp32(small_onnx, images):
    """Every block listed FP32: the converted graph computes exactly what the FP32 graph does
    (onnxconverter-common alone would round every island activation to FP16)."""
    from ctmask.exporter.precision import BLOCKS, convert_fp16
    from ctmask.exporter.sensitivity import run_graph

    proto = onnx.load(str(small_onnx))
    ref = run_graph(proto, images)
    same = run_graph(convert_fp16(proto, set(BLOCKS)), images)
    for k in ref:
        np.testing.assert_array_equal(same[k], ref[k])
    # Only S in FP16: the RoIs are untouched, the logits move by FP16 rounding only.
    s_half = run_graph(convert_fp16(proto, set(BLOCKS) - {"classifier"}), images)
    np.testing.assert_array_equal(s_half["rois"], ref["rois"])
    assert 0 < np.abs(s_half["logits"] - ref["logits"]).max() < 0.05


def test_fp16_export_measures_its_islands_and_records_them(cls_ckpt, synth_dir, tmp_path):
    out = tmp_path / "m16.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "fp16", "--calibration", synth_dir,
                 "--measure-size", 6, "--json", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    proto = onnx.load(str(out))
    m = {p.key: p.value for p in proto.metadata_props}
    assert m["ctmask.precision"] == "fp16"
    islands = json.loads(m["ctmask.fp32_islands"])
    assert "ranking" in islands and all(isinstance(v, str) and v for v in islands.values())
    reduced = json.loads(m["ctmask.reduced_blocks"])
    assert reduced and not set(reduced) & set(islands)
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "an FP16 graph holds float16 weights"
    for io in (*proto.graph.input, *proto.graph.output):
        assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = json.loads(out.with_name("m16.precision.json").read_text())
    assert report["source_sha256"] == m["ctmask.source_sha256"]
    assert {e["blocks"][0] for e in report["choice"]["alone"]} == set(CANDIDATES.split(","))
    # The report is reused: same islands, nothing measured.
    again = tmp_path / "again.onnx"
    res = invoke("export", cls_ckpt, "--out", again, "--precision", "fp16", "--islands",
                 out.with_name("m16.precision.json"), "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(meta(again)["ctmask.fp32_islands"]) == islands


def test_choose_islands_keeps_a_block_that_changes_calls(small_onnx, images):
    """A reduction that flips class calls whenever ``box_head`` is reduced: box_head must stay FP32,
    with the measurement in its reason; the others are reduced."""
    from ctmask.exporter.precision import BLOCKS, convert_fp16
    from ctmask.exporter.sensitivity import choose_islands, run_graph

    proto = onnx.load(str(small_onnx))
    calls = run_graph(proto, images)["logits"].argmax(-1)

    def reduce(p, fp32_blocks):
        g = convert_fp16(p, fp32_blocks)
        if "box_head" not in fp32_blocks:  # the "sensitive" block: swap S's class biases so calls change
            for init in g.graph.initializer:
                if init.name == "model.classifier.net.4.bias":
                    b = numpy_helper.to_array(init).astype(np.float32)
                    shift = np.zeros_like(b)
                    shift[(int(np.bincount(calls, minlength=3).argmax()) + 1) % 3] = 1e3
                    init.CopyFrom(numpy_helper.from_array((b + shift).astype(b.dtype), init.name))
        return g

    choice = choose_islands(proto, images, "fp16", reduce, 0.0)
    assert "box_head" in choice.islands and "class calls changed" in choice.islands["box_head"]
    alone = {e.blocks[0]: e for e in choice.alone}
    assert alone["box_head"].changed_calls > 0 and alone["box_head"].max_abs_logits > 100
    assert "box_head" not in choice.reduced
    assert choice.final.changed_calls == 0 and choice.final.blocks == sorted(choice.reduced)
    assert set(choice.islands) <= set(BLOCKS)


def test_parity_judges_a_reduced_graph_by_its_own_table(cls_ckpt, small_onnx, synth_dir, tmp_path):
    out = tmp_path / "s16.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "fp16", "--fp32-blocks",
                 "backbone.body,backbone.fpn,rpn_head,box_head,box_predictor", "-q")
    assert res.exit_code == 0, res.output
    res = invoke("parity", cls_ckpt, out, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
                 "--fp32", small_onnx, "--labels", synth_dir / "test_COVIDx_CT.txt", "--json", tmp_path / "p.json",
                 "-q")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["precision"] == "fp16" and report["min_argmax_agreement"] == 0.995
    assert report["tolerances"]["logits"]["atol"] == 0.5
    assert report["decisions"]["agreement_vs_fp32_graph"] == 1.0
    assert report["outputs"]["s.logits"]["passed"] and res.exit_code == 0, res.output


def test_parity_catches_s_quantized_to_int8(cls_ckpt, synth_dir, ranges_file, tmp_path):
    """S in INT8 (the rois tensor mixes scores in [0, 1] and deltas of several units in one
    per-tensor int8 scale): parity's s.logits line fails, whatever the class calls do."""
    out = tmp_path / "s8.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--calibration", ranges_file,
                 "--fp32-blocks", "backbone.body,backbone.fpn,rpn_head,box_head,box_predictor", "-q")
    assert res.exit_code == 0, res.output
    res = invoke("parity", cls_ckpt, out, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
                 "--json", tmp_path / "p.json", "-q")
    report = json.loads((tmp_path / "p.json").read_text())
    assert res.exit_code == 1
    assert "s.logits" in report["failures"]


def test_precision_report_command(cls_ckpt, synth_dir, tmp_path):
    out = tmp_path / "r.json"
    res = invoke("precision-report", cls_ckpt, "--images", synth_dir, "--precision", "fp16", "--measure-size", 4,
                 "--out", out, "-q")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["format"] == "ctmask-precision-report/1" and d["choice"]["n_slices"] == 4
    assert "calls changed" in res.output and "FP32 island ranking" in res.output
    # Bad --out values are refused before anything is measured, and the inputs stay as they were.
    before = out.read_bytes()
    for bad, why in ((out / "x.json", "is a file"), (tmp_path, "is a folder"), (out, "overwrite an input")):
        images = out if bad == out else synth_dir
        res = invoke("precision-report", cls_ckpt, "--images", images, "--precision", "int8", "--out", bad, "-q")
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    assert out.read_bytes() == before


def test_infer_and_the_openvino_backend_take_reduced_graphs(int8_graphs, synth_dir, tmp_path):
    pytest.importorskip("openvino")
    folder = synth_dir / "images"
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / f"{backend}.jsonl"
        res = invoke("infer", int8_graphs["cpu"], folder, "--backend", backend, "--out", out, "-q")
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == len(list(folder.glob("*.png"))) and all(r["class"] for r in rows)


def _edited_ranges(ranges_file, tmp_path, name, edit):
    d = json.loads(ranges_file.read_text())
    edit(d)
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_corrupt_or_partial_ranges_are_refused_cleanly(ranges_file, cls_ckpt, tmp_path):
    def keep_five(d):
        d["ranges"] = dict(list(d["ranges"].items())[:5])

    def huge(d):
        k = next(iter(d["ranges"]))
        d["ranges"][k] = [-1e300, 1e300]

    def ops_string(d):
        d["options"]["op_types"] = "Conv"

    def strings(d):
        k = next(iter(d["ranges"]))
        d["ranges"][k] = ["1", "2"]

    cases = [(keep_five, "do not cover"), (huge, "beyond"), (ops_string, "op_types"), (strings, "numbers")]
    for i, (edit, message) in enumerate(cases):
        bad = _edited_ranges(ranges_file, tmp_path, f"bad{i}.json", edit)
        out = tmp_path / f"m{i}.onnx"
        res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--calibration", bad,
                     "--fp32-blocks", "none")
        assert res.exit_code == 2, (message, res.output)
        assert message in res.output and "Traceback" not in res.output
        assert not list(tmp_path.glob(f"m{i}*"))


def test_ranges_follow_the_graph_not_the_checkpoint_path(ranges_file, cls_ckpt, tmp_path):
    import shutil

    moved = tmp_path / "moved.pt"
    shutil.copy(cls_ckpt, moved)
    out = tmp_path / "m.onnx"
    res = invoke("export", moved, "--out", out, "--precision", "int8", "--calibration", ranges_file,
                 "--fp32-blocks", "none", "-q")
    assert res.exit_code == 0, res.output


def test_calibrate_refuses_outputs_that_would_destroy_inputs(small_onnx, synth_dir, tmp_path):
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copy(small_onnx, model)
    before = model.read_bytes()
    for out, message in ((model, "overwrite"), (tmp_path, "is a folder"), (model / "r.json", "is a file")):
        res = invoke("calibrate", model, "--images", synth_dir, "--out", out)
        assert res.exit_code == 2 and message in res.output, res.output
    assert model.read_bytes() == before


def test_a_blocked_sidecar_leaves_no_graph(cls_ckpt, synth_dir, tmp_path):
    (tmp_path / "m.ranges.json").mkdir()
    res = invoke("export", cls_ckpt, "--out", tmp_path / "m.onnx", "--precision", "int8", "--calibration", synth_dir,
                 "--calibration-size", 4, "--fp32-blocks", "none")
    assert res.exit_code == 2 and "folder" in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_fp16_measures_on_the_slices_of_a_ranges_file(ranges_file, cls_ckpt, tmp_path):
    out = tmp_path / "m16.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "fp16", "--calibration", ranges_file, "-q",
                 "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["precision_summary"]["sensitivity"]["n_slices"] == 8
    d = json.loads(out.with_name("m16.precision.json").read_text())
    d["choice"] = "x"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    res = invoke("export", cls_ckpt, "--out", tmp_path / "again.onnx", "--precision", "fp16", "--islands",
                 tmp_path / "bad.json")
    assert res.exit_code == 2 and "malformed precision report" in res.output


def test_parity_refuses_a_graph_whose_contents_contradict_its_precision(cls_ckpt, small_onnx, synth_dir, tmp_path):
    """An FP32 graph relabelled int8 would be judged by looser tolerances: refused outright."""
    proto = onnx.load(str(small_onnx))
    for p in proto.metadata_props:
        if p.key == "ctmask.precision":
            p.value = "int8"
    proto.metadata_props.add(key="ctmask.int8_target", value="tensorrt")
    fake = tmp_path / "fake-int8.onnx"
    onnx.save(proto, str(fake))
    res = invoke("parity", cls_ckpt, fake, "--images", synth_dir / "images", "--no-noise", "--max-images", 2)
    assert res.exit_code == 2 and "contradict" in res.output and "no QuantizeLinear" in res.output


def test_content_hash_ignores_metadata_and_stack_traces_but_not_weights(small_onnx):
    proto = onnx.load(str(small_onnx))
    base = content_sha256(proto)
    proto.metadata_props.add(key="x", value="y")
    for node in proto.graph.node[:5]:
        for p in node.metadata_props:
            p.value = "File \"/somewhere/else.py\", line 1"
    assert content_sha256(proto) == base
    w = proto.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] += 1
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    assert content_sha256(proto) != base


def test_residual_ops_calibrate_and_quantize(small_onnx, cls_ckpt, synth_dir, tmp_path):
    ranges = tmp_path / "res.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir, "--size", 4, "--ops", "residual", "--out", ranges,
                 "-q")
    assert res.exit_code == 0, res.output
    d = json.loads(ranges.read_text())
    assert "Add" in d["options"]["op_types"] and all(np.isfinite(v).all() for v in d["ranges"].values())
    out = tmp_path / "r8.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--int8-target", "cpu", "--calibration",
                 ranges, "--fp32-blocks", "classifier", "-q")
    assert res.exit_code == 0, res.output
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops


def test_runner_refuses_a_graph_with_float16_outputs(small_onnx, tmp_path):
    from onnx import TensorProto, helper

    from ctmask.core.errors import ModelError
    from ctmask.runtime.runner import OnnxRuntimeRunner

    proto = onnx.load(str(small_onnx))
    for node in proto.graph.node:
        node.output[:] = ["probs32" if o == "probs" else o for o in node.output]
    proto.graph.node.append(helper.make_node("Cast", ["probs32"], ["probs"], to=TensorProto.FLOAT16))
    for out in proto.graph.output:
        if out.name == "probs":
            out.type.tensor_type.elem_type = TensorProto.FLOAT16
    path = tmp_path / "half-out.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="float32 at every precision"):
        OnnxRuntimeRunner(path).activate()


def test_one_node_alone_is_quantized_and_the_noise_floor_is_measured(small_onnx, images, ranges_file):
    """The per-node measurement's graph quantizes that node and nothing else; the noise floor
    is the FP32 graph under seeded input noise (repeatable, and zero noise changes nothing)."""
    from ctmask.calibration.ranges import load_ranges
    from ctmask.exporter.sensitivity import candidate_nodes, node_reducer, noise_floor, run_graph

    proto = onnx.load(str(small_onnx))
    nodes = candidate_nodes(proto, "int8")
    assert {op for _, op, _ in nodes} <= {"Conv", "Gemm", "MatMul"}
    assert {b for _, _, b in nodes} >= {"backbone.body", "rpn_head", "box_head", "classifier"}
    name = next(n for n, op, b in nodes if b == "rpn_head")  # shares its weights and its input
    for target_kind in ("tensorrt", "cpu"):
        graph = node_reducer("int8", load_ranges(ranges_file), target_kind)(proto, {name})
        target = next(n for n in graph.graph.node if n.name == name)
        producers = {o: n for n in graph.graph.node for o in n.output}
        assert all(producers[i].op_type == "DequantizeLinear" for i in target.input[:2])  # activation and weight

        def source(dq):  # the float tensor a DequantizeLinear stands for (None: a quantized weight)
            q = producers.get(dq.input[0])
            return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

        for node in graph.graph.node:
            if node.name == name or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            for i in node.input:
                dq = producers.get(i)
                if dq is not None and dq.op_type == "DequantizeLinear":
                    # Other nodes read rounded values only where the node's own output is rounded:
                    # not its (shared) input activation, not its weights (shared by the other levels).
                    assert source(dq) in target.output, (node.name, i)
        others = [n for n in graph.graph.node if n.op_type == "Conv" and n.name != name
                  and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                          for i in n.input)]
        assert not others, [n.name for n in others]

    # FP16 alone: the shared weights are copied, so the graph loads and only that node is half.
    graph = node_reducer("fp16")(proto, {name})
    inits = {t.name: t for t in graph.graph.initializer}
    target = next(n for n in graph.graph.node if n.name == name)
    assert inits[target.input[1]].data_type == onnx.TensorProto.FLOAT16
    half = [n.name for n in graph.graph.node if n.op_type == "Conv"
            and any(inits.get(i) is not None and inits[i].data_type == onnx.TensorProto.FLOAT16 for i in n.input)]
    assert half == [name]
    assert np.abs(run_graph(graph, images)["logits"] - run_graph(proto, images)["logits"]).max() > 0

    ref = run_graph(proto, images)
    a, b = noise_floor(proto, images, ref), noise_floor(proto, images, ref)
    assert a.n == len(images) and a.max_abs_logits == b.max_abs_logits > 0
    assert noise_floor(proto, images, ref, gray_levels=0.0).max_abs_logits == 0.0


def test_precision_report_per_node(cls_ckpt, synth_dir, tmp_path, monkeypatch):
    """``--nodes`` adds one line per node (two nodes here, to keep the suite fast) and the
    noise-floor line; the report's JSON holds both."""
    from ctmask.exporter import sensitivity

    real = sensitivity.candidate_nodes

    def two(proto, precision):  # the first backbone convolution and the first (weight-sharing) RPN one
        nodes = real(proto, precision)
        return [nodes[0], next(n for n in nodes if n[2] == "rpn_head")]

    monkeypatch.setattr(sensitivity, "candidate_nodes", two)
    out = tmp_path / "r.json"
    res = invoke("precision-report", cls_ckpt, "--images", synth_dir, "--precision", "fp16", "--measure-size", 4,
                 "--nodes", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())["choice"]
    assert len(d["nodes"]) == 2 and all(e["n"] == 4 and e["op_type"] == "Conv" for e in d["nodes"])
    assert [e["block"] for e in d["nodes"]] == ["backbone.body", "rpn_head"]
    assert all(e["max_abs_logits"] > 0 for e in d["nodes"])  # each graph really reduced its node
    assert d["noise_floor"]["gray_levels"] == 0.25 and d["noise_floor"]["n"] == 4
    assert "each node alone (2)" in res.output and "FP32 itself, input noise" in res.output
