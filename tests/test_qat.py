"""Quantization-aware fine-tuning (ctmask/training/qat.py): ModelOpt fake-quant present while
fine-tuning, gone from the saved checkpoint, which loads, exports and yields a valid ranges file
that quantizes every detector convolution."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import invoke

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def base_ranges(small_onnx, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "ranges.json"
    res = invoke("calibrate", small_onnx, "--images", synth_dir, "--size", 4, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def qat_ckpt(seg_ckpt, small_onnx, base_ranges, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "seg-qat.pt"
    res = invoke("qat", seg_ckpt, synth_dir / "segmentation" / "train", "--graph", small_onnx, "--ranges",
                 base_ranges, "--out", out, "--steps", 2, "--batch-size", 2, "--lr", 1e-4, "--distill", 0.5,
                 "--residual", "int8", "-q")
    assert res.exit_code == 0, res.output
    return out


def test_every_detector_conv_is_modelled(small_onnx):
    from ctmask.core.graphs import load_proto
    from ctmask.training.qat import graph_quantizers, module_of_weight

    proto = load_proto(small_onnx)
    tensors = graph_quantizers(proto)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 32
    for node in convs:
        assert module_of_weight(node.input[1]) is not None
        assert node.input[0] in tensors and node.output[0] in tensors
    # a backbone convolution's output is its (folded) BatchNorm's; an output is quantized once
    assert any(q.endswith("body.bn1.output_quantizer") for qs in tensors.values() for q in qs)
    assert all(len(qs) == 1 for t, qs in tensors.items() if any(q.endswith("output_quantizer") for q in qs))


def test_wrapped_detector_fake_quantizes_and_can_switch_it_off(seg_ckpt, small_onnx, base_ranges):
    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import load_proto
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.detector import build_detector, normalize
    from ctmask.training.qat import amax_from_ranges, quantization_off, quantizers, wrap_detector

    ck = load_checkpoint(seg_ckpt)
    plain, wrapped = build_detector(ck.preset), build_detector(ck.preset)
    plain.load_state_dict(ck.model)
    wrapped.load_state_dict(ck.model)
    plain.eval(), wrapped.eval()
    amax = amax_from_ranges(load_proto(small_onnx), load_ranges(base_ranges))
    enabled = wrap_detector(wrapped, amax)
    qs = quantizers(wrapped)
    assert type(wrapped.backbone.body.conv1).__name__.startswith("Quant")
    w = qs["backbone.body.conv1.weight_quantizer"]
    assert w.is_enabled and w.num_bits == 8 and w.axis == 0 and w.amax is None  # per channel, dynamic
    name = "backbone.body.conv1.input_quantizer"
    assert float(qs[name].amax) == pytest.approx(amax[name])
    assert not any("mask_" in n for n in enabled)
    # per-channel int8: at most 255 levels per output channel
    qw = w(wrapped.backbone.body.conv1.weight.detach())
    assert max(len(torch.unique(c)) for c in qw) <= 255
    x = normalize(torch.rand(1, 1, ck.preset.image_size, ck.preset.image_size))
    with torch.no_grad():
        ref = plain.backbone(x)["0"]
        fq = wrapped.backbone(x)["0"]
        with quantization_off(wrapped, enabled):
            off = wrapped.backbone(x)["0"]
    assert torch.equal(off, ref)
    assert not torch.allclose(fq, ref, atol=1e-4)


def test_the_int8_residual_form_reads_the_quantized_tensor_on_residual_paths(seg_ckpt, small_onnx, base_ranges):
    """``--residual int8``: a block without downsample adds its input as ``conv1`` reads it
    (on ``conv1``'s input grid), the FPN upsamples each sum as its layer block reads it; with
    the activation quantizers off the replaced FPN forward is torchvision's."""
    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import load_proto
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.detector import build_detector, normalize
    from ctmask.training.qat import amax_from_ranges, quantizers, wrap_detector

    ck = load_checkpoint(seg_ckpt)
    amax = amax_from_ranges(load_proto(small_onnx), load_ranges(base_ranges))
    x = normalize(torch.rand(2, 1, ck.preset.image_size, ck.preset.image_size))

    def features(residual, act):
        det = build_detector(ck.preset)
        det.load_state_dict(ck.model)
        det.eval()
        wrap_detector(det, act, residual=residual)
        seen = {}
        det.backbone.body.layer1[0].register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0]))
        with torch.no_grad():
            return det.backbone(x), seen["in"], quantizers(det)

    plain, plain_in, _ = features("float", {})
    same, same_in, _ = features("int8", {})  # quantizers that are off pass everything through
    for k in plain:
        assert torch.equal(plain[k], same[k]), k
    flt, flt_in, _ = features("float", amax)
    i8, i8_in, qs = features("int8", amax)
    # the block without downsample reads its input on conv1's grid, the float form as it is
    step = float(qs["backbone.body.layer1.0.conv1.input_quantizer"].amax) / 127
    assert torch.allclose(i8_in / step, torch.round(i8_in / step), atol=1e-3)
    # the coarsest FPN level has no top-down input, the next one upsamples the coarsest lateral
    # output (quantized as a convolution's output in both forms): the same in both forms; the
    # finer ones upsample a sum, rounded in the int8 form only
    levels = list(flt)
    assert all(torch.equal(flt[k], i8[k]) for k in levels[-2:])
    assert all(not torch.equal(flt[k], i8[k]) for k in levels[:-2])


def test_qat_checkpoint_is_plain_and_exports_to_a_fully_quantized_graph(qat_ckpt, seg_ckpt, synth_dir,
                                                                       tmp_path):
    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.graphs import load_proto
    from ctmask.core.presets import SMALL
    from ctmask.data.covidx import read_split
    from ctmask.exporter.onnx_export import export_onnx
    from ctmask.exporter.precision import quantize_int8
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.qat import graph_quantizers
    from ctmask.training.train_cls import ClsTrainOptions, train_classifier

    ck = load_checkpoint(qat_ckpt, kind="segmentation")
    assert not any("quantizer" in k for k in ck.model)
    assert set(ck.model) == set(load_checkpoint(seg_ckpt).model)
    before = load_checkpoint(seg_ckpt).model
    assert any(not torch.equal(ck.model[k], before[k]) for k in ck.model)  # it was fine-tuned
    qat = ck.config["qat"]
    assert qat["tool"].startswith("nvidia-modelopt") and len(qat["amax"]) > 40
    assert qat["residual"] == "int8" and qat["options"]["residual"] == "int8"

    cls = tmp_path / "cls.pt"
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    val = read_split(synth_dir / "val_COVIDx_CT.txt")
    train_classifier(SMALL, qat_ckpt, train, val, cls, ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3,
                                                                      head="pooled"), False)
    graph = tmp_path / "fp32.onnx"
    export_onnx(cls, graph)
    base = tmp_path / "base.json"
    assert invoke("calibrate", graph, "--images", synth_dir, "--size", 4, "--out", base, "-q").exit_code == 0
    out = tmp_path / "qat.ranges.json"
    res = invoke("qat-ranges", graph, "--qat", qat_ckpt, "--base", base, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    rf = load_ranges(out)
    proto = load_proto(graph)
    for tensor, quantizers in graph_quantizers(proto).items():
        a = max(qat["amax"][q] for q in quantizers)
        assert rf.ranges[tensor] == pytest.approx((-a, a))
    assert rf.options["residual"] == "int8"
    int8 = quantize_int8(proto, rf, "tensorrt", {"classifier"})
    produced = {o: n for n in int8.graph.node for o in n.output}
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    assert sum(produced[n.input[0]].op_type == "DequantizeLinear" for n in convs) == len(convs) == 32
    # trained with --residual int8: the FPN's upsampling reads its sums as the layer blocks do
    resize = [n for n in int8.graph.node if n.op_type == "Resize"]
    assert resize and all(produced[n.input[0]].op_type == "DequantizeLinear" for n in resize)
    # the cpu (uint8) form quantizes on the very grid the fine-tune trained: the tensorrt
    # form's scale, zero-point 128
    cpu = quantize_int8(proto, rf, "cpu", {"classifier"})
    trt_grid, cpu_grid = activation_grids(int8), activation_grids(cpu)
    assert set(cpu_grid) == set(trt_grid) and len(cpu_grid) > 40
    for tensor, (scale, zp) in cpu_grid.items():
        assert zp == 128 and scale == pytest.approx(trt_grid[tensor][0], rel=1e-6), tensor
        assert trt_grid[tensor][1] == 0


def activation_grids(proto) -> dict[str, tuple[float, int]]:
    """Activation tensor -> (scale, zero-point) of its QuantizeLinear."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in proto.graph.node if n.op_type == "QuantizeLinear"}


def test_an_unknown_residual_form_is_refused(small_onnx, base_ranges):
    from ctmask.calibration.ranges import load_ranges
    from ctmask.core.errors import ConfigError, RangesError
    from ctmask.core.graphs import load_proto
    from ctmask.training.qat import QatOptions, amax_from_ranges, qat_ranges

    with pytest.raises(ConfigError, match="residual"):
        QatOptions(residual="int4")
    proto, rf = load_proto(small_onnx), load_ranges(base_ranges)
    with pytest.raises(RangesError, match="residual form 'x'"):
        qat_ranges(proto, amax_from_ranges(proto, rf), rf, residual="x")


def test_qat_ranges_names_the_checkpoint_of_an_unknown_residual_form(qat_ckpt, small_onnx, base_ranges, tmp_path):
    from ctmask.training.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(qat_ckpt, kind="segmentation")
    bad = tmp_path / "bad-qat.pt"
    save_checkpoint(bad, kind="segmentation", preset=ck.preset, model=ck.model, epoch=ck.epoch,
                    config={**ck.config, "qat": {**ck.config["qat"], "residual": None}})
    res = invoke("qat-ranges", small_onnx, "--qat", bad, "--base", base_ranges, "--out", tmp_path / "r.json")
    assert res.exit_code != 0 and "unknown residual form null" in res.output and "bad-qat.pt" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "r.json").exists()


def test_qat_ranges_refuses_a_checkpoint_without_scales(seg_ckpt, small_onnx, base_ranges, tmp_path):
    res = invoke("qat-ranges", small_onnx, "--qat", seg_ckpt, "--base", base_ranges, "--out", tmp_path / "r.json")
    assert res.exit_code == 2 and "not a QAT checkpoint" in res.output
    assert not (tmp_path / "r.json").exists()
