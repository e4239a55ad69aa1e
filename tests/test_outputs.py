"""No command writes over an input: every output path is checked against every input and the
other outputs (symlinks, links, relative spellings, the same file twice) before any work, and
outputs inside an input folder are never read back as inputs (issue 19)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import invoke

from ctmask.core.errors import OUTPUT_PATH_HINT as HINT

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
    (tmp_path / "c.pt.json").write_text('{"a checkpoint sidecar": true}\n')
    (tmp_path / "m.engine").write_bytes(b"not an engine")
    (tmp_path / "m.engine.json").write_text('{"an engine sidecar": true}\n')
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
    "export CKPT --out CKPT.json",  # an input's sidecar is an input
    "evaluate CKPT --split W/x.txt --json CKPT.json",
    "infer W/m.engine SCANS --json W/m.engine.json",
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


def test_an_output_reached_through_a_symlink_in_an_input_folder_is_an_input(work):
    """The listing of sl_in reads data/x.png through sl_in/link.png: --json data/x.png is over an input."""
    data = png(work / "data" / "x.png", 7)
    (work / "sl_in").mkdir()
    (work / "sl_in" / "link.png").symlink_to(Path("..") / "data" / "x.png")
    png(work / "sl_in" / "y.png", 8)
    before = snapshot(work)
    r = invoke("infer", work / "m.onnx", work / "sl_in", "--json", data)
    assert r.exit_code == 2 and GUARD in r.output and "link.png" in r.output and "Traceback" not in r.output, r.output
    assert snapshot(work) == before


def special_file(path: Path, kind: str) -> int:
    """A named pipe or a character device (/dev/null's numbers) at ``path``: its file type."""
    if kind == "fifo":
        os.mkfifo(path)
        return stat.S_IFIFO
    try:
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return stat.S_IFCHR


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_a_device_or_a_named_pipe_exits_2_and_stays_one(work, kind):
    node = work / "node"
    mode = special_file(node, kind)
    for option in ("--json", "--out", "--studies", "--report", "--overlays"):
        r = invoke("infer", work / "m.onnx", work / "scans", option, node, "-q")
        assert r.exit_code == 2 and GUARD in r.output and "Traceback" not in r.output, (option, r.output)
        assert ("named pipe" if kind == "fifo" else "character device") in r.output, r.output
        assert stat.S_IFMT(os.lstat(node).st_mode) == mode
    assert sorted(p.name for p in work.iterdir() if "node" in p.name) == ["node"]


@pytest.mark.parametrize("what", ["symlink", "fifo", "hardlink", "foreign"])
def test_the_lock_file_is_never_written_through_and_no_other_file_is_touched(work, what):
    """A symlink, a named pipe, a hard link or someone's file at <out>.lock: exit 2, all left as it was."""
    victim = work / "victim.txt"
    victim.write_text("precious\n")
    out, lock = work / "lk.jsonl", work / "lk.jsonl.lock"
    if what == "symlink":
        lock.symlink_to("victim.txt")
    elif what == "fifo":
        os.mkfifo(lock)
    elif what == "hardlink":
        os.link(victim, lock)
    else:
        lock.write_text("my notes, not a lock\n")
    kind = stat.S_IFMT(os.lstat(lock).st_mode)
    r = invoke("infer", work / "m.onnx", work / "scans", "--out", out, "-q")
    assert r.exit_code == 2 and "lock" in r.output and "Traceback" not in r.output, r.output
    assert victim.read_text() == "precious\n" and not out.exists() and stat.S_IFMT(os.lstat(lock).st_mode) == kind
    if what == "foreign":
        assert lock.read_text() == "my notes, not a lock\n"


def test_a_lock_a_killed_run_left_is_taken_over_and_removed(work):
    out, lock = work / "p.jsonl", work / "p.jsonl.lock"
    lock.write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "h", "since": 0, "command": "ctmask infer"}) + "\n")
    r = invoke("infer", work / "m.onnx", work / "scans", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 3 and not lock.exists()


def test_overlays_of_an_earlier_run_are_no_slices_of_a_later_one(work):
    """--overlays inside the scanned folder, then a run without --overlays: the tagged PNGs are skipped, counted."""
    from ctmask.runtime.overlays import OVERLAY_TAG, is_overlay

    scans = work / "scans"
    assert invoke("infer", work / "m.onnx", scans, "--overlays", scans / "ov", "-q").exit_code == 0
    drawn = sorted((scans / "ov").glob("*.png"))
    assert len(drawn) == 3 and all(is_overlay(p) for p in drawn)
    assert Image.open(drawn[0]).text.get(OVERLAY_TAG)
    assert not any(is_overlay(p) for p in scans.glob("*.png"))
    r = invoke("infer", work / "m.onnx", scans, "--json", work / "s.json", "-q")
    assert r.exit_code == 0 and "skipped 3 overlay PNG(s)" in r.output, r.output
    summary = json.loads((work / "s.json").read_text())
    assert summary["predicted"] == 3 and not summary["skipped"]
    assert not any("ov" in Path(s["study"]).parts for s in summary["studies"])


def test_overlays_are_no_slices_of_calibration_parity_or_bench(tmp_path):
    """The listing of --images (collect_images) leaves an earlier run's overlays out, with a counted warning."""
    from ctmask.core.errors import CtmaskWarning
    from ctmask.runtime.overlays import draw_overlay
    from ctmask.runtime.predict import collect_images

    slice_png = png(tmp_path / "images" / "a.png")
    pixels = np.asarray(Image.open(slice_png), np.float32) / 255
    draw_overlay(pixels, np.array([[4, 4, 20, 20]], np.float32), np.array([0.9], np.float32), "normal",
                 {"normal": 0.9}, tmp_path / "images" / "ov" / "a.overlay.png")
    with pytest.warns(CtmaskWarning, match="skipped 1 overlay PNG"):
        files, failures = collect_images([tmp_path / "images"])
    assert files == [slice_png] and not failures


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
    "export": Command(["export", "ckpt.pt"], ["--out", "--json"], ["--triton-repo"], ["ckpt.pt", "ckpt.pt.json"],
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
    (root / "ckpt.pt.json").write_text("{}\n")  # its sidecar
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


def test_outputs_through_system_streams_are_refused_and_links_are_written_through(tmp_path):
    """``--json /dev/stdout`` (or a link leading into /dev or /proc) would be replaced by a
    regular file; an ordinary symlinked output is written through to its target."""
    from ctmask.core.errors import OutputPathError
    from ctmask.core.fileio import atomic_path
    from ctmask.core.outputs import check_outputs

    fake = tmp_path / "stdout"
    fake.symlink_to("/proc/self/fd/1")
    for given in (Path("/dev/stdout"), fake):
        with pytest.raises(OutputPathError, match="stream of the system"):
            check_outputs({}, {"--json": given})
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text('{"keep": 1}')
    link.symlink_to(real.name)
    with atomic_path(link) as tmp:
        tmp.write_text('{"new": 2}')
    assert link.is_symlink() and real.read_text() == '{"new": 2}'
