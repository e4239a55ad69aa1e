"""``check-trt``: the GPU-free check of what TensorRT's ONNX parser and builder demand, on the
small preset's real FP32 / FP16 / INT8 graphs and on graphs with one injected violation each."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests_helpers import invoke

from ctmask.core.errors import Finding
from ctmask.trt.check import FATAL, INFO, WARNING, check_graph, fatal, format_findings


def nodes_of(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op]


def by_node(findings: list[Finding], node: str, severity: str | None = None) -> list[Finding]:
    return [f for f in findings if f.node == node and (severity is None or f.severity == severity)]


@pytest.fixture(scope="module")
def fp32(small_onnx) -> onnx.ModelProto:
    return onnx.load(str(small_onnx))


@pytest.fixture()
def fp32_copy(fp32) -> onnx.ModelProto:
    """A copy to inject one violation into."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    return out


@pytest.fixture(scope="module")
def int8_protos(small_onnx, synth_dir, tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """The exporter's INT8 Q/DQ graphs of both targets (``--fp32-blocks none``), from one calibration."""
    from ctmask.calibration.ranges import load_ranges
    from ctmask.exporter.precision import quantize_int8
    from ctmask.exporter.sensitivity import ALWAYS_FP32

    out = tmp_path_factory.mktemp("trt-int8") / "small.ranges.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir, "--size", 4, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    ranges = load_ranges(out)
    proto = onnx.load(str(small_onnx))
    return {target: quantize_int8(proto, ranges, target, set(ALWAYS_FP32)) for target in ("tensorrt", "cpu")}


# ---- real graphs ---------------------------------------------------------------------------


@pytest.mark.parametrize("trt_version", [10, 11])
def test_fp32_graph_passes_and_reports_its_limits(fp32, trt_version):
    findings = check_graph(fp32, trt_version)
    assert fatal(findings) == [], format_findings(findings)
    topk = [f for f in findings if f.op == "TopK"]
    assert len(topk) == len(nodes_of(fp32, "TopK")) and all(f.severity == INFO and "K = " in f.message for f in topk)
    roi = nodes_of(fp32, "RoiAlign")[0]
    assert any(f.severity == WARNING and "ROIAlign_TRT" in f.message for f in by_node(findings, roi.name))
    for nms in nodes_of(fp32, "NonMaxSuppression"):
        messages = " | ".join(f.message for f in by_node(findings, nms.name, INFO))
        assert "candidates per batch item" in messages and "INT32_MAX" in messages  # the INT64-max sentinel
    assert any(f.op == "opset" and f.severity == INFO for f in findings)
    assert findings == sorted(findings, key=lambda f: (FATAL, WARNING, INFO).index(f.severity))


def test_fp16_graph_passes(fp32):
    """Every block the exporter reduces in FP16 (all but the FP32-by-construction ranking), as
    ``export --precision fp16 --fp32-blocks none`` does: the islands' casts leave no type mixing."""
    from ctmask.exporter.precision import convert_fp16
    from ctmask.exporter.sensitivity import ALWAYS_FP32

    half = convert_fp16(fp32, set(ALWAYS_FP32))
    assert any(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    findings = check_graph(half)
    assert fatal(findings) == [], format_findings(findings)


def test_int8_tensorrt_graph_passes(int8_protos):
    """The tensorrt flavour: INT8 symmetric, zero-point 0, biases float (the exporter asks
    onnxruntime's quantizer for QuantizeBias=False for this target)."""
    proto = int8_protos["tensorrt"]
    findings = check_graph(proto)
    assert fatal(findings) == [], format_findings(fatal(findings))
    assert nodes_of(proto, "QuantizeLinear") and nodes_of(proto, "DequantizeLinear")


def test_int32_bias_dequantize_is_fatal_naming_the_node(int8_protos):
    """onnxruntime's default (and the cpu flavour) stores biases as INT32 behind a
    DequantizeLinear; TensorRT dequantizes int8 only, and its parser stops there."""
    proto = int8_protos["cpu"]
    inits = {t.name: t for t in proto.graph.initializer}
    int32_dq = {n.name for n in nodes_of(proto, "DequantizeLinear")
                if n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT32}
    assert int32_dq
    bias = {f.node for f in fatal(check_graph(proto)) if "INT32 (a quantized bias)" in f.message}
    assert bias == int32_dq


def test_int8_cpu_graph_fails_on_uint8_and_zero_points(int8_protos):
    proto = int8_protos["cpu"]
    findings = fatal(check_graph(proto))
    q_names = {n.name for n in nodes_of(proto, "QuantizeLinear")}
    uint8 = [f for f in findings if f.op == "QuantizeLinear" and "UINT8" in f.message]
    assert uint8 and {f.node for f in uint8} <= q_names
    assert "--int8-target tensorrt" in uint8[0].message
    zp = [f for f in findings if "zero-point" in f.message and "is not 0" in f.message]
    assert zp and {f.node for f in zp if f.op == "QuantizeLinear"} <= q_names


# ---- one injected violation each --------------------------------------------------------------


def test_topk_k_initializer_over_3840_is_fatal(fp32_copy):
    node = nodes_of(fp32_copy, "TopK")[0]
    fp32_copy.graph.initializer.append(numpy_helper.from_array(np.array([5000], np.int64), "k_5000"))
    node.input[1] = "k_5000"
    bad = fatal(check_graph(fp32_copy))
    assert [(f.node, f.op) for f in bad] == [(node.name, "TopK")]
    assert "K = 5000" in bad[0].message and "3840" in bad[0].message


@pytest.mark.parametrize("k, message", [(np.array([-3], np.int64), "TopK needs K >= 1"),
                                        (np.array([0], np.int64), "TopK needs K >= 1"),
                                        (np.zeros(0, np.int64), "holds 0 values")])
def test_topk_k_empty_zero_or_negative_is_fatal(fp32_copy, k, message):
    node = nodes_of(fp32_copy, "TopK")[0]
    fp32_copy.graph.initializer.append(numpy_helper.from_array(k, "k_bad"))
    node.input[1] = "k_bad"
    bad = fatal(check_graph(fp32_copy))
    assert [(f.node, f.op) for f in bad] == [(node.name, "TopK")] and message in bad[0].message


def test_unsupported_operator_is_fatal(fp32_copy):
    node = nodes_of(fp32_copy, "Sigmoid")[0]
    node.op_type = "Bernoulli"  # same float -> float signature; the matrix lists it unsupported
    bad = fatal(check_graph(fp32_copy))
    assert [(f.node, f.op) for f in bad] == [(node.name, "Bernoulli")]
    assert "does not support Bernoulli" in bad[0].message


def test_unknown_domain_is_fatal_but_plugins_are_warnings(fp32_copy):
    node = nodes_of(fp32_copy, "Sigmoid")[0]
    node.domain = "com.microsoft"
    findings = check_graph(fp32_copy)
    assert [(f.node, f.severity) for f in fatal(findings)] == [(node.name, FATAL)]
    node.op_type = "EfficientNMS_TRT"
    findings = check_graph(fp32_copy)
    assert fatal(findings) == [] and by_node(findings, node.name, WARNING)


def test_quantize_with_nonzero_zero_point_is_fatal(fp32_copy):
    g = fp32_copy.graph
    relu = nodes_of(fp32_copy, "Relu")[0]
    x = relu.output[0]
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "inj_scale"),
                          numpy_helper.from_array(np.array(3, np.int8), "inj_zp")])
    for consumer in g.node:
        for i, name in enumerate(consumer.input):
            if name == x:
                consumer.input[i] = "inj_dq_out"
    q = helper.make_node("QuantizeLinear", [x, "inj_scale", "inj_zp"], ["inj_q_out"], name="injected_q")
    dq = helper.make_node("DequantizeLinear", ["inj_q_out", "inj_scale", "inj_zp"], ["inj_dq_out"],
                          name="injected_dq")
    index = list(g.node).index(relu)
    g.node.insert(index + 1, dq)
    g.node.insert(index + 1, q)
    bad = fatal(check_graph(fp32_copy))
    assert {(f.node, f.op) for f in bad} == {("injected_q", "QuantizeLinear"), ("injected_dq", "DequantizeLinear")}
    assert all("zero-point 'inj_zp' is not 0 (3)" in f.message for f in bad)


def test_second_dynamic_dimension_of_images_is_fatal(fp32_copy):
    images = next(i for i in fp32_copy.graph.input if i.name == "images")
    images.type.tensor_type.shape.dim[2].dim_param = "height"
    bad = [f for f in fatal(check_graph(fp32_copy)) if f.op == "graph input"]
    assert [f.node for f in bad] == ["images"]
    assert "dimension 2 is symbolic 'height'" in bad[0].message and "dimension 0" in bad[0].message


def test_fp16_fp32_mix_on_one_add_is_fatal(fp32_copy):
    g = fp32_copy.graph
    init_names = {t.name for t in g.initializer}
    add = next(n for n in nodes_of(fp32_copy, "Add") if not set(n.input) & init_names)
    cast = helper.make_node("Cast", [add.input[1]], ["inj_half"], name="injected_cast", to=TensorProto.FLOAT16)
    g.node.insert(list(g.node).index(add), cast)
    add.input[1] = "inj_half"
    bad = [f for f in fatal(check_graph(fp32_copy)) if f.node == add.name]
    assert len(bad) == 1 and bad[0].op == "Add"
    assert "mix float types" in bad[0].message and "FP16" in bad[0].message and "FP32" in bad[0].message


@pytest.mark.parametrize("opset,trt_version,severity", [(8, 10, FATAL), (25, 10, FATAL), (25, 11, WARNING),
                                                        (22, 10, WARNING), (18, 11, INFO)])
def test_opset_range(fp32_copy, opset, trt_version, severity):
    next(o for o in fp32_copy.opset_import if o.domain in ("", "ai.onnx")).version = opset
    found = [f for f in check_graph(fp32_copy, trt_version) if f.op == "opset"]
    assert [f.severity for f in found] == [severity], found


# ---- the static evaluator on tiny graphs ------------------------------------------------------


def tiny_topk(k_per_row: int) -> onnx.ModelProto:
    """x [batch, 8000] -> TopK with K = batch * k_per_row, computed from Shape(x)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 8000])
    vals = helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["batch", None])
    nodes = [helper.make_node("Shape", ["images"], ["shape"], end=1),
             helper.make_node("Mul", ["shape", "per_row"], ["k"]),
             helper.make_node("TopK", ["images", "k"], ["vals", "idx"], name="topk", axis=1)]
    graph = helper.make_graph(nodes, "g", [x], [vals],
                              [numpy_helper.from_array(np.array([k_per_row], np.int64), "per_row")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_topk_k_folded_from_shapes_at_max_batch():
    model = tiny_topk(200)
    (f,) = [f for f in check_graph(model, max_batch=32) if f.node == "topk"]
    assert f.severity == FATAL and "K = 6400" in f.message and "at batch 32" in f.message
    (f,) = [f for f in check_graph(model, max_batch=8) if f.node == "topk"]
    assert f.severity == INFO and "K = 1600" in f.message


def test_topk_k_from_data_is_a_warning():
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 100])
    kin = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    vals = helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["batch", None])
    graph = helper.make_graph([helper.make_node("TopK", ["images", "k"], ["vals", "idx"], name="topk")], "g",
                              [x, kin], [vals])
    findings = check_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [f.severity for f in by_node(findings, "topk")] == [WARNING]


@pytest.mark.parametrize("boxes,severity", [(6000, FATAL), (3000, WARNING), (1000, INFO)])
def test_nms_boxes_per_call_against_the_box_limit(boxes, severity):
    b = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", boxes, 4])
    s = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, boxes])
    out = helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])
    node = helper.make_node("NonMaxSuppression", ["images", "scores", "max_out", "iou"], ["sel"], name="nms")
    graph = helper.make_graph([node], "g", [b, s], [out], [
        numpy_helper.from_array(np.array(2**63 - 1, np.int64), "max_out"),
        numpy_helper.from_array(np.array(0.5, np.float32), "iou")])
    findings = by_node(check_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), "nms")
    box = [f for f in findings if "candidates" in f.message]
    assert [f.severity for f in box] == [severity] and f"{boxes} boxes" in box[0].message
    assert any(f.severity == INFO and "INT32_MAX" in f.message for f in findings)


def test_int64_constant_narrowed_out_of_int32_is_fatal():
    """INT64 is native, but Gather indices of float data are cast to INT32: 2^40 cannot survive."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph([helper.make_node("Gather", ["images", "idx"], ["y"], name="gather", axis=1)], "g",
                              [x], [y], [numpy_helper.from_array(np.array([2**40], np.int64), "idx")])
    findings = check_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [(f.node, f.op) for f in fatal(findings)] == [("gather", "Gather")]
    assert "outside INT32" in fatal(findings)[0].message
    assert any(f.op == "INT64" and "gather (Gather) input 1" in f.message for f in findings)


def test_subgraph_nodes_are_checked_for_support():
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
    const = [numpy_helper.from_array(np.ones(1, np.float32), "c1")]
    then_g = helper.make_graph([helper.make_node("Unique", ["c1"], ["o"], name="inner_unique")], "then", [], [out],
                               const)
    else_g = helper.make_graph([helper.make_node("Identity", ["c1"], ["o"])], "else", [], [out], const)
    x = helper.make_tensor_value_info("images", TensorProto.BOOL, [1])
    graph = helper.make_graph([helper.make_node("If", ["images"], ["o"], name="if", then_branch=then_g,
                                                else_branch=else_g)], "g", [x], [out])
    findings = check_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [(f.node, f.op) for f in fatal(findings)] == [("inner_unique", "Unique")]
    # what a subgraph is not checked for is said, as a warning on its owner
    assert any(f.node == "if" and f.severity == WARNING and "not for types" in f.message for f in findings)


# ---- API and CLI --------------------------------------------------------------------------


def test_finding_forms():
    f = Finding("K = 5000 exceeds ...", FATAL, node="node_a", op="TopK")
    assert str(f) == "FATAL node_a (TopK): K = 5000 exceeds ..."
    assert f.to_dict() == {"severity": "fatal", "node": "node_a", "op": "TopK", "message": "K = 5000 exceeds ..."}
    text = format_findings([f, Finding("opset 18", INFO, node="<graph>", op="opset")])
    assert text.splitlines()[-1].startswith("1 fatal, 0 warning(s), 1 info")


def test_bad_inputs_raise_user_errors(tmp_path):
    from ctmask.core.errors import ConfigError, ModelError

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \xff\xfe")
    for path in (tmp_path / "missing.onnx", junk):
        with pytest.raises(ModelError, match=str(path.name)):
            check_graph(path)
    with pytest.raises(ConfigError):
        check_graph(tiny_topk(1), trt_version=9)
    with pytest.raises(ConfigError, match="--max-batch"):  # shape inference at a fixed batch grows with it
        check_graph(tiny_topk(1), max_batch=5000)
    with pytest.raises(ModelError, match="is a folder"):
        check_graph(tmp_path)


def test_cli_exit_status_and_json(small_onnx, fp32_copy, tmp_path):
    res = invoke("check-trt", small_onnx, "--json", "-")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["passed"] is True and doc["trt_version"] == 10 and doc["max_batch"] == 32
    assert doc["counts"]["fatal"] == 0 and {f["severity"] for f in doc["findings"]} <= {WARNING, INFO}

    nodes_of(fp32_copy, "Sigmoid")[0].op_type = "Bernoulli"
    bad = tmp_path / "bad.onnx"
    onnx.save(fp32_copy, str(bad))
    out = tmp_path / "bad.json"
    res = invoke("check-trt", bad, "--trt-version", 11, "--max-batch", 4, "--json", out)
    assert res.exit_code == 1, res.output
    assert "FATAL" in res.output and "(Bernoulli)" in res.output
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and doc["trt_version"] == 11 and doc["counts"]["fatal"] == 1

    junk = tmp_path / "junk.onnx"
    junk.write_text("hello")
    for path in (tmp_path / "missing.onnx", junk):
        res = invoke("check-trt", path)
        assert res.exit_code == 2 and str(path) in res.output and "Traceback" not in res.output
    res = invoke("check-trt", small_onnx, "--trt-version", 12)
    assert res.exit_code == 2 and "--trt-version" in res.output
