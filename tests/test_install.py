"""`pip install ctmask` is the torch-free runtime; training and export come with the `train` extra.

The wheel's metadata must not require torch & co unconditionally, the runtime commands must
work where they are not installed, and the commands that need them must say which extra to
install (exit 2, no traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tests_helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ONLY = {"torch", "torchvision", "onnxscript", "safetensors", "onnxconverter-common"}
BLOCKED = ("torch", "torchvision", "onnxscript", "safetensors", "onnxconverter_common")

# Imported first by every Python started with this folder on PYTHONPATH: importing a blocked
# package raises as it does where the package is not installed.
SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory) -> list[Requirement]:
    """Requires-Dist of a wheel built from the sources (a copy: no build/ in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ctmask", src / "ctmask", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    (whl,) = (tmp / "dist").glob("ctmask-*.whl")
    with zipfile.ZipFile(whl) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def resolve(reqs: list[Requirement], extras: set[str]) -> set[str]:
    """Distributions `pip install ctmask[extras]` asks for directly (self-references followed)."""
    wanted, done, names = set(extras), set(), set()
    while wanted - done:
        extra = (wanted - done).pop()
        done.add(extra)
        for r in reqs:
            if r.marker is None or r.marker.evaluate({"extra": extra}):
                if canonicalize_name(r.name) == "ctmask":
                    wanted |= r.extras
                else:
                    names.add(canonicalize_name(r.name))
    for r in reqs:  # the base dependencies (no marker)
        if r.marker is None:
            names.add(canonicalize_name(r.name))
    return names


def test_wheel_requires_torch_only_with_the_train_extra(wheel_metadata):
    unconditional = {canonicalize_name(r.name) for r in wheel_metadata if r.marker is None}
    assert unconditional == {"numpy", "pillow", "scipy", "typer", "rich", "pydicom", "nibabel", "onnx", "onnxruntime"}
    for r in wheel_metadata:
        if canonicalize_name(r.name) in TRAIN_ONLY:
            assert str(r.marker) == 'extra == "train"', r
    assert not resolve(wheel_metadata, set()) & TRAIN_ONLY
    assert TRAIN_ONLY <= resolve(wheel_metadata, {"train"})
    dev = resolve(wheel_metadata, {"dev"})
    assert TRAIN_ONLY | {"pytest", "polygraphy", "ruff", "mypy", "openvino"} <= dev
    assert "tensorrt" not in dev and "tensorrt-stubs" not in dev  # stubs: the Makefile, --no-deps
    assert "tensorrt" in resolve(wheel_metadata, {"trt"}) and "onnxruntime-gpu" in resolve(wheel_metadata, {"gpu"})
    # The pins this project is verified with stay accepted.
    pins = {canonicalize_name(r.name): r.specifier for r in wheel_metadata}
    assert "2.14.1" in pins["torch"] and "0.29.1" in pins["torchvision"]


def test_a_missing_extra_is_named_and_anything_else_keeps_its_traceback(capsys):
    import typer

    from ctmask.cli.common import missing_extra, user_errors

    def raising(name: str | None):
        @user_errors
        def train_seg():
            raise ModuleNotFoundError("No module named ...", name=name)

        return train_seg

    with pytest.raises(typer.Exit) as exit_info:
        raising("tensorrt")()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == ("error: `ctmask train-seg` needs TensorRT (tensorrt is not installed): "
                                       "pip install 'ctmask[trt]'\n")
    msg = missing_extra(ModuleNotFoundError(name="onnxconverter_common"), "export")
    assert msg == ("`ctmask export` needs onnxconverter-common (onnxconverter_common is not installed): "
                   "pip install 'ctmask[train]'")
    # Not an extra's package, or a submodule of an installed one (torch._C: a broken install): a bug.
    for name in ("yaml", "ctmask.nothing_here", "torch._C", None):
        with pytest.raises(ModuleNotFoundError):
            raising(name)()


@pytest.fixture(scope="module")
def no_train_extra(tmp_path_factory):
    """Environment of a Python in which torch & co cannot be imported, as without ctmask[train]."""
    site = tmp_path_factory.mktemp("no_train_extra")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**os.environ, "PYTHONPATH": path, "NO_COLOR": "1", "COLUMNS": "200"}


def ctmask(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ctmask", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_the_blocker_blocks(no_train_extra):
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                          env=no_train_extra)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in proc.stderr


@pytest.mark.slow
def test_runtime_commands_work_without_the_train_extra(no_train_extra, small_onnx, synth_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((synth_dir / "images").glob("test_*.png"))[:4]:
        shutil.copy(f, images / f.name)

    proc = ctmask(no_train_extra, "--help")
    assert proc.returncode == 0 and "infer" in proc.stdout and "export" in proc.stdout, proc.stderr

    proc = ctmask(no_train_extra, "infer", small_onnx, images, "--out", tmp_path / "preds.jsonl", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = invoke("infer", small_onnx, images, "--out", tmp_path / "in_process.jsonl", "-q")
    assert res.exit_code == 0, res.output
    got, want = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                 for name in ("preds.jsonl", "in_process.jsonl"))
    assert len(got) == 4 and [(r["file"], r["class"]) for r in got] == [(r["file"], r["class"]) for r in want]
    for g, w in zip(got, want):
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)

    bench = ("bench", small_onnx, "-b", "1", "--warmup", "0", "--iterations", "1", "--images", images, "-q")
    proc = ctmask(no_train_extra, *bench)  # every available backend: the torch ones are left out, with the reason
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not benchmarked: torch-cpu: torch is not installed (pip install 'ctmask[train]')" in proc.stderr
    assert "onnxruntime-cpu" in proc.stdout
    proc = ctmask(no_train_extra, *bench, "--backend", "torch-cpu")  # asked for: refused
    assert proc.returncode == 2 and "pip install 'ctmask[train]'" in proc.stderr, proc.stdout + proc.stderr

    proc = ctmask(no_train_extra, "calibrate", small_onnx, "--images", images, "--out", tmp_path / "r.json",
                  "--size", "2", "-b", "2", "-q")
    assert proc.returncode == 0 and (tmp_path / "r.json").exists(), proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_and_export_name_the_train_extra(no_train_extra, cls_ckpt, synth_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    runs = {
        "export": ("export", cls_ckpt, "--out", out / "x.onnx"),
        "train-seg": ("train-seg", synth_dir / "segmentation" / "train", "--out", out / "seg.pt", "--epochs", "1"),
        "infer": ("infer", cls_ckpt, synth_dir / "images", "--out", out / "p.jsonl", "-q"),
    }
    for command, args in runs.items():
        proc = ctmask(no_train_extra, *args)
        assert proc.returncode == 2, (command, proc.stdout + proc.stderr)
        assert (f"error: `ctmask {command}` needs PyTorch (torch is not installed): pip install 'ctmask[train]'"
                in proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []
