"""The exporter: one ONNX graph per checkpoint, the graph contract, metadata, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ctmask.core.errors import CheckpointError
from ctmask.core.fileio import sha256_file
from ctmask.core.presets import PAPER, SMALL
from ctmask.core.spec import GraphSpec
from ctmask.exporter.onnx_export import export_onnx, graph_problems
from ctmask.runtime.runner import OnnxRuntimeRunner


def output_dims(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def test_small_graph_contract_and_metadata(small_onnx, cls_ckpt):
    dims = output_dims(small_onnx)
    s, n = SMALL.image_size, SMALL.n_rois
    assert list(dims) == ["images", "rois", "logits", "probs"]
    for name, tail in {"images": [1, s, s], "rois": [n, 5], "logits": [3], "probs": [3]}.items():
        assert isinstance(dims[name][0], str) and dims[name][0], f"{name}: batch must be symbolic"
        assert dims[name][1:] == tail, f"{name}: only the batch may be symbolic, got {dims[name]}"
    model = onnx.load(str(small_onnx))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert "NonZero" not in ops and {"NonMaxSuppression", "RoiAlign", "TopK"} <= ops
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) >= 18
    spec = GraphSpec.from_metadata({p.key: p.value for p in model.metadata_props}, small_onnx)
    assert (spec.preset, spec.image_size, spec.n_rois) == ("small", s, n)
    assert spec.checkpoint_sha256 == sha256_file(cls_ckpt)
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
    with torch.no_grad():
        rois, logits = load_classifier(load_checkpoint(cls_ckpt))(torch.from_numpy(x))
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-3)
    np.testing.assert_allclose(got["probs"], torch.softmax(logits, -1).numpy(), atol=1e-4)
    np.testing.assert_allclose(got["rois"][..., 0], rois[..., 0].numpy(), atol=1e-4)


def test_segmentation_checkpoint_is_refused_and_nothing_written(seg_ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(CheckpointError, match="expected a classifier checkpoint"):
        export_onnx(seg_ckpt, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_paper_preset_exports_and_matches_torch(tmp_path):
    """Untrained paper-preset weights: the full-size graph, its shapes and its parity."""
    from ctmask.training.checkpoint import save_checkpoint
    from ctmask.training.model import CovidCTMaskNet

    torch.manual_seed(0)
    model = CovidCTMaskNet(PAPER).eval()
    ckpt = tmp_path / "paper.pt"
    save_checkpoint(ckpt, kind="classifier", preset=PAPER, model=model.state_dict_for_checkpoint())
    out = tmp_path / "paper.onnx"
    result = export_onnx(ckpt, out)
    assert result.spec.n_rois == 256 and not list(tmp_path.glob(".*tmp"))
    dims = output_dims(out)
    assert dims["rois"][1:] == [256, 5] and dims["logits"][1:] == [3] and dims["images"][1:] == [1, 512, 512]
    assert all(isinstance(d[0], str) for d in dims.values())
    x = torch.rand(2, 1, 512, 512, generator=torch.Generator().manual_seed(1))
    with OnnxRuntimeRunner(out) as r:
        got = r.infer({"images": x.numpy()})
    with torch.no_grad():
        rois, logits = model(x)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-3)
    np.testing.assert_allclose(np.sort(got["rois"][..., 0], 1), np.sort(rois[..., 0].numpy(), 1), atol=1e-4)
