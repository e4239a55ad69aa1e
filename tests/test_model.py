"""Model structure, the fixed-shape ranked RoI module and its export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests_helpers import assert_rois_match

from ctmask.core.presets import PAPER, SMALL
from ctmask.training.detector import build_detector, detector_losses, image_list, normalize
from ctmask.training.model import CovidCTMaskNet, parameter_report, set_variant


def test_paper_parameter_counts_match_reference():
    r = parameter_report(PAPER)
    assert r["parts"] == {
        "backbone_body": 23_508_032,
        "fpn": 3_344_384,
        "rpn_head": 628_630,
        "box_head": 1_622_272,
        "box_predictor": 1_935,
        "mask_branch": 2_623_491,
        "classifier_s": 2_364_419,
    }
    assert r["mask_rcnn_total"] == 31_728_744
    assert r["mask_rcnn_total_with_bn_statistics"] == 31_781_917
    assert r["total"] == 34_093_163
    assert r["trainable_by_variant"]["heads"] == 2_364_419
    assert r["trainable_by_variant"]["full"] == 34_093_163
    # heads+bn adds exactly the backbone's BatchNorm weights and biases: as many as the
    # running means and variances (BN statistics minus the 53 num_batches_tracked).
    assert r["trainable_by_variant"]["heads+bn"] - 2_364_419 == 31_781_917 - 31_728_744 - 53


def test_paper_architecture_details():
    d = build_detector(PAPER)
    assert d.backbone.fpn.extra_blocks is None
    assert d.rpn.anchor_generator.num_anchors_per_location() == [30, 30, 30, 30]
    assert d.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert d.rpn.nms_thresh == 0.75
    assert d.roi_heads.box_head.fc6.in_features == 12544
    assert d.roi_heads.box_head.fc7.out_features == 128
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.backbone.body.modules())


def _small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CovidCTMaskNet(dataclasses.replace(SMALL, **overrides)).eval()


def test_ranked_rois_shape_and_determinism():
    model = _small_model()
    s = SMALL.image_size
    images = torch.rand(3, 1, s, s, generator=torch.Generator().manual_seed(1))
    images[1] = 0.0  # an all-black slice: nothing to detect
    with torch.no_grad():
        rois_a, logits_a = model(images)
        rois_b, logits_b = model(images)
        rois_single, _ = model(images[1:2])
    assert rois_a.shape == (3, SMALL.n_rois, 5) and logits_a.shape == (3, 3)
    assert torch.equal(rois_a, rois_b) and torch.equal(logits_a, logits_b)
    assert torch.isfinite(rois_a).all()
    # Scores ranked highest first, and batching does not change a slice's result.
    assert (rois_a[..., 0].diff(dim=1) <= 0).all()
    torch.testing.assert_close(rois_single[0], rois_a[1], rtol=1e-5, atol=1e-5)


def _zero_height(boxes):
    return (boxes[..., 3] - boxes[..., 1]) == 0


@pytest.mark.parametrize("min_size", sorted({SMALL.rpn_min_size, PAPER.rpn_min_size}))
def test_ranked_rois_match_torchvision_postprocessing(min_size):
    """Static-shape post-processing selects exactly what torchvision's dynamic one does,
    at each preset's RPN min size (0.0 keeps zero-area proposals, 1e-3 drops them)."""
    model = _small_model(seed=2, rpn_min_size=min_size)
    d = model.detector
    assert d.rpn.min_size == min_size
    d.roi_heads.score_thresh = SMALL.cls_score_thresh
    d.roi_heads.nms_thresh = SMALL.cls_nms_thresh
    d.roi_heads.detections_per_img = SMALL.n_rois
    s = SMALL.image_size
    images = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rois, _ = model(images)
        x = normalize(images)
        il = image_list(x)
        feats = d.backbone(x)
        proposals, _ = d.rpn(il, feats)
        mine, valid = model.ranker.proposals([feats[str(i)] for i in range(4)])
        dets, _ = d.roi_heads(feats, proposals, il.image_sizes)
    for i in range(2):
        n = len(proposals[i])
        assert int(valid[i].sum()) == n
        # Zero-height proposals (anchors of size 2 at ratios 0.1 / 0.25) hold post-NMS
        # slots exactly when the min size is 0.
        assert (int(_zero_height(proposals[i]).sum()) > 0) == (min_size == 0)
        assert int((_zero_height(mine[i]) & valid[i]).sum()) == int(_zero_height(proposals[i]).sum())
        # Same proposals; rows with exactly tied scores may come in another order.
        torch.testing.assert_close(torch.unique(mine[i, :n], dim=0), torch.unique(proposals[i], dim=0))
        k = len(dets[i]["scores"])
        torch.testing.assert_close(rois[i, :k, 0], dets[i]["scores"])
        assert int((rois[i, :, 0] > 0).sum()) == k  # the rest is padding


def test_paper_rpn_keeps_zero_area_proposals():
    """The paper preset follows the reference RPN (min size 0): the base anchors of size 2
    at ratios 0.1 and 0.25 have zero height, and their proposals survive RPN NMS into the
    post-NMS set, in torchvision's RPN and in RankedRoIs alike."""
    from torchvision.models.detection.image_list import ImageList

    from ctmask.training.ranked_rois import RankedRoIs

    torch.manual_seed(0)
    d = build_detector(PAPER).eval()
    assert PAPER.rpn_min_size == 0.0 and d.rpn.min_size == 0.0
    assert SMALL.rpn_min_size == build_detector(SMALL).rpn.min_size == 1e-3
    # Cell anchors are ratio-major: index r * 5 + 0 is size 2 at ratio r.
    cell = d.rpn.anchor_generator.cell_anchors[0].view(len(PAPER.aspect_ratios), len(PAPER.anchor_sizes), 4)
    heights = cell[:, 0, 3] - cell[:, 0, 1]
    assert heights.tolist()[:3] == [0.0, 0.0, 2.0]  # ratios 0.1, 0.25 round to 0; 0.5 does not
    assert int(_zero_height(cell).sum()) == 2
    s = PAPER.image_size
    g = torch.Generator().manual_seed(1)
    feats = {str(i): torch.randn(1, PAPER.fpn_channels, s // st, s // st, generator=g)
             for i, st in enumerate((4, 8, 16, 32))}
    with torch.no_grad():
        mine, valid = RankedRoIs(d, PAPER).proposals(list(feats.values()))
        theirs, _ = d.rpn(ImageList(torch.zeros(1, 3, s, s), [(s, s)]), feats)
    n = len(theirs[0])
    assert n == int(valid.sum()) == PAPER.rpn_post_nms_top_n_test
    zero = int(_zero_height(theirs[0]).sum())
    assert zero > 0 and int((_zero_height(mine[0]) & valid[0]).sum()) == zero
    assert torch.equal(torch.unique(mine[0, :n], dim=0), torch.unique(theirs[0], dim=0))


def test_training_with_zero_area_proposals_keeps_losses_finite():
    """With RPN min size 0 (paper), zero-area proposals reach the RoI heads in training;
    their regression targets are infinite, but as they never overlap a ground-truth box
    they are never positives, so no loss or gradient sees them."""
    torch.manual_seed(0)
    preset = dataclasses.replace(SMALL, rpn_min_size=0.0)
    d = build_detector(preset).train()
    # Nudge the zero-height anchors' objectness so their proposals surely hold some of
    # the post-NMS slots (random weights alone give anywhere from none to many).
    with torch.no_grad():
        d.rpn.head.cls_logits.bias[_zero_height(d.rpn.anchor_generator.cell_anchors[0])] += 0.06
    s = preset.image_size
    masks = torch.zeros(2, s, s, dtype=torch.uint8)
    masks[0, 40:70, 50:100] = 1
    masks[1, 110:160, 100:125] = 1
    target = {"boxes": torch.tensor([[50.0, 40, 100, 70], [100.0, 110, 125, 160]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, s, s, dtype=torch.uint8)}
    images = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = normalize(images)
        proposals, _ = d.rpn(image_list(x), d.backbone(x), [target, empty])
    assert all(0 < int(_zero_height(p).sum()) < len(p) for p in proposals)
    sampled, _, labels, reg_targets = d.roi_heads.select_training_samples(proposals, [target, empty])
    for boxes, lab, reg in zip(sampled, labels, reg_targets):
        zero = _zero_height(boxes)
        assert zero.any() and (lab[zero] == 0).all()  # sampled, always as background
        assert not torch.isfinite(reg[zero]).all() and torch.isfinite(reg[lab > 0]).all()
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    for _ in range(2):
        losses = detector_losses(d, images, [target, empty])
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
        opt.step()


def test_roi_comparison_checks_all_five_columns():
    """The helper the export tests use: near-tied rows may swap, nothing else may differ."""
    import numpy as np
    from tests_helpers import ranked_rows

    ref = ranked_rows(n_images=2, n=16, pad=3)
    assert_rois_match(ref + np.float32(5e-5) * (ref != 0), ref)
    swapped = ref.copy()
    swapped[0, 5, 0] = swapped[0, 4, 0] - 1e-6  # rows 4 and 5 tie; they may come out in either order
    tied = swapped.copy()
    tied[0, [4, 5]] = tied[0, [5, 4]]
    tied[0, [4, 5], 0] = tied[0, [5, 4], 0]
    assert_rois_match(tied, swapped)
    bad_delta = ref.copy()
    row, col = np.argwhere(np.abs(ref[1, :13, 1:]) > 0.5)[0]
    bad_delta[1, row, 1 + col] *= 1.01  # one box delta off by 1%
    dropped = ref.copy()
    dropped[0, 7:] = np.concatenate([ref[0, 8:], np.zeros((1, 5), np.float32)])  # a row missing
    for broken in (bad_delta, dropped):
        with pytest.raises(AssertionError):
            assert_rois_match(broken, ref)


def test_export_form_of_roi_pooling_matches_eager():
    from ctmask.training.ranked_rois import level_mapper_levels

    ranker = _small_model().ranker
    g = torch.Generator().manual_seed(7)
    size = 512  # large boxes on a large image reach all four FPN levels
    features = [torch.randn(2, 8, size // st, size // st, generator=g) for st in (4, 8, 16, 32)]
    xy = torch.rand(2, 60, 2, generator=g) * size / 8
    wh = 4 + torch.rand(2, 60, 2, generator=g) ** 2 * (size * 7 / 8 - 4)
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, -1] = torch.tensor([4.0, 4.0, 508.0, 508.0])  # the coarsest level
    boxes[:, -2] = torch.tensor([480.0, 490.0, 512.0, 512.0])  # touches the far edges
    boxes[:, -3] = torch.tensor([0.0, 0.0, 300.0, 512.0])
    eager = ranker.roi_features(features, boxes)
    rois = torch.cat([torch.arange(2.0).view(2, 1, 1).expand(2, 60, 1), boxes], -1).reshape(-1, 5)
    levels = level_mapper_levels(boxes.reshape(-1, 4), ranker.k_min, ranker.k_max)
    static = ranker._roi_features_static(features, rois, levels)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    # Same samples; only the float rounding of the shifted coordinates differs.
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-4)


def test_padding_is_zero_rows_when_few_candidates():
    # 40 proposals x 2 classes = 80 candidates < N = 100: the tail must be zero rows.
    model = _small_model(n_rois=100, rpn_post_nms_top_n_test=40, rpn_pre_nms_top_n_test=40)
    s = SMALL.image_size
    with torch.no_grad():
        rois, logits = model(torch.rand(2, 1, s, s))
    assert rois.shape == (2, 100, 5)
    assert torch.equal(rois[:, 80:], torch.zeros(2, 20, 5))
    assert (rois[:, :1, 0] > 0).all()
    assert torch.isfinite(logits).all()


def test_variants_select_parameters():
    model = _small_model()
    n_cls = sum(p.numel() for p in model.classifier.parameters())
    assert sum(p.numel() for p in set_variant(model, "heads")) == n_cls
    bn = sum(p.numel() for p in set_variant(model, "heads+bn")) - n_cls
    assert bn > 0 and all(
        p.requires_grad == isinstance(m, torch.nn.BatchNorm2d)
        for m in model.detector.modules() if not list(m.children()) for p in m.parameters(recurse=False)
    )
    assert sum(p.numel() for p in set_variant(model, "full")) == sum(p.numel() for p in model.parameters())
    from ctmask.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown classifier variant"):
        set_variant(model, "bn-only")


def test_detector_stays_in_inference_mode_while_training_s():
    model = _small_model()
    model.train()
    assert model.classifier.training and not model.detector.training
    assert not any(m.training for m in model.detector.modules())


@pytest.mark.slow
def test_paper_preset_training_step_and_eval_forward():
    torch.manual_seed(0)
    s = PAPER.image_size
    detector = build_detector(PAPER).train()
    masks = torch.zeros(2, s, s, dtype=torch.uint8)
    masks[0, 100:160, 120:200] = 1
    masks[1, 300:420, 280:330] = 1
    target = {"boxes": torch.tensor([[120.0, 100, 200, 160], [280.0, 300, 330, 420]]),
              "labels": torch.tensor([1, 2]), "masks": masks}
    losses = detector_losses(detector, torch.rand(1, 1, s, s), [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt = torch.optim.Adam(detector.parameters(), lr=1e-5)
    before = detector.roi_heads.box_predictor.cls_score.weight.detach().clone()
    total.backward()
    opt.step()
    assert not torch.equal(before, detector.roi_heads.box_predictor.cls_score.weight)

    model = CovidCTMaskNet(PAPER, detector).eval()
    with torch.no_grad():
        rois, logits = model(torch.rand(1, 1, s, s))
    assert rois.shape == (1, 256, 5) and logits.shape == (1, 3)
    assert torch.isfinite(rois).all() and torch.isfinite(logits).all()


@pytest.mark.slow
def test_small_model_exports_with_dynamo_and_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _small_model(seed=4)
    s = SMALL.image_size
    images = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "small.onnx"
    from ctmask.exporter.translations import translation_table

    torch.onnx.export(
        model, (images,), str(path), dynamo=True, opset_version=18,
        input_names=["images"], output_names=["rois", "logits"], dynamic_shapes={"images": {0: "batch"}},
        custom_translation_table=translation_table(),
    )
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "NonMaxSuppression" in ops and "RoiAlign" in ops and "TopK" in ops
    assert "NonZero" not in ops  # only NMS itself has a data-dependent size
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert isinstance(dims["rois"][0], str) and dims["rois"][1:] == [SMALL.n_rois, 5]
    assert isinstance(dims["logits"][0], str) and dims["logits"][1:] == [3]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):
        rois_o, logits_o = sess.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            rois_t, logits_t = model(batch)
        assert rois_o.shape == tuple(rois_t.shape)
        assert abs(logits_o - logits_t.numpy()).max() < 1e-3
        assert_rois_match(rois_o, rois_t.numpy())  # all five columns, near-tied rows may swap
