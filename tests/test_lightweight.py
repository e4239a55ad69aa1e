"""The reference's lightweight family: truncated ResNet18 / 34 with a one-level FPN, and mask types."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctmask.core.errors import ConfigError
from ctmask.core.presets import PAPER, RESNET18_T1, RESNET34_T1, SMALL, preset_from_dict
from ctmask.training.datasets import select_mask_type, select_mask_type_map
from ctmask.training.detector import build_detector, image_list, normalize
from ctmask.training.model import CovidCTMaskNet, parameter_report

TINY_T1 = dataclasses.replace(RESNET18_T1, name="tiny-t1", backbone_blocks=(1, 1, 1, 1), fpn_channels=32,
                              image_size=128, mask_head_channels=16, classifier_width=32, box_representation=32,
                              rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300, n_rois=64)
"""The lightweight architecture (truncation 1, one FPN level on layer3, one mask conv, 2 classes) at
test size: the same code paths as ``resnet18-t1`` at a fraction of the cost."""


@pytest.mark.parametrize(("preset", "seg", "cls"), [(RESNET18_T1, 6_051_810, 6_283_235),
                                                     (RESNET34_T1, 11_439_330, 11_670_755)])
def test_lightweight_parameter_counts(preset, seg, cls):
    r = parameter_report(preset)
    # The reference's shapes: body to layer3, FPN 256 -> 256 on layer3 alone, one 128-channel
    # mask conv, 2 classes, S 640 -> 512 -> 512 -> 3.
    assert r["parts"]["fpn"] == 256 * 256 + 256 + 256 * 256 * 9 + 256
    assert r["parts"]["mask_branch"] == (256 * 128 * 9 + 128) + (128 * 128 * 4 + 128) + (128 * 2 + 2)
    assert r["parts"]["classifier_s"] == (640 * 512 + 512) + (512 * 512 + 512) + (512 * 3 + 3)
    assert r["segmentation_model"] == seg and r["classifier_model"] == cls
    assert r["classifier_model"] == r["segmentation_model"] - r["parts"]["mask_branch"] + r["parts"]["classifier_s"]


def test_truncated_one_level_architecture():
    d = build_detector(RESNET34_T1)
    assert list(d.backbone.body.keys()) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert [len(d.backbone.body[f"layer{i}"]) for i in (1, 2, 3)] == [3, 4, 6]
    assert len(d.backbone.fpn.inner_blocks) == 1 and d.backbone.fpn.extra_blocks is None
    assert d.rpn.anchor_generator.num_anchors_per_location() == [30]
    assert len(d.roi_heads.mask_head) == 1
    assert d.roi_heads.box_predictor.cls_score.out_features == 2
    x = torch.zeros(1, 3, 64, 64)
    assert [tuple(v.shape) for v in d.backbone(x).values()] == [(1, 256, 4, 4)]  # stride 16
    assert RESNET34_T1.feature_strides == (16,) and PAPER.feature_strides == (4, 8, 16, 32)
    assert dataclasses.replace(RESNET34_T1, truncation=2).feature_strides == (8,)


def test_one_level_ranked_rois_match_torchvision_postprocessing():
    """With a single FPN level the static-shape ranker still selects what torchvision keeps."""
    torch.manual_seed(4)
    model = CovidCTMaskNet(TINY_T1).eval()
    d = model.detector
    d.roi_heads.score_thresh, d.roi_heads.nms_thresh = TINY_T1.cls_score_thresh, TINY_T1.cls_nms_thresh
    d.roi_heads.detections_per_img = TINY_T1.n_rois
    images = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rois, _ = model(images)
        x = normalize(images)
        il = image_list(x)
        feats = d.backbone(x)
        proposals, _ = d.rpn(il, feats)
        mine, valid = model.ranker.proposals([feats["0"]])
        dets, _ = d.roi_heads(feats, proposals, il.image_sizes)
    for i in range(2):
        n = len(proposals[i])
        assert int(valid[i].sum()) == n
        torch.testing.assert_close(torch.unique(mine[i, :n], dim=0), torch.unique(proposals[i], dim=0))
        k = len(dets[i]["scores"])
        assert k > 0
        torch.testing.assert_close(rois[i, :k, 0], dets[i]["scores"])


def test_mask_types():
    target = {"boxes": torch.tensor([[0.0, 0, 4, 4], [5, 5, 9, 9]]), "labels": torch.tensor([1, 2]),
              "masks": torch.ones(2, 10, 10, dtype=torch.uint8)}
    assert select_mask_type(target, "both") is target
    assert select_mask_type(target, "merge")["labels"].tolist() == [1, 1]
    ggo = select_mask_type(target, "ggo")
    assert ggo["labels"].tolist() == [1] and ggo["boxes"].shape == (1, 4) and ggo["masks"].shape == (1, 10, 10)
    m = np.array([[0, 1, 2]], dtype=np.uint8)
    assert select_mask_type_map(m, "merge").tolist() == [[0, 1, 1]]
    assert select_mask_type_map(m, "ggo").tolist() == [[0, 1, 0]]
    with pytest.raises(ConfigError, match="2 detector classes"):
        dataclasses.replace(PAPER, mask_type="merge")
    with pytest.raises(ConfigError, match="fpn_levels 4"):
        dataclasses.replace(PAPER, truncation=1)


def test_preset_dicts_without_the_new_fields_still_load():
    for p in (PAPER, SMALL):
        old = {k: v for k, v in p.to_dict().items()
               if k not in {"truncation", "fpn_levels", "mask_head_layers", "mask_type"}}
        assert preset_from_dict(old) == p


def test_lightweight_graph_exports_passes_parity_check_trt_and_runs_everywhere(light_graph, synth_dir, tmp_path):
    """resnet18-t1 at its own size, from the authors' classifier format through import-reference: the
    graph, parity against PyTorch, the TensorRT check, and the commands that take a graph (infer,
    bench, the Triton repository) unchanged."""
    import json

    import onnx
    from tests_helpers import invoke

    from ctmask.backends.parity import check_parity
    from ctmask.core.graphs import read_spec
    from ctmask.trt.check import check_graph as check_trt
    from ctmask.trt.check import fatal, format_findings

    _, ckpt, graph = light_graph
    spec = read_spec(graph)
    assert (spec.preset, spec.image_size, spec.n_rois) == ("resnet18-t1", 512, 128)
    report = check_parity(ckpt, graph, [synth_dir / "images"], max_images=2, batch_size=2)
    assert report["passed"], (report["failures"], report["failing_slices"])
    findings = check_trt(onnx.load(str(graph)), 10)
    assert fatal(findings) == [], format_findings(findings)
    slices = sorted((synth_dir / "images").iterdir())[:2]
    res = invoke("infer", graph, *slices, "--out", tmp_path / "calls.csv", "-q")
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "calls.csv").read_text().strip().splitlines()) == 3
    res = invoke("bench", graph, "--backend", "onnxruntime-cpu", "-b", "1", "--iterations", "1", "--warmup", "0",
                 "--images", synth_dir / "images", "--json", tmp_path / "bench.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["throughput"] > 0
    res = invoke("export", graph, "--triton-repo", tmp_path / "models")
    assert res.exit_code == 0, res.output
    res = invoke("check-triton", tmp_path / "models")
    assert res.exit_code == 0 and "no findings" in res.output, res.output
