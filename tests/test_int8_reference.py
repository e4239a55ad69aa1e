"""INT8 parity against the fake-quantized checkpoint (ctmask/exporter/int8_reference.py): the
graph's scales read back as ModelOpt amax, the float reading of residual / top-down paths,
``int8.tensors`` catching graphs that compute another model, and the fallback to FP32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tests_helpers import invoke

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def qat_scaled(cls_ckpt, small_onnx, synth_dir, tmp_path_factory):
    """A ranges file of QAT form for the tiny graph (each quantizer one symmetric range, as a
    fine-tune leaves them) and its INT8 graphs of both targets."""
    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import load_proto
    from ctmask.training.qat import amax_from_ranges, qat_ranges

    folder = tmp_path_factory.mktemp("int8ref")
    base = folder / "base.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir, "--size", 8, "--out", base, "-q")
    assert res.exit_code == 0, res.output
    proto = load_proto(small_onnx)
    calibrated = load_ranges(base)
    amax = amax_from_ranges(proto, calibrated)
    ranges = folder / "qat.json"
    qat_ranges(proto, amax, calibrated, base, small_onnx).save(ranges)
    graphs = {}
    for target in ("tensorrt", "cpu"):
        graphs[target] = folder / f"int8-{target}.onnx"
        res = invoke("export", cls_ckpt, "--out", graphs[target], "--precision", "int8", "--int8-target", target,
                     "--calibration", ranges, "--fp32-blocks", "classifier", "-q")
        assert res.exit_code == 0, res.output
    return {"amax": amax, "graphs": graphs, "base": base}


def test_the_graph_scales_are_the_quantizers_amax_on_both_targets(qat_scaled):
    from ctmask.core.graphs import load_proto
    from ctmask.exporter.int8_graph import read_quantization

    for target, path in qat_scaled["graphs"].items():
        quantization, why = read_quantization(load_proto(path))
        assert not why and set(quantization.amax) == set(qat_scaled["amax"]), target
        for q, a in quantization.amax.items():
            assert a == pytest.approx(qat_scaled["amax"][q], rel=1e-5), (target, q)
        zero_points = {(a.dtype, a.zero_point) for a in quantization.activations.values()}
        assert zero_points == ({("int8", 0)} if target == "tensorrt" else {("uint8", 128)})
        int8_weights = {n.input[0] for n in load_proto(path).graph.node
                        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")}
        assert len(quantization.weights) == len(int8_weights) == 27  # 23 detector convolutions (the RPN head's
        # three serve every level), the box head's and box predictor's two Gemms each


def test_residual_and_top_down_paths_read_float(qat_scaled):
    """Only quantized nodes read an input-quantized tensor's DequantizeLinear; a quantized
    convolution's output stays dequantized for every reader."""
    from ctmask.core.graphs import load_proto

    proto = load_proto(qat_scaled["graphs"]["tensorrt"])
    produced = {o: n for n in proto.graph.node for o in n.output}

    def via_dq(name):
        n = produced.get(name)
        return n is not None and n.op_type == "DequantizeLinear"

    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "QuantizeLinear", "DequantizeLinear"):
            continue
        for name in node.input:
            if not via_dq(name):
                continue
            q = produced[produced[name].input[0]]
            source = produced.get(q.input[0])
            assert source is not None and source.op_type in ("Conv", "Gemm"), (node.name, name)
    # the first block's identity path: an Add reads in float a tensor that is quantized for a convolution
    quantized_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert any(n.op_type == "Add" and set(n.input) & quantized_inputs for n in proto.graph.node)


def _tamper(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def _weights_off(proto):
    """One backbone convolution's weights dequantize 1.2x too large (other weights)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("layer1.0.conv1.weight_quantized"):
            t = inits[n.input[1]]
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * 1.2).astype(np.float32), t.name))
            return
    raise AssertionError("no layer1.0.conv1 weight to tamper with")


def _dq_scale_off(proto):
    """One DequantizeLinear reads a scale 1.5x its QuantizeLinear's: values come out wrong."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_QuantizeLinear_Output") and "relu" in n.input[0]:
            scale = numpy_helper.to_array(inits[n.input[1]]) * 1.5
            proto.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), n.input[1] + "_off"))
            n.input[1] = n.input[1] + "_off"
            return
    raise AssertionError("no activation DequantizeLinear to tamper with")


@pytest.mark.parametrize("target", ["tensorrt", "cpu"], ids=["trt-form", "cpu-form"])  # "tensorrt" marks TRT tests
def test_parity_judges_a_qat_scaled_graph_against_its_fake_quantized_model(qat_scaled, synth_dir, cls_ckpt, target,
                                                                           tmp_path):
    graph = qat_scaled["graphs"][target]
    res = invoke("parity", cls_ckpt, graph, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
                 "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["runners"]["reference"]["backend"] == "torch-fakequant-cpu"
    assert report["runners"]["reference_fp32"]["backend"] == "torch-cpu"
    ref = report["int8_reference"]
    tensors = ref["tensors"]
    assert tensors["passed"] and tensors["tensors"] > 40 and not tensors["unmatched"], tensors
    assert tensors["beyond_one_step"] <= 0.02 and tensors["max_steps"] <= 12
    assert set(ref["rows"]) >= {"rois.deltas", "boxes", "rois.rows", "logits"}
    for name, r in ref["rows"].items():
        within = r["graph"] <= r["allowed"] and r["graph_worst_slice"] <= r["allowed_worst_slice"]
        assert r["passed"] == within and (name in report["failures"]) != r["passed"]
    # the class line is PyTorch FP32's, whatever the fake-quantized model calls
    assert report["argmax_agreement"] == pytest.approx(report["decisions"]["agreement_vs_pytorch_fp32"])
    weights = ref["weights"]
    assert weights["passed"] and weights["weights"] == 27 and weights["max_steps"] <= 0.51 and not weights["problems"]
    assert not weights["mismatched_grids"]
    assert not {"int8.tensors", "int8.weights", "int8.grids", "int8.slices", "s.logits"} & set(report["failures"])
    assert "INT8 reference" in res.output and "int8.tensors:" in res.output


@pytest.mark.parametrize("edit", [_weights_off, _dq_scale_off])
def test_int8_tensors_fail_a_graph_that_computes_another_model(qat_scaled, synth_dir, cls_ckpt, edit, tmp_path):
    graph = _tamper(qat_scaled["graphs"]["tensorrt"], tmp_path / "bad.onnx", edit)
    res = invoke("parity", cls_ckpt, graph, "--images", synth_dir / "images", "--no-noise",
                 "--max-images", 4, "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    tensors = report["int8_reference"]["tensors"]
    assert res.exit_code == 1 and "int8.tensors" in report["failures"], tensors
    assert tensors["beyond_one_step"] > 0.02 or tensors["max_steps"] > 12


def test_calibrated_graphs_fall_back_to_fp32_with_the_reason(cls_ckpt, synth_dir, qat_scaled, tmp_path):
    """A calibrated cpu form (asymmetric uint8) has no ModelOpt reference: judged against
    FP32 as before, and the report says why."""
    out = tmp_path / "cal-cpu.onnx"
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--int8-target", "cpu", "--calibration",
                 qat_scaled["base"], "--fp32-blocks", "classifier", "-q")
    assert res.exit_code == 0, res.output
    invoke("parity", cls_ckpt, out, "--images", synth_dir / "images", "--no-noise", "--max-images", 4,
           "--json", tmp_path / "p.json", "-q")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["runners"]["reference"]["backend"] == "torch-cpu" and "int8_reference" not in report
    assert any("asymmetric" in w or "two scales" in w for w in report["warnings"]), report["warnings"]


def test_without_modelopt_parity_says_so_and_uses_fp32(qat_scaled, synth_dir, cls_ckpt, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)
    invoke("parity", cls_ckpt, qat_scaled["graphs"]["tensorrt"], "--images", synth_dir / "images",
           "--no-noise", "--max-images", 2, "--json", tmp_path / "p.json", "-q")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["runners"]["reference"]["backend"] == "torch-cpu"
    assert any("ctmask[qat]" in w for w in report["warnings"]), report["warnings"]


def _export(cls_ckpt, ranges, out, fp32_blocks):
    res = invoke("export", cls_ckpt, "--out", out, "--precision", "int8", "--int8-target", "tensorrt",
                 "--calibration", ranges, "--fp32-blocks", fp32_blocks, "-q")
    assert res.exit_code == 0, res.output
    return out


def test_fp32_blocks_read_float_and_the_reference_quantizes_only_what_the_graph_does(qat_scaled, cls_ckpt, synth_dir,
                                                                                    tmp_path):
    """With the backbone body kept FP32, no FP32 convolution reads a DequantizeLinear, and the
    reference leaves those weights unquantized: int8.tensors holds. With only the box head and
    box predictor quantized there is no dense activation to compare, said so, no traceback."""
    from ctmask.core.graphs import load_proto

    ranges = qat_scaled["graphs"]["tensorrt"].parent / "qat.json"
    body = _export(cls_ckpt, ranges, tmp_path / "body.onnx", "backbone.body,classifier")
    proto = load_proto(body)
    produced = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == "Conv" and produced.get(node.input[1]) is None:  # an FP32 convolution
            src = produced.get(node.input[0])
            assert src is None or src.op_type != "DequantizeLinear", node.name
    res = invoke("parity", cls_ckpt, body, "--images", synth_dir / "images", "--no-noise", "--max-images", 4,
                 "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    tensors = report["int8_reference"]["tensors"]
    assert tensors["passed"] and tensors["tensors"] > 0, tensors
    assert report["runners"]["reference"]["int8_weights"] < 36
    heads = _export(cls_ckpt, ranges, tmp_path / "heads.onnx", "backbone.body,backbone.fpn,rpn_head,classifier")
    res = invoke("parity", cls_ckpt, heads, "--images", synth_dir / "images", "--no-noise", "--max-images", 2,
                 "--json", tmp_path / "q.json")
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    tensors = json.loads((tmp_path / "q.json").read_text())["int8_reference"]["tensors"]
    assert tensors["tensors"] == 0 and "no backbone" in tensors["not_compared"]


def test_box_head_in_float_keeps_every_convolution_int8_and_the_reference_follows(qat_scaled, cls_ckpt, tmp_path):
    """The recommended placement (`--fp32-blocks classifier,box_head,box_predictor`): every
    convolution reads int8, no Gemm / MatMul does, and the fake-quantized reference read from the
    graph quantizes no weight or activation of the box head or box predictor."""
    from ctmask.core.graphs import load_proto
    from ctmask.exporter.int8_graph import read_quantization

    ranges = qat_scaled["graphs"]["tensorrt"].parent / "qat.json"
    proto = load_proto(_export(cls_ckpt, ranges, tmp_path / "box.onnx", "classifier,box_head,box_predictor"))
    produced = {o: n for n in proto.graph.node for o in n.output}

    def reads_int8(node):
        src = produced.get(node.input[0])
        return src is not None and src.op_type == "DequantizeLinear"

    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(reads_int8(n) for n in convs), [n.name for n in convs if not reads_int8(n)]
    dense = [n.name for n in proto.graph.node if n.op_type in ("Gemm", "MatMul") and reads_int8(n)]
    assert not dense, dense
    q, why = read_quantization(proto)
    assert q is not None, why
    box = [m for m in (*q.weights, *q.amax) if "box_head" in m or "box_predictor" in m]
    assert q.weights and q.amax and not box, box


def _constant_scale(proto):
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_1")
    value = next(t for t in proto.graph.initializer if t.name == q.input[1])
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["scale_c"], value=value))
    q.input[1] = "scale_c"


def _lonely_quantize(proto):
    """A QuantizeLinear without a DequantizeLinear on a tensor no convolution quantizes."""
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_1")
    proto.graph.node.append(onnx.helper.make_node("QuantizeLinear", ["logits", q.input[1], q.input[2]], ["lonely"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("lonely", onnx.TensorProto.INT8, None))


def _per_channel_activation(proto):
    from onnx import numpy_helper

    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_1")
    scale = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == q.input[1]))
    proto.graph.initializer.append(numpy_helper.from_array(np.full(4, scale, np.float32), "per_channel"))
    q.input[1] = "per_channel"


def _no_zero_point(proto):
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_1")
    del q.input[2]


@pytest.mark.parametrize("edit, why", [(_constant_scale, None), (_lonely_quantize, "no quantized convolution"),
                                       (_per_channel_activation, "per channel"), (_no_zero_point, "asymmetric")])
def test_odd_quantization_is_read_or_refused_with_a_reason(qat_scaled, edit, why, tmp_path):
    from ctmask.exporter.int8_graph import read_quantization

    proto = onnx.load(str(qat_scaled["graphs"]["tensorrt"]))
    edit(proto)
    quantization, reason = read_quantization(proto)
    if why is None:  # a scale from a Constant node is read like an initializer
        assert quantization is not None and not reason
    else:
        assert quantization is None and why in reason, reason


def _boxes_off_on_one_slice(proto, threshold):
    """The graph's boxes 10 px off on the slices brighter than ``threshold`` (one of them)."""
    from onnx import helper, numpy_helper

    producer = next(n for n in proto.graph.node if "boxes" in n.output)
    producer.output[list(producer.output).index("boxes")] = "boxes_pre"
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(threshold, np.float32), "thr_t"),
                                    numpy_helper.from_array(np.array(10.0, np.float32), "shift_t"),
                                    numpy_helper.from_array(np.array(0.0, np.float32), "zero_t"),
                                    numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape_t"),
                                    numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_t")])
    proto.graph.node.extend([
        helper.make_node("ReduceMean", [proto.graph.input[0].name, "axes_t"], ["mean_t"], keepdims=1),
        helper.make_node("Greater", ["mean_t", "thr_t"], ["bright_t"]),
        helper.make_node("Where", ["bright_t", "shift_t", "zero_t"], ["off_t"]),
        helper.make_node("Reshape", ["off_t", "shape_t"], ["off3_t"]),
        helper.make_node("Add", ["boxes_pre", "off3_t"], ["boxes"])])


def test_one_slice_with_wrong_boxes_fails_on_its_worst_slice(qat_scaled, cls_ckpt, synth_dir, tmp_path):
    from ctmask.runtime.predict import collect_images
    from ctmask.runtime.runner import OnnxRuntimeRunner
    from ctmask.scans.batch import load_batch

    graph = qat_scaled["graphs"]["tensorrt"]
    files, _ = collect_images([synth_dir / "images"])
    with OnnxRuntimeRunner(graph) as runner:
        means = np.sort(load_batch(files[:8], runner.spec).batch.reshape(8, -1).mean(1))
    bad = _tamper(graph, tmp_path / "bad.onnx", lambda p: _boxes_off_on_one_slice(p, (means[-1] + means[-2]) / 2))
    invoke("parity", cls_ckpt, bad, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
           "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    boxes = report["int8_reference"]["rows"]["boxes"]
    assert "boxes" in report["failures"] and boxes["graph_worst_slice"] > boxes["allowed_worst_slice"], boxes
    assert any("boxes" in f["max_abs"] for f in report["failing_slices"])


def _box_head_weights_noisy(proto):
    """Irregular errors in the box head's int8 weights (+-4 steps, seeded): another model."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    for t in proto.graph.initializer:
        if t.name.endswith("box_head.fc7.weight_quantized"):
            w = numpy_helper.to_array(t).astype(np.int32) + rng.integers(-4, 5, size=t.dims)
            t.CopyFrom(numpy_helper.from_array(np.clip(w, -127, 127).astype(np.int8), t.name))
            return
    raise AssertionError("no box head weight")


def _box_output_dequantized_off(proto):
    """The box predictor's regression output dequantized at 1.07x the scale it was quantized at."""
    from onnx import numpy_helper

    readers = {i: n for n in proto.graph.node for i in n.input}
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm" and "bbox_pred" in n.input[1])
    q = readers[gemm.output[0]]
    dq = readers[q.output[0]]
    scale = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == dq.input[1]))
    proto.graph.initializer.append(numpy_helper.from_array((scale * 1.07).astype(np.float32), "dq_off"))
    dq.input[1] = "dq_off"


@pytest.mark.parametrize("edit, line", [(_box_head_weights_noisy, "int8.weights"),
                                        (_box_output_dequantized_off, "int8.grids")])
def test_box_head_errors_fail_their_own_line(qat_scaled, synth_dir, cls_ckpt, edit, line, tmp_path):
    """Outside int8.tensors' dense blocks: the weights are checked against the checkpoint's, and
    every DequantizeLinear against its QuantizeLinear's grid (the row lines alone let both pass)."""
    graph = _tamper(qat_scaled["graphs"]["tensorrt"], tmp_path / "bad.onnx", edit)
    res = invoke("parity", cls_ckpt, graph, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
                 "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    assert res.exit_code == 1 and line in report["failures"], report["failures"]
    assert f"{line}:" in res.output


def test_too_few_slices_fail_the_int8_judgement(qat_scaled, synth_dir, cls_ckpt, tmp_path):
    invoke("parity", cls_ckpt, qat_scaled["graphs"]["cpu"], "--images", synth_dir / "images", "--no-noise",
           "--max-images", 2, "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    assert "int8.slices" in report["failures"]
    assert all(report["outputs"][k].get("judged_in_aggregate") for k in report["int8_reference"]["rows"]
               if k in report["outputs"])


def _initializer(proto, suffix):
    return next(t for t in proto.graph.initializer if t.name.endswith(suffix))


def _nan_weight_scale(proto):
    from onnx import numpy_helper

    t = _initializer(proto, "box_predictor.cls_score.weight_scale")
    scale = numpy_helper.to_array(t).copy()
    scale[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(scale, t.name))


def _weight_zero_point_scalar(proto):
    from onnx import numpy_helper

    t = _initializer(proto, "layer1.0.conv2.weight_zero_point")
    t.CopyFrom(numpy_helper.from_array(np.zeros((), np.int8), t.name))


def _weight_in_a_constant_halved(proto):
    """The box head's fc6 integers halved and moved from an initializer into a Constant node."""
    from onnx import numpy_helper

    t = _initializer(proto, "box_head.fc6.weight_quantized")
    halved = (numpy_helper.to_array(t) // 2).astype(np.int8)
    proto.graph.initializer.remove(t)
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], [t.name],
                                                     value=numpy_helper.from_array(halved, t.name)))


def _second_dequantize_off(proto):
    """A second DequantizeLinear of relu_2's QuantizeLinear, at 1.25x its scale, for the downsample."""
    from onnx import numpy_helper

    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "relu_2")
    scale = numpy_helper.to_array(_initializer(proto, q.input[1]))
    proto.graph.initializer.append(numpy_helper.from_array((scale * 1.25).astype(np.float32), "scale_off"))
    at = list(proto.graph.node).index(q) + 1
    proto.graph.node.insert(at, onnx.helper.make_node("DequantizeLinear", [q.output[0], "scale_off", q.input[2]],
                                                      ["relu_2_off"]))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv" and "downsample" in n.input[1])
    conv.input[0] = "relu_2_off"


@pytest.mark.parametrize("edit, line", [(_nan_weight_scale, "int8.weights"),
                                        (_weight_zero_point_scalar, "int8.weights"),
                                        (_weight_in_a_constant_halved, "int8.weights"),
                                        (_second_dequantize_off, "int8.grids")])
def test_hostile_weight_and_grid_edits_fail_their_line_without_a_traceback(qat_scaled, synth_dir, cls_ckpt, edit,
                                                                         line, tmp_path):
    graph = _tamper(qat_scaled["graphs"]["tensorrt"], tmp_path / "bad.onnx", edit)
    res = invoke("parity", cls_ckpt, graph, "--images", synth_dir / "images", "--no-noise", "--max-images", 8,
                 "--json", tmp_path / "p.json")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert line in report["failures"], report["failures"]


@pytest.fixture(scope="module")
def int8_residual(qat_scaled, cls_ckpt, small_onnx, tmp_path_factory):
    """The tiny graph's QAT-form ranges marked ``residual: int8`` (a ``qat --residual int8``
    fine-tune) and its tensorrt-form INT8 graph. The first block's input (its identity path)
    gets an 8x coarser grid than the tiny model's ranges give it (there it is the stem's
    quantized output, already on its grid), so which form a model reads shows."""
    import dataclasses

    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import load_proto
    from ctmask.training.qat import graph_quantizers

    folder = tmp_path_factory.mktemp("int8res")
    rf = load_ranges(qat_scaled["graphs"]["tensorrt"].parent / "qat.json")
    identity = next(t for t, qs in graph_quantizers(load_proto(small_onnx)).items()
                    if "backbone.body.layer1.0.conv1.input_quantizer" in qs)
    coarse = {**rf.ranges, identity: tuple(8 * v for v in rf.ranges[identity])}
    ranges = dataclasses.replace(rf, ranges=coarse, options={**rf.options, "residual": "int8"}).save(
        folder / "qat-r8.json")
    graph = folder / "int8-r8.onnx"
    res = invoke("export", cls_ckpt, "--out", graph, "--precision", "int8", "--int8-target", "tensorrt",
                 "--calibration", ranges, "--fp32-blocks", "classifier")
    assert res.exit_code == 0, res.output
    assert "residual paths read int8" in res.output
    return {"graph": graph, "ranges": ranges}


def _unquantized_dq_readers(proto):
    """(op type of each unquantized node reading an input-only activation's DequantizeLinear,
    same for those reading the float tensor that has a QuantizeLinear)."""
    produced = {o: n for n in proto.graph.node for o in n.output}
    quantized_in = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"
                    and (produced.get(n.input[0]) is None or produced[n.input[0]].op_type not in ("Conv", "Gemm"))}
    as_int8, as_float = [], []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "QuantizeLinear", "DequantizeLinear", "Shape"):
            continue
        for name in node.input:
            dq = produced.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and produced[dq.input[0]].input[0] in quantized_in:
                as_int8.append(node.op_type)
            elif name in quantized_in:
                as_float.append(node.op_type)
    return sorted(as_int8), sorted(as_float)


def test_an_int8_residual_graph_is_read_and_judged_as_its_fine_tune_trained_it(int8_residual, qat_scaled, cls_ckpt,
                                                                               synth_dir, tmp_path):
    """Ranges of a ``--residual int8`` fine-tune: the identity Add and the FPN upsampling read
    the DequantizeLinear (the float form reads the tensor), parity's reference models that
    (``residual: int8``) and passes; the float form's reference would not match this graph."""
    from ctmask.core.graphs import load_proto
    from ctmask.exporter.int8_graph import read_quantization
    from ctmask.exporter.int8_reference import FakeQuantRunner, compare_tensors
    from ctmask.runtime.predict import collect_images
    from ctmask.scans.batch import load_batch

    proto = load_proto(int8_residual["graph"])
    as_int8, as_float = _unquantized_dq_readers(proto)
    assert as_int8 == ["Add", "Resize", "Resize"] and not as_float
    assert _unquantized_dq_readers(load_proto(qat_scaled["graphs"]["tensorrt"])) == ([], ["Add", "Resize", "Resize"])
    quantization, why = read_quantization(proto)
    assert not why and quantization.residual == "int8"
    assert read_quantization(load_proto(qat_scaled["graphs"]["tensorrt"]))[0].residual == "float"
    invoke("parity", cls_ckpt, int8_residual["graph"], "--images", synth_dir / "images", "--no-noise",
           "--max-images", 8, "--json", tmp_path / "p.json")
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["runners"]["reference"]["residual"] == "int8"
    tensors = report["int8_reference"]["tensors"]
    assert tensors["passed"] and tensors["tensors"] > 40, tensors
    assert not {"int8.tensors", "int8.weights", "int8.grids", "int8.slices", "s.logits"} & set(report["failures"])
    # the same graph against the float form's model: the top-down sums drift off
    files, _ = collect_images([synth_dir / "images"])
    with FakeQuantRunner(cls_ckpt, quantization) as right:
        images = load_batch(files[:4], right.spec).batch
        matched = compare_tensors(proto, right, images)
    quantization.residual = "float"
    with FakeQuantRunner(cls_ckpt, quantization) as wrong:
        mismatched = compare_tensors(proto, wrong, images)
    assert mismatched["beyond_one_step"] > max(2 * matched["beyond_one_step"], 0.02), (matched, mismatched)


def _one_resize_reads_float(proto):
    """The finest level's upsampling reads its sum in float, the other paths int8."""
    produced = {o: n for n in proto.graph.node for o in n.output}
    node = [n for n in proto.graph.node if n.op_type == "Resize"][-1]
    q = produced[produced[node.input[0]].input[0]]
    assert produced[q.input[0]].op_type == "Add"
    node.input[0] = q.input[0]


def _conv_output_read_raw(proto):
    """The coarsest level's upsampling reads its lateral convolution's output unquantized."""
    produced = {o: n for n in proto.graph.node for o in n.output}
    node = next(n for n in proto.graph.node if n.op_type == "Resize")
    q = produced[produced[node.input[0]].input[0]]
    assert produced[q.input[0]].op_type == "Conv"
    node.input[0] = q.input[0]


def _relu_reads_int8(proto):
    """A Relu inserted on the identity path, reading the DequantizeLinear: not a residual reader."""
    from onnx import helper

    produced = {o: n for n in proto.graph.node for o in n.output}

    def input_only(name):  # a DequantizeLinear of a tensor no quantized node produced
        dq = produced.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" and \
            produced[produced[dq.input[0]].input[0]].op_type not in ("Conv", "Gemm")

    add = next(n for n in proto.graph.node if n.op_type == "Add" and any(input_only(i) for i in n.input))
    k = next(k for k, i in enumerate(add.input) if input_only(i))
    relu = helper.make_node("Relu", [add.input[k]], ["odd_relu"], name="odd_relu")
    add.input[k] = "odd_relu"
    proto.graph.node.insert(list(proto.graph.node).index(add), relu)


def _identity_pair(proto, scale_factor, same_quantize):
    """The first block's identity Add reads its own DequantizeLinear: of a second QuantizeLinear
    at ``scale_factor`` x the convolution's scale, or (``same_quantize``) of the convolution's
    QuantizeLinear, dequantized at ``scale_factor`` x."""
    from onnx import helper, numpy_helper

    produced = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    add = next(n for n in proto.graph.node if n.op_type == "Add" and any(
        produced.get(i) is not None and produced[i].op_type == "DequantizeLinear"
        and produced[produced[produced[i].input[0]].input[0]].op_type == "MaxPool" for i in n.input))
    k = next(k for k, i in enumerate(add.input) if produced.get(i) is not None
             and produced[i].op_type == "DequantizeLinear")
    dq = produced[add.input[k]]
    q = produced[dq.input[0]]
    scale = numpy_helper.to_array(inits[q.input[1]]) * scale_factor
    proto.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "odd_scale"))
    nodes = [] if same_quantize else [helper.make_node("QuantizeLinear", [q.input[0], "odd_scale", q.input[2]],
                                                       ["odd_q"], name="odd_q")]
    nodes.append(helper.make_node("DequantizeLinear", [q.output[0] if same_quantize else "odd_q", "odd_scale",
                                                       q.input[2]], ["odd_dq"], name="odd_dq"))
    add.input[k] = "odd_dq"
    at = list(proto.graph.node).index(add)
    for n in reversed(nodes):
        proto.graph.node.insert(at, n)


def test_a_residual_reader_off_the_convolutions_grid_is_refused_or_fails_int8_grids(int8_residual):
    from ctmask.exporter.int8_graph import read_quantization

    proto = onnx.load(str(int8_residual["graph"]))
    _identity_pair(proto, 8.0, same_quantize=False)
    quantization, reason = read_quantization(proto)
    assert quantization is None and "quantized twice on different grids" in reason, reason
    proto = onnx.load(str(int8_residual["graph"]))
    _identity_pair(proto, 2.0, same_quantize=True)
    quantization, reason = read_quantization(proto)
    assert not reason and quantization.mismatched_grids(), reason


@pytest.mark.parametrize("edit, why", [(_one_resize_reads_float, "one residual form"),
                                       (_relu_reads_int8, "in int8: the reference models only"),
                                       (_conv_output_read_raw, "output of a quantized node, unquantized")])
def test_a_graph_mixing_residual_forms_is_refused(int8_residual, edit, why):
    from ctmask.exporter.int8_graph import read_quantization

    proto = onnx.load(str(int8_residual["graph"]))
    edit(proto)
    quantization, reason = read_quantization(proto)
    assert quantization is None and why in reason, reason


def test_a_ranges_file_with_an_unknown_residual_form_is_refused_by_export(int8_residual, cls_ckpt, tmp_path):
    import dataclasses

    from ctmask.calibration.ranges import load_ranges

    rf = load_ranges(int8_residual["ranges"])
    for value in ("int4", None, 5):
        bad = dataclasses.replace(rf, options={**rf.options, "residual": value}).save(tmp_path / "bad.json")
        for override in ([], ["--residual", "float"]):
            res = invoke("export", cls_ckpt, "--out", tmp_path / "g.onnx", "--precision", "int8", "--calibration",
                         bad, "--fp32-blocks", "classifier", *override)
            assert res.exit_code != 0 and "options.residual must be one of float, int8, got " + json.dumps(value) \
                in res.output and "bad.json" in res.output and "Traceback" not in res.output, res.output
            assert not (tmp_path / "g.onnx").exists()
    from ctmask.core.errors import RangesError

    d = json.loads(Path(int8_residual["ranges"]).read_text())
    d["options"] = [["residual", "int8"]]  # dict() would take the pairs: an object is required
    (tmp_path / "pairs.json").write_text(json.dumps(d))
    with pytest.raises(RangesError, match="options must be a JSON object, got list"):
        load_ranges(tmp_path / "pairs.json")


def test_a_precision_report_of_the_other_residual_form_is_refused(int8_residual):
    import dataclasses

    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.errors import DataError
    from ctmask.exporter.reduced import REPORT_FORMAT, load_report

    rf = load_ranges(int8_residual["ranges"])
    report = int8_residual["ranges"].parent / "report.json"
    for measured, ok in (("float", False), ("int8", True)):
        report.write_text(json.dumps({"format": REPORT_FORMAT, "source_sha256": "s", "int8_target": "tensorrt",
                                      "calibration": {"residual": measured, "ranges_sha256": rf.content_sha256()},
                                      "choice": {"precision": "int8", "fp32_islands": {}}}))
        if ok:
            assert load_report(report, "int8", "s", "tensorrt", rf)["calibration"]["residual"] == "int8"
        else:
            with pytest.raises(DataError, match="residual paths reading 'float'"):
                load_report(report, "int8", "s", "tensorrt", rf)
    for calibration, why in (("x", r"malformed precision report \(calibration\)"),
                             ({"residual": None}, "calibration.residual null"),
                             ({"ranges_sha256": rf.content_sha256()}, "reading 'float'")):  # no key: float
        report.write_text(json.dumps({"format": REPORT_FORMAT, "source_sha256": "s", "int8_target": "tensorrt",
                                      "calibration": calibration, "choice": {"precision": "int8", "fp32_islands": {}}}))
        with pytest.raises(DataError, match=why):
            load_report(report, "int8", "s", "tensorrt", rf)
    report.write_text(json.dumps({"format": REPORT_FORMAT, "source_sha256": "s", "int8_target": "tensorrt",
                                  "calibration": {"residual": "int8", "ranges_sha256": rf.content_sha256()},
                                  "choice": {"precision": "int8", "fp32_islands": {}}}))
    float_form = dataclasses.replace(rf, options={**rf.options, "residual": "float"})
    with pytest.raises(DataError, match="residual"):
        load_report(report, "int8", "s", "tensorrt", float_form)


def test_export_residual_overrides_the_ranges_form_and_says_when_that_is_not_the_trained_model(
        int8_residual, qat_scaled, cls_ckpt, tmp_path):
    from ctmask.core.graphs import load_proto

    # a calibrated (not QAT) ranges file: --residual int8 gives the int8 form, without a note
    res = invoke("export", cls_ckpt, "--out", tmp_path / "cal.onnx", "--precision", "int8", "--calibration",
                 qat_scaled["base"], "--fp32-blocks", "classifier", "--residual", "int8")
    assert res.exit_code == 0 and "residual paths read int8" in res.output and "not the model" not in res.output
    proto = load_proto(tmp_path / "cal.onnx")
    assert _unquantized_dq_readers(proto)[0] == ["Add", "Resize", "Resize"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["ctmask.calibration"])["residual"] == "int8"
    # the QAT ranges of an int8 fine-tune, exported float: said so
    res = invoke("export", cls_ckpt, "--out", tmp_path / "f.onnx", "--precision", "int8", "--calibration",
                 int8_residual["ranges"], "--fp32-blocks", "classifier", "--residual", "float")
    assert res.exit_code == 0 and "not the model the fine-tune trained" in res.output, res.output
    assert _unquantized_dq_readers(load_proto(tmp_path / "f.onnx")) == ([], ["Add", "Resize", "Resize"])
    for args in (["--precision", "fp16", "--calibration", qat_scaled["base"]], ["--precision", "int8",
                 "--calibration", qat_scaled["base"], "--fp32-blocks", "classifier"]):
        res = invoke("export", cls_ckpt, "--out", tmp_path / "x.onnx", *args, "--residual",
                     "int4" if "int8" in args else "int8")
        assert res.exit_code != 0 and "--residual" in res.output and "Traceback" not in res.output, res.output
