"""Training loops, checkpoints and evaluation on a tiny synthetic set (small preset)."""

from __future__ import annotations

import json

import pytest
import torch

from ctmask.core.errors import CheckpointError
from ctmask.core.presets import SMALL
from ctmask.data.cncb import list_segmentation
from ctmask.data.covidx import read_split
from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
from ctmask.training.evaluate import evaluate_classifier, evaluate_segmentation
from ctmask.training.model import CovidCTMaskNet, bn_affine_parameters, load_weights
from ctmask.training.train_cls import ClsTrainOptions, train_classifier
from ctmask.training.train_seg import SegTrainOptions, train_segmentation


def test_checkpoint_is_plain_data(seg_ckpt):
    blob = torch.load(seg_ckpt, weights_only=True)
    assert blob["format"] == "ctmask-checkpoint/1" and blob["kind"] == "segmentation"
    cfg = json.loads(blob["config"])
    assert cfg["preset"]["name"] == "small" and cfg["epoch"] == 1
    assert json.loads(seg_ckpt.with_name(seg_ckpt.name + ".json").read_text())["kind"] == "segmentation"
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"} <= set(
        cfg["history"][0]
    )


def test_segmentation_resume_continues(seg_ckpt, synth_dir, tmp_path):
    samples = list_segmentation(synth_dir / "segmentation" / "train")
    out = tmp_path / "seg2.pt"
    opts = SegTrainOptions(epochs=2, batch_size=4, lr=1e-3, max_images=4)
    summary = train_segmentation(SMALL, samples, out, opts, resume=seg_ckpt, show_progress=False)
    ck = load_checkpoint(out, kind="segmentation")
    assert ck.epoch == 2 and len(summary["history"]) == 2 and ck.optimizer is not None


def test_classifier_checkpoint_and_evaluation(cls_ckpt, synth_dir):
    ck = load_checkpoint(cls_ckpt, kind="classifier", preset="small")
    assert ck.epoch == 2 and len(ck.config["history"]) == 2 and "val_accuracy" in ck.config["history"][-1]
    test = read_split(synth_dir / "test_COVIDx_CT.txt")
    report = evaluate_classifier(ck, test, batch_size=4, show_progress=False)
    assert report["n"] == len(test)
    assert sum(map(sum, report["confusion_matrix"])) == len(test)
    assert set(report["per_class"]) == {"normal", "pneumonia", "covid19"}
    assert len(report["predictions"]) == len(test)
    assert all(abs(sum(p["probs"]) - 1) < 1e-4 for p in report["predictions"])


def test_heads_bn_variant_trains_only_bn_and_s(seg_ckpt, synth_dir, tmp_path):
    out = tmp_path / "cls-bn.pt"
    train = read_split(synth_dir / "train_COVIDx_CT.txt")[:8]
    train_classifier(SMALL, seg_ckpt, train, None, out, ClsTrainOptions("heads+bn", 1, 4, 1e-2), False)
    seg = load_checkpoint(seg_ckpt).model
    cls = load_checkpoint(out).model
    conv = "backbone.body.conv1.weight"
    bn = "backbone.body.bn1.weight"
    assert torch.equal(seg[conv], cls[f"detector.{conv}"])
    assert not torch.equal(seg[bn], cls[f"detector.{bn}"])
    # BN running statistics stay frozen: the detector runs in inference mode.
    assert torch.equal(seg["backbone.body.bn1.running_mean"], cls["detector.backbone.body.bn1.running_mean"])


def test_full_variant_sends_gradients_into_detector():
    from ctmask.training.model import set_variant
    from ctmask.training.train_cls import bce_one_hot

    torch.manual_seed(0)
    model = CovidCTMaskNet(SMALL)
    set_variant(model, "full")
    model.train()
    s = SMALL.image_size
    _, logits = model(torch.rand(2, 1, s, s))
    bce_one_hot(logits, torch.tensor([0, 2])).backward()
    grad = model.detector.roi_heads.box_predictor.bbox_pred.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.detector.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.detector.roi_heads.mask_predictor.parameters())
    assert len(bn_affine_parameters(model.detector)) > 0


def test_segmentation_evaluation(seg_ckpt, synth_dir):
    samples = list_segmentation(synth_dir / "segmentation" / "test")
    report = evaluate_segmentation(load_checkpoint(seg_ckpt), samples, batch_size=4, show_progress=False)
    assert report["n"] == len(samples)
    assert 0.0 <= report["mask_ap"]["mAP"] <= 1.0 or report["mask_ap"]["mAP"] != report["mask_ap"]["mAP"]
    assert set(report["dice"]["per_class"]) == {1, 2}


def test_wrong_preset_checkpoint_is_rejected(seg_ckpt):
    with pytest.raises(CheckpointError, match="trained with preset 'small'") as err:
        load_checkpoint(seg_ckpt, preset="paper")
    assert str(seg_ckpt) in str(err.value)
    with pytest.raises(CheckpointError, match="expected a classifier checkpoint"):
        load_checkpoint(seg_ckpt, kind="classifier")


def test_corrupt_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_of_another_shape_are_rejected(cls_ckpt):
    ck = load_checkpoint(cls_ckpt)
    state = dict(ck.model)
    state["classifier.net.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="weights do not fit the model") as err:
        load_weights(CovidCTMaskNet(SMALL), state, ck.path)
    assert str(ck.path) in str(err.value)


def test_failed_checkpoint_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ck.pt"

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, kind="segmentation", preset=SMALL, model={"w": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_classifier_checkpoint_of_another_variant_is_a_starting_point(cls_ckpt, synth_dir, tmp_path):
    from ctmask.training.train_cls import init_model

    same = init_model(SMALL, cls_ckpt, "heads")
    assert same.epoch == 2 and same.optimizer is not None and len(same.history) == 2
    other = init_model(SMALL, cls_ckpt, "heads+bn")
    assert other.epoch == 0 and other.optimizer is None and other.history == []
    trained = load_checkpoint(cls_ckpt).model
    assert torch.equal(other.model.classifier.net[0].weight, trained["classifier.net.0.weight"])
