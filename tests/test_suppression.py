"""Matrix suppression of the ranked RoIs and S trained on its deployed graphs' RoIs
(``train-cls --suppression matrix --rois-from GRAPH``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torchvision.ops import box_iou, nms
from typer.testing import CliRunner

from ctmask.cli.main import app
from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.presets import SMALL, preset_from_dict
from ctmask.core.spec import GraphSpec
from ctmask.data.covidx import read_split
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.grouped_nms import matrix_suppression
from ctmask.training.train_cls import ClsTrainOptions, train_classifier


def reference_matrix(boxes: torch.Tensor, scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """SOLOv2's matrix NMS written out per group with torchvision's IoU, for comparison."""
    out = torch.full_like(scores, float("-inf"))
    for b in range(scores.shape[0]):
        for g in range(scores.shape[1]):
            real = torch.nonzero(scores[b, g] > float("-inf")).squeeze(1)
            order = real[scores[b, g, real].argsort(descending=True)]
            s, bx = scores[b, g, order], boxes[b, g, order]
            iou = box_iou(bx, bx).triu(1)
            comp = iou.max(0).values
            decay = torch.exp(-(iou ** 2 - comp[:, None] ** 2) / sigma).min(0).values
            out[b, g, order] = s * decay
    return out


def random_candidates(seed: int = 0, k: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 3, k, 2, generator=g) * 60
    wh = 4 + torch.rand(2, 3, k, 2, generator=g) * 30
    return torch.cat([xy, xy + wh], -1), torch.rand(2, 3, k, generator=g)


def test_matrix_suppression_matches_the_written_out_reference():
    boxes, scores = random_candidates()
    scores[0, 1, 5:12] = float("-inf")  # ignored candidates: neither suppress nor survive
    got = matrix_suppression(boxes, scores, 0.5)
    want = reference_matrix(boxes, scores, 0.5)
    assert torch.equal(torch.isinf(got), torch.isinf(scores))
    real = torch.isfinite(scores)
    assert torch.allclose(got[real], want[real], atol=1e-6)
    assert (got[real] <= scores[real] + 1e-7).all()
    best = scores.argmax(-1, keepdim=True)
    assert torch.equal(got.gather(-1, best), scores.gather(-1, best))  # the top box keeps its score


def box_at_iou(base: torch.Tensor, iou: float) -> torch.Tensor:
    """A box of the same size as ``base`` shifted right so their IoU is ``iou``."""
    w = float(base[2] - base[0])
    shift = w * (1 - iou) / (1 + iou)
    return base + torch.tensor([shift, 0.0, shift, 0.0])


def test_a_box_crossing_the_nms_threshold_moves_matrix_scores_a_little_and_nms_by_a_whole_row():
    base = torch.tensor([10.0, 10.0, 50.0, 50.0])
    before, after = box_at_iou(base, 0.7499), box_at_iou(base, 0.7501)
    scores = torch.tensor([0.9, 0.8])
    kept = [len(nms(torch.stack([base, b]), scores, 0.75)) for b in (before, after)]
    assert kept == [2, 1]  # hard NMS: the second box is there, then gone
    m = [matrix_suppression(torch.stack([base, b])[None, None], scores[None, None], 0.5)[0, 0, 1]
         for b in (before, after)]
    assert abs(float(m[0] - m[1])) < 1e-3 and float(m[1]) > 0.2


def test_exact_ties_are_broken_by_input_order_and_boxes_get_no_gradient():
    base = torch.tensor([10.0, 10.0, 50.0, 50.0])
    boxes = torch.stack([base, box_at_iou(base, 0.8), box_at_iou(base, 0.6)])[None, None]
    scores = torch.tensor([[[0.7, 0.7, 0.7]]])
    got = matrix_suppression(boxes, scores, 0.5)[0, 0]
    assert float(got[0]) == pytest.approx(0.7)  # the earliest of the tied boxes counts as above
    assert float(got[1]) == pytest.approx(0.7 * float(torch.exp(torch.tensor(-0.64 / 0.5))), rel=1e-4)
    flipped = matrix_suppression(boxes.flip(2), scores, 0.5)[0, 0]
    assert float(flipped[0]) == pytest.approx(0.7)  # now the other end is first, and it keeps its score
    b = boxes.clone().requires_grad_(True)
    s = scores.clone().requires_grad_(True)
    matrix_suppression(b, s, 0.5).sum().backward()
    assert b.grad is None or float(b.grad.abs().sum()) == 0.0
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_presets_refuse_unknown_suppression_and_old_dicts_use_nms():
    with pytest.raises(ConfigError, match="unknown RoI suppression"):
        dataclasses.replace(SMALL, roi_suppression="soft")
    with pytest.raises(ConfigError, match="roi_suppression_sigma"):
        dataclasses.replace(SMALL, roi_suppression_sigma=0.0)
    old = {k: v for k, v in dataclasses.asdict(SMALL).items() if not k.startswith("roi_suppression")}
    assert preset_from_dict(old).roi_suppression == "nms"


@pytest.fixture(scope="module")
def matrix_run(seg_ckpt, synth_dir, tmp_path_factory):
    """A pooled head on matrix-suppressed RoIs, trained on the tiny detector and exported."""
    from ctmask.exporter.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("matrix")
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, head="pooled", suppression="matrix")
    train_classifier(SMALL, seg_ckpt, train, None, out / "cls.pt", opts, False, roi_cache=out / "cache")
    export_onnx(out / "cls.pt", out / "m.onnx")
    return out


def test_matrix_suppression_is_recorded_and_its_graph_passes_parity(matrix_run, synth_dir, tmp_path):
    from PIL import Image

    from ctmask.backends.parity import check_parity
    from ctmask.cli.deploy import format_parity

    ck = load_checkpoint(matrix_run / "cls.pt")
    assert ck.preset.roi_suppression == "matrix" and ck.config["train"]["suppression"] == "matrix"
    proto = onnx.load(str(matrix_run / "m.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    spec = GraphSpec.from_metadata(meta, matrix_run / "m.onnx")
    assert spec.suppression == "matrix" and len(spec.detector_sha256) == 64
    ops = {n.op_type for n in proto.graph.node}
    assert "NonMaxSuppression" in ops  # the RPN's NMS stays hard
    # Real slices, and flat frames: exact score ties among overlapping candidates, which PyTorch and
    # onnxruntime must break alike.
    real = sorted((synth_dir / "images").iterdir())[:17]
    for name in real:
        (tmp_path / name.name).symlink_to(name)
    for value in (0, 128, 255):
        Image.fromarray(np.full((96, 96), value, dtype=np.uint8)).save(tmp_path / f"flat{value}.png")
    report = check_parity(matrix_run / "cls.pt", matrix_run / "m.onnx", [tmp_path], max_images=20, batch_size=5,
                          noise_levels=())
    assert report["passed"], format_parity(report)
    assert report["n_images"] == 20


def test_parity_fails_a_graph_whose_suppression_metadata_lies(matrix_run, synth_dir, tmp_path):
    from ctmask.backends.parity import check_parity

    proto = onnx.load(str(matrix_run / "m.onnx"))
    for p in proto.metadata_props:
        if p.key == "ctmask.roi_suppression":
            p.value = "nms"
    onnx.save(proto, str(tmp_path / "lie.onnx"))
    report = check_parity(matrix_run / "cls.pt", tmp_path / "lie.onnx", [synth_dir / "images"], max_images=4,
                          batch_size=4, noise_levels=())
    assert not report["passed"]
    assert report["metadata_mismatches"] == {"suppression": {"graph": "nms", "checkpoint": "matrix"}}


def test_train_cls_learns_from_a_graphs_rois(matrix_run, seg_ckpt, synth_dir):
    from ctmask.training.train_cls import _train  # noqa: F401  (the public entry is train_classifier)

    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    graph = str(matrix_run / "m.onnx")
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, head="pooled", suppression="matrix",
                           rois_from=(graph,), consistency=1.0)
    summary = train_classifier(SMALL, seg_ckpt, train, None, matrix_run / "g.pt", opts, False,
                               roi_cache=matrix_run / "cache")
    assert summary["n_train"] == len(train)
    ck = load_checkpoint(matrix_run / "g.pt")
    assert ck.config["train"]["rois_from"] == [graph] and ck.config["train"]["consistency"] == 1.0


def test_graph_copies_are_appended_after_the_exact_rows(matrix_run, seg_ckpt, synth_dir):
    from ctmask.training.datasets import ClassificationDataset
    from ctmask.training.graph_rois import graph_rois
    from ctmask.training.train_cls import init_model, ranked_rois_of, with_graph_copies

    entries = read_split(synth_dir / "train_COVIDx_CT.txt")
    model = init_model(SMALL, seg_ckpt, "heads", "pooled", "matrix").model
    data = ClassificationDataset(entries, SMALL.image_size, cache_bytes=0)
    exact = ranked_rois_of(model, data, 4, False)
    copies = graph_rois((str(matrix_run / "m.onnx"),), model, data, 4, False)
    both = with_graph_copies(exact, copies).tensors[0]
    assert both.shape == (len(entries), 2, SMALL.n_rois, 5)
    assert torch.equal(both[:, 0], exact.tensors[0])
    assert (both[:, 1] - both[:, 0]).abs().max() < 1e-4  # an FP32 graph of this detector: the same rows


def test_rois_from_refuses_graphs_of_another_detector_or_rule(matrix_run, seg_ckpt, small_onnx, light_graph,
                                                              synth_dir, tmp_path):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, head="pooled", suppression="matrix",
                           rois_from=(str(small_onnx),))
    with pytest.raises(ModelError, match="'nms' suppression, this model 'matrix'") as err:
        train_classifier(SMALL, seg_ckpt, train, None, tmp_path / "x.pt", opts, False)
    assert str(small_onnx) in str(err.value) and not (tmp_path / "x.pt").exists()
    # A graph whose metadata lost the detector's digest (written by an older ctmask).
    proto = onnx.load(str(matrix_run / "m.onnx"))
    for p in proto.metadata_props:
        if p.key == "ctmask.detector_sha256":
            p.value = ""
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(ModelError, match="does not record which detector"):
        train_classifier(SMALL, seg_ckpt, train, None, tmp_path / "x.pt",
                         dataclasses.replace(opts, rois_from=(str(tmp_path / "old.onnx"),)), False)
    # Another detector: the same graph's digest no longer matches once the detector's weights change.
    other = load_checkpoint(seg_ckpt)
    state = {k: v + 1e-3 if k.endswith("rpn.head.conv.0.0.weight") else v for k, v in other.model.items()}
    from ctmask.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "seg2.pt", kind="segmentation", preset=other.preset, model=state, epoch=1,
                    config=other.config)
    with pytest.raises(ModelError, match="is not the one being trained on"):
        train_classifier(SMALL, tmp_path / "seg2.pt", train, None, tmp_path / "x.pt",
                         dataclasses.replace(opts, rois_from=(str(matrix_run / "m.onnx"),)), False)
    assert not (tmp_path / "x.pt").exists()


def test_a_matrix_classifier_resumes_with_its_own_rule(matrix_run, synth_dir):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    out = matrix_run / "resumed.pt"
    train_classifier(SMALL, matrix_run / "cls.pt", train, None, out, ClsTrainOptions("heads", epochs=2, batch_size=4),
                     False)
    ck = load_checkpoint(out)
    assert ck.epoch == 2 and ck.preset.roi_suppression == "matrix"


def test_rows_far_from_the_detectors_are_refused_whatever_the_metadata_says():
    from ctmask.training.graph_rois import PROFILE_LIMIT, check_rows

    g = torch.Generator().manual_seed(0)
    exact = torch.rand(50, 64, 5, generator=g)
    close = exact + 0.05 * torch.randn(50, 64, 5, generator=g)  # INT8-like: the median slice moves 0.09
    check_rows(close.unsqueeze(1), exact, ("int8.onnx",))
    other = torch.rand(50, 64, 5, generator=g)
    other[..., 0] = other[..., 0] * 0.4  # another detector: a different score profile
    with pytest.raises(ModelError, match=f"at most {PROFILE_LIMIT}") as err:
        check_rows(torch.stack([close, other], 1), exact, ("int8.onnx", "other.onnx"))
    assert "other.onnx" in str(err.value)
    bad = close.clone()
    bad[3, 5, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        check_rows(bad.unsqueeze(1), exact, ("nan.onnx",))
    with pytest.raises(ModelError, match=r"rois are \[32, 5\] per slice"):
        check_rows(close[:, :32].unsqueeze(1), exact, ("short.onnx",))


def test_rois_from_options_are_checked(seg_ckpt, synth_dir, matrix_run, tmp_path):
    with pytest.raises(ConfigError, match="--rois-from applies to the heads variant"):
        ClsTrainOptions("heads+bn", rois_from=("g.onnx",))
    with pytest.raises(ConfigError, match="more than once"):
        ClsTrainOptions("heads", rois_from=("g.onnx", "h.onnx", "./g.onnx"))
    with pytest.raises(ConfigError, match="--perturb or --rois-from"):
        ClsTrainOptions("heads", consistency=1.0)
    with pytest.raises(ConfigError, match="unknown RoI suppression"):
        ClsTrainOptions("heads", suppression="greedy")
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    with pytest.raises(ConfigError, match="--suppression nms: the classifier checkpoint holds the 'matrix' suppr"):
        train_classifier(SMALL, matrix_run / "cls.pt", train, None, tmp_path / "x.pt",
                         ClsTrainOptions("heads", epochs=2, suppression="nms"), False)
    split = synth_dir / "train_COVIDx_CT.txt"
    res = CliRunner().invoke(app, ["train-cls", str(seg_ckpt), "--train-split", str(split), "--out",
                                   str(tmp_path / "y.pt"), "--variant", "heads", "--rois-from",
                                   str(tmp_path / "missing.onnx"), "-q"])
    assert res.exit_code == 2 and "missing.onnx" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["train-cls", str(seg_ckpt), "--train-split", str(split), "--out",
                                   str(tmp_path / "y.pt"), "--variant", "heads", "--suppression", "matrix",
                                   "--rois-from", str(split), "-q"])
    assert res.exit_code == 2 and str(split) in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["train-cls", str(seg_ckpt), "--train-split", str(split), "--out",
                                   str(tmp_path / "y.pt"), "--variant", "heads", "--rois-from", str(tmp_path), "-q"])
    assert res.exit_code == 2 and "not a folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "y.pt").exists()
