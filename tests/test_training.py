"""Training loops, checkpoints and evaluation on a tiny synthetic set (small preset)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from ctmask.core.errors import CheckpointError, ConfigError
from ctmask.core.presets import SMALL
from ctmask.data.cncb import list_segmentation
from ctmask.data.covidx import read_split
from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
from ctmask.training.datasets import ClassificationDataset, SegmentationDataset, TensorCache
from ctmask.training.evaluate import evaluate_classifier, evaluate_segmentation
from ctmask.training.model import CovidCTMaskNet, bn_affine_parameters, load_weights
from ctmask.training.train_cls import ClsTrainOptions, train_classifier
from ctmask.training.train_seg import SegTrainOptions, train_segmentation


def test_checkpoint_is_plain_data(seg_ckpt):
    blob = torch.load(seg_ckpt, weights_only=True)
    assert blob["format"] == "ctmask-checkpoint/2" and blob["kind"] == "segmentation"
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
    assert math.isfinite(report["mask_ap"]["mAP"]) and 0.0 <= report["mask_ap"]["mAP"] <= 1.0
    assert set(report["dice"]["per_class"]) == {1, 2}


def _detections_from_ground_truth(samples, swap_labels: bool):
    """A stand-in for ``segment`` that returns each slice's ground-truth instances."""
    data = SegmentationDataset(samples, SMALL.image_size)
    targets = iter([data[i][1] for i in range(len(data))])

    def fake_segment(detector, images):
        out = []
        for _ in range(images.shape[0]):
            t = next(targets)
            labels = 3 - t["labels"] if swap_labels else t["labels"]
            scores = torch.linspace(0.9, 0.6, len(labels))
            masks = t["masks"][:, None].float()
            out.append({"boxes": t["boxes"], "labels": labels, "scores": scores, "masks": masks})
        return out

    return fake_segment


@pytest.mark.parametrize("swap_labels, expected", [(False, 1.0), (True, 0.0)])
def test_segmentation_evaluation_known_map(seg_ckpt, synth_dir, monkeypatch, swap_labels, expected):
    # Detections equal to the ground truth give mask AP 1 at every IoU threshold; the same
    # masks with GGO and consolidation swapped match nothing and give 0.
    import ctmask.training.evaluate as ev

    samples = list_segmentation(synth_dir / "segmentation" / "test")
    monkeypatch.setattr(ev, "segment", _detections_from_ground_truth(samples, swap_labels))
    report = evaluate_segmentation(load_checkpoint(seg_ckpt), samples, batch_size=3, show_progress=False)
    ap = report["mask_ap"]
    assert sum(ap["per_class"][c]["n_gt"] for c in (1, 2)) > 0
    assert ap["mAP"] == pytest.approx(expected) and ap["AP50"] == pytest.approx(expected)
    assert ap["AP75"] == pytest.approx(expected)


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


@pytest.mark.parametrize("field, value, words", [
    ("classifier_width", 20_000, "classifier.net.0.weight is stored [256, 320], the preset builds [20000, 320]"),
    ("n_rois", 128, "classifier.net.0.weight is stored [256, 320], the preset builds [256, 640]"),
    ("fpn_channels", 128, "detector.backbone.fpn.inner_blocks.0.0.weight is stored [64, 64, 1, 1], the preset builds "
                          "[128, 64, 1, 1]"),
    ("classifier_width", 0, "preset.classifier_width is 0, outside [1, 65536]"),
    ("image_size", 10**9, "preset.image_size is 1000000000, outside [32, 8192]"),
    ("backbone_blocks", (1, 1, 1, 100_000), "each stage needs 1 to 64 blocks"),
    ("rpn_nms_thresh", math.nan, "preset.rpn_nms_thresh is nan, not finite"),
])
def test_checkpoint_preset_is_bounded_and_compared_with_its_tensors_before_any_model_is_built(
        cls_ckpt, tmp_path, field, value, words):
    """A config whose preset (digests recomputed, as any file from elsewhere may have them) says
    another size than its stored tensors is refused by ``load_checkpoint``, before anything builds
    the model at the preset's sizes (classifier_width 20000 allocated 2.4 GB first)."""
    from tests_helpers import invoke

    ck = load_checkpoint(cls_ckpt)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, kind="classifier", preset=replace(ck.preset, **{field: value}), model=ck.model,
                    preprocess=ck.preprocessing)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert words in str(err.value) and str(bad) in str(err.value), str(err.value)
    res = invoke("export", bad, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_pickled_object_is_refused_without_suggesting_weights_only_false(tmp_path):
    """torch's own message advises retrying with ``weights_only=False``, which would run code from a
    file of unknown origin: ctmask names what the file pickles and never quotes that advice."""
    from tests_helpers import invoke

    bad = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), bad)
    with pytest.raises(CheckpointError, match="not a ctmask checkpoint") as err:
        load_checkpoint(bad)
    text = str(err.value)
    assert str(bad) in text and "torch.nn.modules.linear.Linear" in text
    assert "weights_only" not in text and "can still be loaded" not in text and "\x1b" not in text
    res = invoke("export", bad, "--out", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "not a ctmask checkpoint" in res.output
    assert "weights_only" not in res.output and "Traceback" not in res.output


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


# --- reproducibility --------------------------------------------------------------------


def _weights(path):
    return load_checkpoint(path).model


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_classifier_training_is_deterministic_and_seeded(seg_ckpt, synth_dir, tmp_path):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    val = read_split(synth_dir / "val_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=3, batch_size=4, lr=1e-3, seed=5)
    runs = []
    for name, o in [("a", opts), ("b", opts), ("other-seed", replace(opts, seed=6))]:
        out = tmp_path / f"{name}.pt"
        runs.append(train_classifier(SMALL, seg_ckpt, train, val, out, o, False))
    _assert_same_weights(_weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt"))
    assert runs[0]["history"] == runs[1]["history"]
    other = _weights(tmp_path / "other-seed.pt")
    a = _weights(tmp_path / "a.pt")
    head = [k for k in a if k.startswith("classifier.")]
    assert head and any(not torch.equal(other[k], a[k]) for k in head)
    cfg = load_checkpoint(tmp_path / "a.pt").config
    assert cfg["train"]["seed"] == 5
    assert cfg["environment"]["threads"] == torch.get_num_threads() and cfg["environment"]["torch"]


def test_resumed_classifier_repeats_the_uninterrupted_run(seg_ckpt, synth_dir, tmp_path):
    # Every epoch draws its data order from (seed, epoch): resuming after epoch 1 must give
    # the weights of the run that never stopped (it used to replay epoch 1's order).
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    opts = ClsTrainOptions("heads", epochs=2, batch_size=4, lr=1e-3, seed=2)
    train_classifier(SMALL, seg_ckpt, train, None, tmp_path / "straight.pt", opts, False)
    train_classifier(SMALL, seg_ckpt, train, None, tmp_path / "first.pt", replace(opts, epochs=1), False)
    train_classifier(SMALL, tmp_path / "first.pt", train, None, tmp_path / "resumed.pt", opts, False)
    _assert_same_weights(_weights(tmp_path / "straight.pt"), _weights(tmp_path / "resumed.pt"))
    resumed = load_checkpoint(tmp_path / "resumed.pt")
    assert resumed.config["resumed_from"] == {"checkpoint": str(tmp_path / "first.pt"), "epoch": 1}
    straight = load_checkpoint(tmp_path / "straight.pt")
    assert resumed.config["history"] == straight.config["history"]


def test_heads_bn_training_is_deterministic(seg_ckpt, synth_dir, tmp_path):
    # Gradients reach the detector's BatchNorm parameters through RoIAlign and the heads.
    train = read_split(synth_dir / "train_COVIDx_CT.txt")[:8]
    opts = ClsTrainOptions("heads+bn", epochs=1, batch_size=4, lr=1e-2, seed=1)
    for name in ("a", "b"):
        train_classifier(SMALL, seg_ckpt, train, None, tmp_path / f"{name}.pt", opts, False)
    _assert_same_weights(_weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt"))


def test_deterministic_mode_is_restored_after_training(seg_ckpt, synth_dir, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    train = read_split(synth_dir / "train_COVIDx_CT.txt")[:4]
    train_classifier(SMALL, seg_ckpt, train, None, tmp_path / "c.pt", ClsTrainOptions("heads", 1, 4, 1e-3), False)
    assert not torch.are_deterministic_algorithms_enabled()


# --- resuming: new learning rate / weight decay, nothing left to train ---------------------


def test_resumed_classifier_uses_the_new_lr_and_weight_decay(cls_ckpt, synth_dir, tmp_path):
    saved = load_checkpoint(cls_ckpt)
    assert saved.optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3)
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    out = tmp_path / "resumed.pt"
    opts = ClsTrainOptions("heads", epochs=3, batch_size=4, lr=2.5e-4, weight_decay=0.0)
    train_classifier(SMALL, cls_ckpt, train, None, out, opts, False)
    ck = load_checkpoint(out)
    assert ck.epoch == 3
    for group in ck.optimizer["param_groups"]:
        assert group["lr"] == pytest.approx(2.5e-4) and group["weight_decay"] == 0.0
    assert ck.config["train"]["lr"] == pytest.approx(2.5e-4) and ck.config["train"]["weight_decay"] == 0.0
    # Adam's moments were restored, not restarted: the step count went on from 2 epochs.
    steps = [float(s["step"]) for s in ck.optimizer["state"].values()]
    saved_steps = [float(s["step"]) for s in saved.optimizer["state"].values()]
    assert steps[0] == pytest.approx(saved_steps[0] * 3 / 2)


def test_resumed_segmentation_uses_the_new_lr_and_weight_decay(seg_ckpt, synth_dir, tmp_path):
    samples = list_segmentation(synth_dir / "segmentation" / "train")
    out = tmp_path / "seg2.pt"
    opts = SegTrainOptions(epochs=2, batch_size=4, lr=3e-4, weight_decay=0.0, max_images=4)
    train_segmentation(SMALL, samples, out, opts, resume=seg_ckpt, show_progress=False)
    ck = load_checkpoint(out)
    for group in ck.optimizer["param_groups"]:
        assert group["lr"] == pytest.approx(3e-4) and group["weight_decay"] == 0.0
    assert ck.config["train"]["lr"] == pytest.approx(3e-4)
    assert ck.config["resumed_from"] == {"checkpoint": str(seg_ckpt), "epoch": 1}


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_without_epochs_left_is_a_user_error(cls_ckpt, seg_ckpt, synth_dir, tmp_path, epochs):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    out = tmp_path / "cls.pt"
    with pytest.raises(ConfigError, match=f"already been trained for 2 epochs and --epochs {epochs}") as err:
        train_classifier(SMALL, cls_ckpt, train, None, out, ClsTrainOptions("heads", epochs, 4, 1e-3), False)
    assert err.value.path == cls_ckpt and not out.exists()
    samples = list_segmentation(synth_dir / "segmentation" / "train")
    with pytest.raises(ConfigError, match="already been trained for 1 epochs and --epochs 1") as err:
        train_segmentation(SMALL, samples, out, SegTrainOptions(epochs=1, batch_size=4), seg_ckpt, False)
    assert err.value.path == seg_ckpt and not out.exists()


def test_cli_reports_resume_without_epochs_left_without_traceback(cls_ckpt, synth_dir, tmp_path):
    from typer.testing import CliRunner

    from ctmask.cli.main import app

    args = ["train-cls", str(cls_ckpt), "--train-split", str(synth_dir / "train_COVIDx_CT.txt")]
    args += ["--out", str(tmp_path / "x.pt"), "--variant", "heads", "--epochs", "2", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "already been trained for 2 epochs" in result.output and str(cls_ckpt) in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.pt").exists()


# --- option validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClsTrainOptions("heads", epochs=0),
        lambda: ClsTrainOptions("heads", batch_size=0),
        lambda: ClsTrainOptions("heads", lr=0.0),
        lambda: ClsTrainOptions("heads", weight_decay=-1.0),
        lambda: ClsTrainOptions("heads+everything"),
        lambda: SegTrainOptions(epochs=0),
        lambda: SegTrainOptions(batch_size=-2),
        lambda: SegTrainOptions(max_images=0),
        lambda: SegTrainOptions(lr=float("nan")),
    ],
)
def test_invalid_training_options_are_user_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_evaluation_refuses_batch_size_zero(cls_ckpt, seg_ckpt, synth_dir):
    test = read_split(synth_dir / "test_COVIDx_CT.txt")
    with pytest.raises(ConfigError, match="batch size must be an integer >= 1, got 0"):
        evaluate_classifier(load_checkpoint(cls_ckpt), test, batch_size=0, show_progress=False)
    samples = list_segmentation(synth_dir / "segmentation" / "test")
    with pytest.raises(ConfigError, match="batch size"):
        evaluate_segmentation(load_checkpoint(seg_ckpt), samples, batch_size=0, show_progress=False)


def test_cli_evaluate_batch_size_zero_exits_2(cls_ckpt, synth_dir):
    from typer.testing import CliRunner

    from ctmask.cli.main import app

    split = str(synth_dir / "test_COVIDx_CT.txt")
    result = CliRunner().invoke(app, ["evaluate", str(cls_ckpt), "--split", split, "-b", "0", "-q"])
    assert result.exit_code == 2, result.output
    assert "batch size" in result.output and "Traceback" not in result.output


# --- bounded image cache ---------------------------------------------------------------------


def test_tensor_cache_evicts_least_recently_used_within_its_budget():
    cache = TensorCache(max_bytes=3 * 400)
    for i in range(3):
        cache.put(i, torch.zeros(100))  # 400 bytes each
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(3, torch.zeros(100))
    assert cache.get(1) is None and cache.get(0) is not None and len(cache) == 3 and cache.nbytes == 1200
    cache.put(4, torch.zeros(1000))  # larger than the whole budget: not kept
    assert cache.get(4) is None and cache.nbytes == 1200
    assert len(TensorCache(0)) == 0 and TensorCache(0).get(1) is None


def test_classification_cache_stays_within_its_bound(synth_dir):
    entries = read_split(synth_dir / "train_COVIDx_CT.txt")
    size = SMALL.image_size
    image_bytes = 4 * size * size
    budget = 3 * image_bytes + image_bytes // 2
    data = ClassificationDataset(entries, size, cache_bytes=budget)
    fresh = ClassificationDataset(entries, size, cache_bytes=0)
    assert len(entries) * image_bytes > 2 * budget
    for _ in range(2):
        for i in range(len(data)):
            image, label = data[i]
            assert data.cache.nbytes <= budget and len(data.cache) <= 3
            assert torch.equal(image, fresh[i][0]) and label == entries[i].label
    assert len(fresh.cache) == 0
    # Recently used items are served from the cache.
    assert data[len(data) - 1][0] is data[len(data) - 1][0]


def test_classifier_evaluation_keeps_no_decoded_images(cls_ckpt, synth_dir, monkeypatch):
    import ctmask.training.evaluate as ev

    made = []

    class Recording(ClassificationDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ev, "ClassificationDataset", Recording)
    test = read_split(synth_dir / "test_COVIDx_CT.txt")
    evaluate_classifier(load_checkpoint(cls_ckpt), test, batch_size=4, show_progress=False)
    assert len(made) == 1 and made[0].cache.max_bytes == 0 and len(made[0].cache) == 0


def test_perturbation_hooks_move_the_detector_and_come_off():
    from ctmask.training.perturb import perturbed

    model = CovidCTMaskNet(SMALL).eval()
    x = torch.rand(2, 1, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model.ranker(x)
        with perturbed(model.ranker, 1e-2, torch.Generator().manual_seed(1)):
            noisy = model.ranker(x)
        again = model.ranker(x)
    assert not torch.equal(clean, noisy)
    assert torch.equal(clean, again)  # the hooks are gone
    assert not any(m._forward_hooks for m in model.modules())


def test_training_on_perturbed_copies_with_consistency(seg_ckpt, synth_dir, tmp_path):
    train = read_split(synth_dir / "train_COVIDx_CT.txt")
    out = tmp_path / "robust.pt"
    opts = ClsTrainOptions("heads", epochs=1, batch_size=4, lr=1e-3, seed=1, perturb=(1e-3, 1e-2), consistency=0.5)
    summary = train_classifier(SMALL, seg_ckpt, train, None, out, opts, False)
    assert math.isfinite(summary["history"][-1]["loss"])
    cfg = load_checkpoint(out).config
    assert cfg["train"]["perturb"] == [1e-3, 1e-2] and cfg["train"]["consistency"] == 0.5
    bn = tmp_path / "robust-bn.pt"
    opts = ClsTrainOptions("heads+bn", epochs=1, batch_size=4, lr=1e-3, seed=1, perturb=(1e-3,))
    assert math.isfinite(train_classifier(SMALL, out, train[:8], None, bn, opts, False)["history"][-1]["loss"])


@pytest.mark.parametrize("kwargs, message", [
    ({"perturb": (0.5,)}, "perturbation scale"),
    ({"perturb": (0.0,)}, "perturbation scale"),
    ({"consistency": 1.0}, "needs RoI copies"),
    ({"perturb": (1e-3,), "consistency": -1.0}, "consistency weight"),
])
def test_perturbation_options_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClsTrainOptions("heads", **kwargs)
