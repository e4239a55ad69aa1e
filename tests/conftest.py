"""Shared fixtures: tiny synthetic data sets and trained-for-one-step checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A 24-slice synthetic benchmark (train/val/test, all three classes)."""
    from ctmask.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, 24, seed=3, workers=1)
    return out


@pytest.fixture(scope="session")
def seg_ckpt(synth_dir, tmp_path_factory):
    """A small-preset segmentation checkpoint trained for one short epoch."""
    from ctmask.core.presets import SMALL
    from ctmask.data.cncb import list_segmentation
    from ctmask.training.train_seg import SegTrainOptions, train_segmentation

    out = tmp_path_factory.mktemp("ckpt") / "seg.pt"
    samples = list_segmentation(synth_dir / "segmentation" / "train")
    train_segmentation(SMALL, samples, out, SegTrainOptions(epochs=1, batch_size=4, lr=1e-3, max_images=8), None, False)
    return out


@pytest.fixture(scope="session")
def cls_ckpt(synth_dir, seg_ckpt, tmp_path_factory):
    """A small-preset classifier checkpoint with the paper's S (heads variant, two epochs).

    The paper's S is the head the parity, precision and runtime tests were written around (its
    position-reading is what they exercise); tests/test_heads.py covers the pooled head."""
    from ctmask.core.presets import SMALL
    from ctmask.data.covidx import read_split
    from ctmask.training.train_cls import ClsTrainOptions, train_classifier

    out = tmp_path_factory.mktemp("ckpt") / "cls.pt"
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    val = read_split(synth_dir / "val_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=2, batch_size=4, lr=1e-3, head="paper")
    train_classifier(SMALL, seg_ckpt, train, val, out, opts, False)
    return out


@pytest.fixture(scope="session")
def small_onnx(cls_ckpt, tmp_path_factory):
    """The classifier checkpoint exported to ONNX with ``ctmask export``'s function."""
    from ctmask.exporter.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export_onnx(cls_ckpt, out)
    return out


@pytest.fixture()
def foreign_model(tmp_path):
    """A valid ONNX model without ctmask metadata."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``tensorrt`` / ``gpu`` skip, with the reason, where TensorRT or a GPU is missing."""
    marked = [i for i in items if "tensorrt" in i.keywords or "gpu" in i.keywords]
    if not marked:
        return
    from ctmask.core.errors import TensorRTUnavailable
    from ctmask.trt.api import require_tensorrt
    from ctmask.trt.cuda import open_cuda

    reasons = {}
    try:
        require_tensorrt()
    except TensorRTUnavailable as exc:
        reasons["tensorrt"] = f"needs TensorRT: {exc.message} ({exc.hint})"
    try:
        open_cuda().close()
    except TensorRTUnavailable as exc:
        reasons["gpu"] = f"needs an NVIDIA GPU: {exc.message}"
    for item in marked:
        why = [reasons[k] for k in ("tensorrt", "gpu") if k in item.keywords and k in reasons]
        if why:
            item.add_marker(pytest.mark.skip(reason="; ".join(why)))
