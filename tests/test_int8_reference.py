"""INT8 parity against the fake-quantized checkpoint (ctmask/exporter/int8_reference.py): the
graph's scales read back as ModelOpt amax, the float reading of residual / top-down paths,
``int8.tensors`` catching graphs that compute another model, and the fallback to FP32."""

from __future__ import annotations

import json
import sys

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
    from ctmask.exporter.int8_reference import graph_activations, reference_amax

    for target, path in qat_scaled["graphs"].items():
        proto = load_proto(path)
        amax, why = reference_amax(proto)
        assert not why and set(amax) == set(qat_scaled["amax"]), target
        for q, a in amax.items():
            assert a == pytest.approx(qat_scaled["amax"][q], rel=1e-5), (target, q)
        zero_points = {(a.dtype, a.zero_point) for a in graph_activations(proto).values()}
        assert zero_points == ({("int8", 0)} if target == "tensorrt" else {("uint8", 128)})


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
        assert r["passed"] == (r["graph"] <= r["allowed"]) and (name in report["failures"]) != r["passed"]
    # the class line is PyTorch FP32's, whatever the fake-quantized model calls
    assert report["argmax_agreement"] == pytest.approx(report["decisions"]["agreement_vs_pytorch_fp32"])
    assert "int8.tensors" not in report["failures"] and "s.logits" not in report["failures"]
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
