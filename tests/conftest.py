"""Shared fixtures: tiny synthetic data sets and trained-for-one-step checkpoints.

``make test`` runs the suite on pytest-xdist workers (one process per core). Each worker has
its own session, so the session fixtures that train or export a model are made once per run
by whichever worker asks first and shared with the others (:func:`shared`), never twice.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# Two cores on CI: keep torch from oversubscribing them (a core per worker under xdist).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))


def shared(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per test run: under xdist the workers
    share it (the first one to get the lock makes it, the others wait and reuse it); a folder
    left half-made by a worker that failed is made again. Each name belongs to one fixture: the
    fixture that made it is recorded, and another fixture asking for the same name fails."""
    maker = f"{make.__module__}.{make.__qualname__}"
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    root = base / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            assert done.read_text() == maker, f"shared folder {name!r} made by {done.read_text()}, asked by {maker}"
        else:
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            make(folder)
            done.write_text(maker)
    return folder


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A 24-slice synthetic benchmark (train/val/test, all three classes)."""
    from ctmask.data.synth import synthesize

    return shared(tmp_path_factory, "synth", lambda out: synthesize(out, 24, seed=3, workers=1))


@pytest.fixture(scope="session")
def seg_ckpt(synth_dir, tmp_path_factory):
    """A small-preset segmentation checkpoint trained for one short epoch."""
    from ctmask.core.presets import SMALL
    from ctmask.data.cncb import list_segmentation
    from ctmask.training.train_seg import SegTrainOptions, train_segmentation

    def make(folder: Path) -> None:
        samples = list_segmentation(synth_dir / "segmentation" / "train")
        train_segmentation(SMALL, samples, folder / "seg.pt",
                           SegTrainOptions(epochs=1, batch_size=4, lr=1e-3, max_images=8), None, False)

    return shared(tmp_path_factory, "seg", make) / "seg.pt"


@pytest.fixture(scope="session")
def cls_ckpt(synth_dir, seg_ckpt, tmp_path_factory):
    """A small-preset classifier checkpoint with the paper's S (heads variant, two epochs).

    The paper's S is the head the parity, precision and runtime tests were written around (its
    position-reading is what they exercise); tests/test_heads.py covers the pooled head."""
    from ctmask.core.presets import SMALL
    from ctmask.data.covidx import read_split
    from ctmask.training.train_cls import ClsTrainOptions, train_classifier

    def make(folder: Path) -> None:
        train = read_split(synth_dir / "train_COVIDx_CT.txt")
        val = read_split(synth_dir / "val_COVIDx_CT.txt")
        opts = ClsTrainOptions("heads", epochs=2, batch_size=4, lr=1e-3, head="paper")
        train_classifier(SMALL, seg_ckpt, train, val, folder / "cls.pt", opts, False)

    return shared(tmp_path_factory, "cls", make) / "cls.pt"


@pytest.fixture(scope="session")
def small_onnx(cls_ckpt, tmp_path_factory):
    """The classifier checkpoint exported to ONNX with ``ctmask export``'s function."""
    from ctmask.exporter.onnx_export import export_onnx

    return shared(tmp_path_factory, "onnx", lambda folder: export_onnx(cls_ckpt, folder / "small.onnx")) / "small.onnx"


@pytest.fixture(scope="session")
def paper_graph(tmp_path_factory):
    """Untrained paper-preset weights (seed 0) as a checkpoint and its exported full-size graph,
    ``(model, checkpoint, graph)``: made once for the tests that need the paper's shapes."""
    from ctmask.core.presets import PAPER
    from ctmask.exporter.onnx_export import export_onnx
    from ctmask.training.checkpoint import save_checkpoint
    from ctmask.training.model import CovidCTMaskNet

    torch.manual_seed(0)
    model = CovidCTMaskNet(PAPER).eval()

    def make(folder: Path) -> None:
        save_checkpoint(folder / "paper.pt", kind="classifier", preset=PAPER, model=model.state_dict_for_checkpoint())
        export_onnx(folder / "paper.pt", folder / "paper.onnx")

    folder = shared(tmp_path_factory, "paper", make)
    return model, folder / "paper.pt", folder / "paper.onnx"


@pytest.fixture(scope="session")
def light_graph(tmp_path_factory):
    """Untrained ``resnet18-t1`` weights (seed 0: the reference's lightweight ResNet18 model, one FPN
    level) written as the authors' classifier file, imported by ``import-reference`` and exported
    to its 512 x 512 graph, ``(model, checkpoint, graph)``."""
    from authors_format import write_authors_file

    from ctmask.core.presets import RESNET18_T1
    from ctmask.exporter.onnx_export import export_onnx
    from ctmask.training.model import CovidCTMaskNet
    from ctmask.training.reference_import import ImportOptions, import_reference

    torch.manual_seed(0)
    model = CovidCTMaskNet(RESNET18_T1).eval()

    def make(folder: Path) -> None:
        write_authors_file(folder / "lightweight_classifier_resnet18_t1.pth", model, "classifier")
        import_reference(folder / "lightweight_classifier_resnet18_t1.pth", folder / "r18.pt",
                         ImportOptions(mask_type="merge"))
        export_onnx(folder / "r18.pt", folder / "r18.onnx")

    folder = shared(tmp_path_factory, "resnet18-t1", make)
    return model, folder / "r18.pt", folder / "r18.onnx"


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


# Modules that start a Ray cluster and servers of their own, kept on one xdist worker (one after
# another): two clusters at once on two cores slow each other past their start deadlines.
RAY_MODULES = {"test_ray.py", "test_serve.py", "test_exposure.py"}


def pytest_collection_modifyitems(config, items):
    """Under xdist (``--dist loadgroup``) each test module runs on one worker, so its module and
    session fixtures are made once (the Ray modules share one worker). Tests marked
    ``tensorrt`` / ``gpu`` skip, with the reason, where TensorRT or a GPU is missing."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_MODULES else name))
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
