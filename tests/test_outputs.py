"""No command writes over an input: every output path is checked against every input and the
other outputs (symlinks, links, relative spellings, the same file twice) before any work, and
outputs inside an input folder are never read back as inputs (issue 19)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import invoke

from ctmask.core.outputs import HINT

GUARD = HINT[:40]  # the hint every refusal of an output path carries


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- the issue's examples, with real models


@pytest.fixture()
def work(tmp_path, small_onnx, cls_ckpt, seg_ckpt):
    """Copies of the models (a failing check must not destroy the session's) and a folder of slices."""
    for src, name in ((small_onnx, "m.onnx"), (cls_ckpt, "c.pt"), (seg_ckpt, "s.pt")):
        shutil.copy(src, tmp_path / name)
    for k in range(3):
        png(tmp_path / "scans" / f"a{k}.png", k)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (symlinks not followed): its bytes' hash, its link, or 'dir'."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            out[str(p.relative_to(root))] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                                              else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("case", [
    "infer MODEL SCANS --json MODEL",
    "infer MODEL SCANS/a0.png --json SCANS/a0.png",
    "infer MODEL SCANS --json SCANS/a1.png",
    "infer MODEL SCANS --out W/p.jsonl --json W/p.jsonl",
    "infer MODEL SCANS --out W/p.jsonl --studies W/./p.jsonl",
    "infer MODEL SCANS --overlays SCANS",
    "infer MODEL SCANS --overlays W/o --report W/o/r.html",
    "evaluate CKPT --split W/x.txt --json CKPT",
    "export CKPT --out CKPT",
    "export CKPT --out W/g.onnx --precision fp16 --calibration SCANS --json W/g.precision.json",
    "train-cls SEG --train-split W/x.txt --out SEG",
    "train-seg SCANS --out W/s.pt --json W/s.pt.json",
    "calibrate MODEL --images SCANS --out MODEL",
    "parity CKPT MODEL --images SCANS --polygraphy SCANS",
    "check-trt MODEL --json MODEL",
])
def test_the_issues_outputs_over_inputs_exit_2_and_touch_nothing(work, case):
    args = [a.replace("MODEL", str(work / "m.onnx")).replace("CKPT", str(work / "c.pt"))
            .replace("SEG", str(work / "s.pt")).replace("SCANS", str(work / "scans")).replace("W/", f"{work}/")
            for a in case.split()]
    before = snapshot(work)
    r = invoke(*args)
    assert r.exit_code == 2 and GUARD in r.output and "Traceback" not in r.output, r.output
    assert snapshot(work) == before


def test_outputs_inside_an_input_folder_are_never_read_back(work):
    """Overlays and the predictions file inside the scanned folder: the second run (--resume)
    predicts nothing new and no overlay becomes a slice."""
    scans = work / "scans"
    out, overlays = scans / "p.jsonl", scans / "overlays"
    r = invoke("infer", work / "m.onnx", scans, "--out", out, "--overlays", overlays, "-q")
    assert r.exit_code == 0, r.output
    assert len(list(overlays.glob("*.png"))) == 3
    r = invoke("infer", work / "m.onnx", scans, "--out", out, "--overlays", overlays, "--resume",
               "--json", work / "s.json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((work / "s.json").read_text())
    assert summary["resumed"] == 3 and summary["predicted"] == 0 and not summary["skipped"]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and not any("overlays" in Path(rec["file"]).parts for rec in recs)


# ---------------------------------------------------------------- a fuzz over every command


@dataclass
class Command:
    argv: list[str]  # with {placeholders} for the outputs the fuzz may set
    files: list[str]  # output file options
    folders: list[str] = field(default_factory=list)  # output folder options
    targets: list[str] = field(default_factory=list)  # inputs (relative to the tree) an output may alias
    required: dict[str, str] = field(default_factory=dict)  # output options the command needs: a fresh default


SLICE = "scans/a.png"  # inside the input folder scans: an input too
COMMANDS = {
    "infer": Command(["infer", "model.onnx", "scans", "data/images/x.png", "--boxes", "data/split.txt"],
                     ["--out", "--studies", "--report", "--json"], ["--overlays"],
                     ["model.onnx", "scans", SLICE, "data/images/x.png", "data/split.txt"]),
    "evaluate": Command(["evaluate", "ckpt.pt", "--split", "data/split.txt"], ["--json"], ["--roi-cache"],
                        ["ckpt.pt", "data/split.txt", "data/images/x.png"]),
    "export": Command(["export", "ckpt.pt"], ["--out", "--json"], ["--triton-repo"], ["ckpt.pt"],
                      {"--out": "work/g.onnx"}),
    "train-cls": Command(["train-cls", "seg.pt", "--train-split", "data/split.txt"], ["--out", "--json"],
                         ["--roi-cache"],
                         ["seg.pt", "data/split.txt", "data/images/x.png"], {"--out": "work/c.pt"}),
    "train-seg": Command(["train-seg", "cncb"], ["--out", "--json"], [], ["cncb", "cncb/masks/c.png"],
                         {"--out": "work/s.pt"}),
    "calibrate": Command(["calibrate", "model.onnx", "--images", "scans"], ["--out", "--json"], [],
                         ["model.onnx", "scans", SLICE], {"--out": "work/r.json"}),
    "precision-report": Command(["precision-report", "ckpt.pt", "--images", "data/split.txt"], ["--out", "--json"],
                                [], ["ckpt.pt", "data/split.txt", "data/images/x.png"]),
    "parity": Command(["parity", "ckpt.pt", "model.onnx", "--images", "scans"], ["--json"], ["--polygraphy"],
                      ["ckpt.pt", "model.onnx", "scans", SLICE]),
    "bench": Command(["bench", "model.onnx", "--images", "scans"], ["--json"], [], ["model.onnx", "scans", SLICE]),
    "bench-serve": Command(["bench-serve", "model.onnx", "--images", "scans"], ["--json"], [],
                           ["model.onnx", "scans", SLICE]),
    "check-trt": Command(["check-trt", "model.onnx"], ["--json"], [], ["model.onnx"]),
    "check-triton": Command(["check-triton", "repo"], ["--json"], [], ["repo", "repo/m/config.pbtxt"]),
    "synth": Command(["synth", "{OUT}", "--slices", "3"], ["--json"], ["OUT"], [], {"OUT": "work/synth"}),
}
SPELLINGS = ("absolute", "relative", "dotdot", "symlink", "dir-symlink", "hardlink")


def build_tree(root: Path) -> None:
    """Inputs of every command (junk bytes where only the path matters: the check comes first)."""
    for name in ("model.onnx", "ckpt.pt", "seg.pt"):
        (root / name).write_bytes(b"\x08\x07 not a model")
    png(root / SLICE)
    png(root / "data/images/x.png", 1)
    (root / "data/split.txt").write_text("x.png 0 0 0 48 48\n")
    png(root / "cncb/images/c.png", 2)
    png(root / "cncb/masks/c.png", 3)
    (root / "repo/m").mkdir(parents=True)
    (root / "repo/m/config.pbtxt").write_text('name: "m"\n')
    (root / "work").mkdir()


def spell(root: Path, rel: str, how: str, n: int) -> str:
    """``root / rel`` written another way (the link made in ``root / links``)."""
    target = root / rel
    links = root / "links"
    links.mkdir(exist_ok=True)
    if how == "relative":  # the commands run in root / work
        return os.path.relpath(target, root / "work")
    if how == "dotdot":
        return str(root / "work" / ".." / rel)
    if how == "symlink":
        (links / f"l{n}").symlink_to(target)
        return str(links / f"l{n}")
    if how == "dir-symlink":
        (links / f"d{n}").symlink_to(target.parent, target_is_directory=True)
        return str(links / f"d{n}" / target.name)
    if how == "hardlink" and target.is_file():
        os.link(target, links / f"h{n}")
        return str(links / f"h{n}")
    return str(target)


def test_fuzz_no_command_writes_over_an_input(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @st.composite
    def collisions(draw):
        name = draw(st.sampled_from(sorted(COMMANDS)))
        c = COMMANDS[name]
        options = c.files + c.folders
        if c.targets and (len(options) < 2 or draw(st.booleans())):
            option = draw(st.sampled_from(options))
            return name, [(option, draw(st.sampled_from(c.targets)), draw(st.sampled_from(SPELLINGS)))]
        a, b = draw(st.lists(st.sampled_from(options), min_size=2, max_size=2, unique=True))
        fresh = draw(st.sampled_from(["work/new/x.json", "work/x.onnx"]))  # not there yet: one file named twice
        return name, [(a, fresh, draw(st.sampled_from(SPELLINGS))), (b, fresh, draw(st.sampled_from(SPELLINGS)))]

    here = os.getcwd()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(collisions())
    def run(case):
        name, chosen = case
        root = tmp_path_factory.mktemp("fuzz")
        build_tree(root)
        c = COMMANDS[name]
        given_paths = {opt: spell(root, rel, how, n) for n, (opt, rel, how) in enumerate(chosen)}
        outputs = {**{k: str(root / v) for k, v in c.required.items()}, **given_paths}
        argv = [a.replace("{OUT}", outputs.pop("OUT", "")) if "{OUT}" in a else a for a in c.argv]
        argv = [a if a.startswith("-") or a == name or not (root / a).exists() else str(root / a) for a in argv]
        for opt, value in outputs.items():
            argv += [opt, value]
        before = snapshot(root)
        os.chdir(root / "work")
        try:
            r = invoke(*argv)
        finally:
            os.chdir(here)
        assert r.exit_code == 2 and GUARD in r.output and "Traceback" not in r.output, (argv, r.output)
        assert snapshot(root) == before, argv  # nothing written, nothing overwritten
        shutil.rmtree(root)

    run()
