"""``infer --resume`` resumes: records reach --out per batch, so a run killed with SIGKILL
continues from its last batch; records are keyed on what a slice is (SOPInstanceUID, content
hash), not how its path is spelled; one run at a time on an output; a bad earlier file is
refused with its line before anything runs (issue 19)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import invoke, write_ct_dicom

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def n_records(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture()
def scans(tmp_path):
    """40 distinct PNG slices and 4 DICOM slices."""
    folder = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for k in range(40):
        (folder / "png").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "png" / f"s{k:02d}.png")
    (folder / "dcm").mkdir()
    for k in range(4):
        write_ct_dicom(folder / "dcm" / f"IM{k}", rng.uniform(-1000, 200, (64, 64)))
    return folder


def summary_of(tmp_path: Path, *args) -> dict:
    js = tmp_path / "summary.json"
    r = invoke(*args, "--json", js, "-q")
    assert r.exit_code == 0, r.output
    return json.loads(js.read_text())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(small_onnx, scans, tmp_path, fmt):
    out = tmp_path / "run" / f"p.{fmt}"
    out.parent.mkdir()
    full = tmp_path / "full.jsonl"
    assert invoke("infer", small_onnx, scans, "--out", full, "-b", 2, "-q").exit_code == 0
    total = len(read_jsonl(full))
    assert total == 44
    records_file = out if fmt == "jsonl" else out.with_name(out.name + ".journal.jsonl")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ctmask", "infer", str(small_onnx), str(scans), "--out", str(out),
                             "-b", "2", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while n_records(records_file) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed = n_records(records_file)
    assert 6 <= killed < total  # killed mid-run, with whole batches in the file
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())
    summary = summary_of(tmp_path, "infer", small_onnx, scans, "--out", out, "-b", 2, "--resume")
    assert summary["resumed"] == killed and summary["predicted"] == total - killed
    if fmt == "jsonl":
        recs = read_jsonl(out)
    else:
        from ctmask.runtime.parquet import read_slices

        recs = read_slices(out)
    ids = [rec["id"] for rec in recs]
    assert len(ids) == total == len(set(ids))  # nothing predicted twice, nothing missing
    expected = {rec["id"]: rec for rec in read_jsonl(full)}
    for rec in recs:
        want = expected[rec["id"]]
        assert rec["class"] == want["class"] and rec["key"] == want["key"]
        np.testing.assert_allclose(list(rec["probs"].values()), list(want["probs"].values()), atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary, journal or lock left


def test_records_are_keyed_on_the_slice_not_the_path(small_onnx, scans, tmp_path, monkeypatch):
    """Another spelling of the inputs, then a moved archive: nothing is predicted twice."""
    out = tmp_path / "p.csv"
    summary = summary_of(tmp_path, "infer", small_onnx, scans / "dcm", scans / "png" / "s00.png", "--out", out)
    assert summary["predicted"] == 5
    monkeypatch.chdir(scans / "png")
    summary = summary_of(tmp_path, "infer", small_onnx, "../dcm", "s00.png", "--out", out, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (5, 0)
    moved = tmp_path / "elsewhere"
    shutil.move(scans, moved)
    summary = summary_of(tmp_path, "infer", small_onnx, moved, "--out", out, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (5, 39)
    import csv

    with open(out, newline="") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    assert len(ids) == len(set(ids)) == 44 and sum(i.startswith("dicom:") for i in ids) == 4


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s lock as a first ``ctmask infer`` would (kill it to release)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ctmask.core.outputs import output_lock\n"
                               "with output_lock(sys.argv[1], 'ctmask infer (the first run)'):\n"
                               "    print('held', flush=True); time.sleep(60)\n", str(out)],
                              env=env, stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        holder.wait()
        pytest.fail("the lock holder did not take the lock")
    return holder


def test_a_second_run_on_the_same_output_exits_2_naming_the_first(small_onnx, scans, tmp_path):
    out = tmp_path / "p.jsonl"
    holder = hold_lock(out)
    try:
        r = invoke("infer", small_onnx, scans / "dcm", "--out", out, "--resume", "-q")
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output and "the first run" in r.output, r.output
        assert "Traceback" not in r.output and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    r = invoke("infer", small_onnx, scans / "dcm", "--out", out, "--resume", "-q")  # the lock died with its holder
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(out)) == 4 and not (tmp_path / "p.jsonl.lock").exists()


@pytest.mark.parametrize("bad, where", [
    ('{"file": "a.png", "class": "normal", "probs": {"normal": NaN, "pneumonia": 0.1, "covid19": 0.1}}', "line 2"),
    ('{"file": "a.png", "class": "normal", "probs": {"normal": Infinity, "pneumonia": 0, "covid19": 0}}', "line 2"),
    ('{"file": "a.png", "class": "normal", "probs": {"normal": 1.5, "pneumonia": 0, "covid19": 0}}', "line 2"),
    ("[" * 100_000 + "]" * 100_000, "line 2 is nested too deeply"),
])
def test_a_bad_earlier_file_is_refused_with_its_line_before_anything_runs(small_onnx, scans, tmp_path, bad, where):
    out, studies, report = tmp_path / "p.jsonl", tmp_path / "s.csv", tmp_path / "r.html"
    assert invoke("infer", small_onnx, scans / "dcm" / "IM0", "--out", out, "-q").exit_code == 0
    out.write_text(out.read_text() + bad + "\n")
    before = out.read_bytes()
    r = invoke("infer", small_onnx, scans / "dcm", "--out", out, "--studies", studies, "--report", report, "--resume",
               "-q")
    assert r.exit_code == 2 and where in r.output and "Traceback" not in r.output, r.output
    assert out.read_bytes() == before and not studies.exists() and not report.exists()


def test_a_torn_last_line_is_cut_off_and_its_slice_predicted_again(small_onnx, scans, tmp_path):
    out = tmp_path / "p.jsonl"
    assert invoke("infer", small_onnx, scans / "dcm", "--out", out, "-q").exit_code == 0
    whole = read_jsonl(out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])  # a run killed while writing its last record
    summary = summary_of(tmp_path, "infer", small_onnx, scans / "dcm", "--out", out, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (3, 1)
    recs = read_jsonl(out)  # every line whole again, each slice once
    assert [r["id"] for r in recs] == [r["id"] for r in whole]
    np.testing.assert_allclose(list(recs[-1]["probs"].values()), list(whole[-1]["probs"].values()), atol=1e-5)


def test_dicom_identity_is_the_sop_instance_uid(scans):
    import pydicom

    from ctmask.scans.listing import collect_sources
    from ctmask.scans.types import with_identities

    refs, _ = collect_sources([scans / "dcm", scans / "png" / "s01.png"])
    ids = {Path(r.path).name: r.identity for r in with_identities(refs)}
    assert ids["IM2"] == f"dicom:{pydicom.dcmread(scans / 'dcm' / 'IM2').SOPInstanceUID}"
    import hashlib

    assert ids["s01.png"] == "sha256:" + hashlib.sha256((scans / "png" / "s01.png").read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_another_name_of_the_output_shares_its_lock(small_onnx, scans, tmp_path, how):
    """--out c.jsonl held by one run; --out cl.jsonl (a symlink or a hard link to it) is refused."""
    out, other = tmp_path / "c.jsonl", tmp_path / "cl.jsonl"
    assert invoke("infer", small_onnx, scans / "dcm" / "IM0", "--out", out, "-q").exit_code == 0
    if how == "symlink":
        other.symlink_to(out.name)
    else:
        os.link(out, other)
    before = out.read_bytes()
    holder = hold_lock(out)
    try:
        r = invoke("infer", small_onnx, scans / "dcm", "--out", other, "--resume", "-q")
        assert r.exit_code == 2 and "another run is writing" in r.output and "Traceback" not in r.output, r.output
        if how == "symlink":
            assert f"pid {holder.pid}" in r.output, r.output
        assert out.read_bytes() == before and not (tmp_path / "cl.jsonl.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    summary = summary_of(tmp_path, "infer", small_onnx, scans / "dcm", "--out", other, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (1, 3)
    left = ["c.jsonl.lock"] if how == "hardlink" else []  # the killed holder's, taken over through a symlink
    assert len(read_jsonl(out)) == 4 and [p.name for p in tmp_path.glob("*.lock")] == left


def test_a_record_twice_is_refused_with_its_line(small_onnx, scans, tmp_path):
    out, studies = tmp_path / "p.jsonl", tmp_path / "s.csv"
    assert invoke("infer", small_onnx, scans / "dcm", "--out", out, "-q").exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines + lines) + "\n")  # every record twice: the studies would count each slice twice
    before = out.read_bytes()
    r = invoke("infer", small_onnx, scans / "dcm", "--out", out, "--studies", studies, "--resume", "-q")
    assert r.exit_code == 2 and "line 5 repeats the record of line 1" in r.output and "Traceback" not in r.output, \
        r.output
    assert out.read_bytes() == before and not studies.exists()


def test_a_parquet_journal_left_after_the_parquet_file_was_written_is_not_read_twice(small_onnx, scans, tmp_path):
    """A run killed between writing p.parquet and removing its journal: the journal's records are in both."""
    pytest.importorskip("pyarrow")
    from ctmask.runtime.parquet import read_slices

    out = tmp_path / "p.parquet"
    assert invoke("infer", small_onnx, scans / "dcm", "--out", out, "-q").exit_code == 0
    recs = read_slices(out)
    journal = tmp_path / "p.parquet.journal.jsonl"
    journal.write_text("".join(json.dumps(rec) + "\n" for rec in recs[2:]))
    summary = summary_of(tmp_path, "infer", small_onnx, scans / "dcm", "--out", out, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (4, 0)
    assert [rec["id"] for rec in read_slices(out)] == [rec["id"] for rec in recs] and not journal.exists()
    journal.write_text(json.dumps(recs[0]) + "\n" + json.dumps({**recs[1], "id": "sha256:other"}) + "\n")
    r = invoke("infer", small_onnx, scans / "dcm", "--out", out, "--resume", "-q")  # not all in it: a record twice
    assert r.exit_code == 2 and "line 1 repeats the record of row 1" in r.output, r.output


def test_identical_inputs_are_each_predicted_and_resumed_once(small_onnx, tmp_path):
    """dup/a/x.png and dup/b/x.png hold the same bytes: two slices, two records, in a resumed run too."""
    dup = tmp_path / "dup"
    for sub in ("a", "b", "c"):
        (dup / sub).mkdir(parents=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(dup / "a" / "x.png")
    shutil.copy(dup / "a" / "x.png", dup / "b" / "x.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(dup / "c" / "y.png")
    full = tmp_path / "full.jsonl"
    assert invoke("infer", small_onnx, dup, "--out", full, "-b", 1, "-q").exit_code == 0
    whole = read_jsonl(full)
    assert len(whole) == 3 and len({rec["id"] for rec in whole}) == 3
    assert whole[1]["id"] == whole[0]["id"] + "~2"
    out = tmp_path / "p.jsonl"
    out.write_text(full.read_text().splitlines()[0] + "\n")  # a run killed after its first batch
    summary = summary_of(tmp_path, "infer", small_onnx, dup, "--out", out, "-b", 1, "--resume")
    assert (summary["resumed"], summary["predicted"]) == (1, 2)
    assert [(r["id"], r["key"]) for r in read_jsonl(out)] == [(r["id"], r["key"]) for r in whole]
    assert sum(s["n_slices"] for s in summary["studies"]) == 3


def test_a_hostile_uid_cannot_take_another_slices_identity():
    """SOPInstanceUID '1.2.3#1' must not be frame 1 of the instance '1.2.3' (nor its copy '~2')."""
    from ctmask.scans.types import SliceRef, with_identities

    refs = with_identities([SliceRef("a.dcm", frame=0, uid="1.2.3"), SliceRef("a.dcm", frame=1, uid="1.2.3"),
                            SliceRef("b.dcm", uid="1.2.3#1"), SliceRef("c.dcm", uid="1.2.3~2")])
    ids = [r.identity for r in refs]
    assert ids[:2] == ["dicom:1.2.3#0", "dicom:1.2.3#1"] and len(set(ids)) == 4
    assert all(i.startswith("dicom:sha256-") and "#" not in i and "~" not in i for i in ids[2:])
