"""`import-reference`: the authors' checkpoint files, built here in their format from ctmask models.

The real files cannot be downloaded here. These are written as the reference's scripts write
theirs: ``torch.save`` in the legacy (non-zip) format of a dict with ``model_weights`` in
torchvision 0.3 names (renamed below by rules written from the reference code, independently of
ctmask's own mapping), S as ``s2new``, and ``anchor_generator`` a pickled object of a class that
lives in a module called ``models.mask_net.rpn`` (``rpn_segmentation`` for segmentation), like the
reference's; that throwaway module is gone from ``sys.modules`` before the import reads the file.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from ctmask.core.errors import CheckpointError
from ctmask.core.presets import PAPER, PAPER_MERGE, PRESETS, RESNET18_T1, Preset
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.model import CovidCTMaskNet, load_weights
from ctmask.training.reference_import import ImportOptions, import_reference, read_reference

_S = {"0": "fc_scores", "2": "fc_scores_2", "4": "fc_scores_img"}


def authors_key(key: str) -> str:
    """ctmask's key -> torchvision 0.3's / the reference's (``S2Predictor`` as ``s2new``)."""
    key = re.sub(r"^detector\.", "", key)
    key = re.sub(r"^classifier\.net\.(\d)\.", lambda m: f"s2new.{_S[m.group(1)]}.", key)
    key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    return re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.",
                  key)


def _anchor_module(name: str) -> type:
    """A module registered as ``name`` holding an nn.Module ``AnchorGenerator`` shaped like the reference's."""

    class AnchorGenerator(torch.nn.Module):
        def __init__(self, sizes, aspect_ratios):
            super().__init__()
            self.sizes, self.aspect_ratios = sizes, aspect_ratios
            self.cell_anchors = [torch.tensor([[-1.0, -1.0, 1.0, 1.0]])]  # set after a forward, as in use
            self._cache = {(torch.Size([32, 32]), (16.0, 16.0)): [torch.zeros(3, 4)]}

    mod = types.ModuleType(name)
    AnchorGenerator.__module__ = name
    AnchorGenerator.__qualname__ = "AnchorGenerator"
    mod.AnchorGenerator = AnchorGenerator  # type: ignore[attr-defined]
    return AnchorGenerator


def write_authors_file(path: Path, model: CovidCTMaskNet, kind: str, extra: dict | None = None) -> None:
    """``model`` as the reference's ``train_segmentation.py`` / ``train_classifier.py`` save it."""
    state = model.state_dict_for_checkpoint()
    if kind == "segmentation":
        state = {k: v for k, v in state.items() if k.startswith("detector.")}
    else:  # the reference's classifier is a Faster R-CNN: no mask branch
        state = {k: v for k, v in state.items() if ".roi_heads.mask_" not in k}
    weights = {authors_key(k): v.clone() for k, v in state.items()}
    name = "models.mask_net." + ("rpn_segmentation" if kind == "segmentation" else "rpn")
    cls = _anchor_module(name)
    saved = {m: sys.modules.get(m) for m in ("models", "models.mask_net", name)}
    sys.modules.update({"models": types.ModuleType("models"), "models.mask_net": types.ModuleType("models.mask_net"),
                        name: sys.modules.get(name) or types.ModuleType(name)})
    sys.modules[name].AnchorGenerator = cls  # type: ignore[attr-defined]
    try:
        anchors = cls(tuple([(2, 4, 8, 16, 32)] * 5), tuple([(0.1, 0.25, 0.5, 1, 1.5, 2)] * 5))
        blob = {"epoch": "100", "model_name": None, "model_weights": weights, "lrate": 1e-5,
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                "anchor_generator": anchors, **(extra or {})}
        with warnings.catch_warnings():  # "Couldn't retrieve source code" of this throwaway class
            warnings.simplefilter("ignore", UserWarning)
            torch.save(blob, path, _use_new_zipfile_serialization=False)
    finally:
        for m, v in saved.items():  # the import must not find the authors' module
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v


def _model(preset: Preset, seed: int) -> CovidCTMaskNet:
    torch.manual_seed(seed)
    model = CovidCTMaskNet(preset).eval()
    # Random BN statistics, so a statistic lost or swapped in the import would show.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


CASES = [(PAPER, "segmentation", None), (PAPER_MERGE, "classifier", "merge"),
         (RESNET18_T1, "segmentation", "merge"), (dataclasses.replace(RESNET18_T1, mask_type="both",
                                                                      num_lesion_classes=3), "classifier", None)]


@pytest.mark.parametrize(("preset", "kind", "mask_type"), CASES, ids=["paper-seg-both", "paper-cls-merge",
                                                                      "r18t1-seg-merge", "r18t1-cls-both"])
def test_imported_model_equals_source(tmp_path, preset, kind, mask_type):
    source = _model(preset, seed=len(preset.name))
    src = tmp_path / "authors.pth"
    write_authors_file(src, source, kind)
    assert src.read_bytes()[:2] != b"PK"  # the legacy format, as torch 1.1 wrote it
    assert "models.mask_net.rpn" not in sys.modules
    summary = import_reference(src, tmp_path / "ctmask.pt", ImportOptions(mask_type=mask_type))
    ck = load_checkpoint(tmp_path / "ctmask.pt", kind=kind)
    assert ck.verified and summary["kind"] == kind
    assert ck.config["import_reference"]["source_sha256"] == summary["source_sha256"]
    expected = dataclasses.replace(preset, name=ck.preset.name)
    assert ck.preset == expected
    # A preset of the named ones is recognised by name; any other gets a name spelling it out.
    assert ck.preset.name == (preset.name if preset in PRESETS.values() else "resnet18-t1-both-n128-s512")
    imported = CovidCTMaskNet(ck.preset).eval()
    if kind == "segmentation":
        imported.detector.load_state_dict(ck.model)
        imported.classifier = source.classifier  # the classifier is trained later
    else:
        load_weights(imported, ck.model, ck.path)
    for (k, a), b in zip(source.detector.state_dict().items(), imported.detector.state_dict().values()):
        if kind == "segmentation" or ".mask_" not in k:
            assert torch.equal(a, b), k
        else:  # not in a classifier file: zeros, as the import records
            assert not b.any(), k
    # Same outputs, exactly: at the model's 512 x 512 for the lightweight classifier, on a small
    # input otherwise (the same weights and architecture; the paper model costs seconds at 512).
    size = 512 if preset.name == "resnet18-t1" and kind == "classifier" else 96
    small = dataclasses.replace(ck.preset, image_size=size)
    a_model, b_model = CovidCTMaskNet(small, source.detector).eval(), CovidCTMaskNet(small, imported.detector).eval()
    a_model.classifier, b_model.classifier = source.classifier, imported.classifier
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ra, la), (rb, lb) = a_model(x), b_model(x)
    assert (ra[..., 0] > 0).any()
    assert torch.equal(ra, rb) and torch.equal(la, lb)


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A resnet18-t1 segmentation file in the authors' format, and its source model."""
    folder = tmp_path_factory.mktemp("authors")
    model = _model(RESNET18_T1, seed=1)
    write_authors_file(folder / "lightweight_segmentation_model_resnet18_t1.pth", model, "segmentation")
    return folder / "lightweight_segmentation_model_resnet18_t1.pth", model


def _altered(r18_file, tmp_path, change) -> Path:
    blob = read_reference(r18_file[0])
    change(blob["model_weights"])
    blob["anchor_generator"] = None
    path = tmp_path / "altered.pth"
    torch.save(blob, path, _use_new_zipfile_serialization=False)
    return path


class _Payload:
    """Unpickling it calls ``exec``, which would write the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_code_running_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model_weights": {}, "anchor_generator": _Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"refused: the file pickles (builtins\.)?exec,") as exc:
        import_reference(path, tmp_path / "out.pt")
    assert str(path) in str(exc.value)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    torch.load(path, weights_only=False)  # what the payload does when unpickled by a plain load
    assert marker.read_text() == "ran"


def test_refusals_name_the_problem(tmp_path, r18_file):
    src = r18_file[0]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read the file: damaged, truncated"):
        import_reference(truncated, tmp_path / "a.pt", ImportOptions(mask_type="merge"))

    def drop(w):
        del w["rpn.head.bbox_pred.bias"]

    def widen(w):
        w["roi_heads.box_head.fc7.weight"] = torch.zeros(128, 129)

    def extra(w):
        w["roi_heads.box_head.fc8.weight"] = torch.zeros(1)

    for change, message in ((drop, r"missing keys: detector\.rpn\.head\.bbox_pred\.bias"),
                            (widen, r"shape mismatches: detector\.roi_heads\.box_head\.fc7\.weight is \[128, 129\]"),
                            (extra, r"unknown keys: roi_heads\.box_head\.fc8\.weight")):
        with pytest.raises(CheckpointError, match=message):
            import_reference(_altered(r18_file, tmp_path, change), tmp_path / "b.pt", ImportOptions(mask_type="merge"))
    with pytest.raises(CheckpointError, match="give --mask-type ggo or --mask-type merge"):
        import_reference(src, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="--backbone resnet34 contradicts the file"):
        import_reference(src, tmp_path / "c.pt", ImportOptions(backbone="resnet34", mask_type="merge"))
    assert not list(tmp_path.glob("*.pt"))


def test_cli_imports_a_segmentation_file_for_train_cls(tmp_path, r18_file):
    from typer.testing import CliRunner

    from ctmask.cli.main import app
    from ctmask.training.train_cls import init_model

    out = tmp_path / "seg.pt"
    res = CliRunner().invoke(app, ["import-reference", str(r18_file[0]), "--out", str(out), "--mask-type", "merge"])
    assert res.exit_code == 0, res.output
    assert "preset 'resnet18-t1'" in res.output and "n_rois 128 (default of resnet18-t1)" in res.output
    start = init_model(RESNET18_T1, out, "heads+bn")  # what `train-cls --preset resnet18-t1` starts from
    assert torch.equal(start.model.detector.roi_heads.mask_head[0][0].weight,
                       r18_file[1].detector.roi_heads.mask_head[0][0].weight)
    res = CliRunner().invoke(app, ["import-reference", str(r18_file[0]), "--out", str(out)])
    assert res.exit_code != 0 and "--mask-type" in res.output and "Traceback" not in res.output
