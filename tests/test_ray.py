"""``ctmask infer --ray`` on Ray Data against the local path: same slices, same failures, same
predictions byte for byte (JSONL), Parquet output, ``--resume``, a killed actor recovered with
nothing lost or duplicated. The module starts its own local Ray cluster and stops it."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import invoke, write_ct_dicom

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'ctmask[ray]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """A 2-CPU local cluster for the module; ctmask joins it instead of starting its own."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two synthetic patients (DICOM series), a NIfTI volume, PNG slices, and broken inputs."""
    root = tmp_path_factory.mktemp("rayscans")
    r = invoke("synth", root / "synth", "--dicom", "--patients", 2, "--slices-per-patient", 6, "--nifti",
               "--workers", 1, "-q")
    assert r.exit_code == 0, r.output
    mixed = root / "mixed"
    mixed.mkdir()
    series = next(next((root / "synth" / "dicom").iterdir()).iterdir())
    good = sorted(series.iterdir())
    (mixed / "IM9999").write_bytes(good[0].read_bytes()[:150])  # a DICOM cut to 150 bytes
    Image.new("L", (1, 1)).save(mixed / "tiny.png")
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8)).save(mixed / f"slice{k}.png")
    (mixed / "notes.txt").write_text("not an image")
    write_ct_dicom(mixed / "ct.dcm", rng.normal(-600, 300, (64, 64)))
    from pydicom import dcmread

    ds = dcmread(mixed / "ct.dcm")
    ds.Modality = "MR"
    ds.save_as(mixed / "MR0001")
    (mixed / "trunc.png").write_bytes((mixed / "slice0.png").read_bytes()[:200])
    (root / "empty").mkdir()
    return root


def inputs_of(scans: Path) -> list[Path]:
    return [scans / "synth" / "dicom", scans / "synth" / "nifti", scans / "mixed", scans / "empty",
            scans / "missing.png"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_listing_on_ray_gives_the_local_slices_and_failures(scans):
    from ctmask.scale.ray_batch import collect_sources_ray
    from ctmask.scans.listing import collect_sources

    local = collect_sources(inputs_of(scans))
    on_ray = collect_sources_ray(inputs_of(scans))
    assert on_ray == local
    refs, failures = local
    # 2 series and 2 volumes of 6, 5 PNG (the tiny and truncated ones fail when decoded), one CT DICOM
    assert len(refs) == 12 + 12 + 5 + 1
    reasons = {Path(f.file).name: f.reason for f in failures}
    assert set(reasons) == {"IM9999", "MR0001", "empty", "missing.png"}
    assert "modality MR" in reasons["MR0001"] and "no such file" in reasons["missing.png"]


def test_infer_on_ray_writes_what_infer_writes(small_onnx, scans, tmp_path):
    local_out, local_st = tmp_path / "local.jsonl", tmp_path / "local-st.jsonl"
    r_local = invoke("infer", small_onnx, *inputs_of(scans), "--out", local_out, "--studies", local_st, "-b", 4,
                     "--json", tmp_path / "local.json", "-q")
    assert r_local.exit_code == 1, r_local.output  # broken inputs were skipped
    ray_out, ray_st = tmp_path / "ray.jsonl", tmp_path / "ray-st.jsonl"
    r_ray = invoke("infer", small_onnx, *inputs_of(scans), "--ray", "--out", ray_out, "--studies", ray_st, "-b", 4,
                   "--json", tmp_path / "ray.json", "-q")
    assert r_ray.exit_code == 1, r_ray.output
    assert "Traceback" not in r_ray.output
    assert ray_out.read_bytes() == local_out.read_bytes()
    assert ray_st.read_bytes() == local_st.read_bytes()
    s_local, s_ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert s_ray["skipped"] == s_local["skipped"] and len(s_ray["skipped"]) >= 5
    assert s_ray["ray"]["chunks"] == -(-30 // 4)  # the 30 slices listed, 4 per chunk (two fail to decode)
    assert sum(s_ray["ray"]["chunks_by_worker"].values()) == 8
    assert s_ray["ray"]["duplicates_dropped"] == 0

    # Parquet, slices and studies: the same records, typed
    pq_out, pq_st = tmp_path / "ray.parquet", tmp_path / "ray-st.parquet"
    r = invoke("infer", small_onnx, scans / "synth" / "dicom", "--ray", "--out", pq_out, "--studies", pq_st, "-q")
    assert r.exit_code == 0, r.output
    from ctmask.runtime.parquet import read_slices

    by_key = {rec["key"]: rec for rec in read_jsonl(local_out)}
    back = read_slices(pq_out)
    assert len(back) == 12
    for rec in back:
        want = by_key[rec["key"]]
        assert rec["probs"] == want["probs"] and rec["class"] == want["class"]
        assert rec["top_boxes"] == want["top_boxes"] and rec["size"] == want["size"]
    import pyarrow.parquet as pq

    studies = pq.read_table(pq_st).to_pylist()
    want_st = {s["study"]: s for s in read_jsonl(local_st)}
    assert len(studies) == 2
    for s in studies:
        assert s["class"] == want_st[s["study"]]["class"]
        assert s["prob_covid19"] == want_st[s["study"]]["probs"]["covid19"]


def test_resume_on_ray_from_parquet(small_onnx, scans, tmp_path):
    patients = sorted((scans / "synth" / "dicom").iterdir())
    out = tmp_path / "p.parquet"
    r = invoke("infer", small_onnx, patients[0], "--ray", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    r = invoke("infer", small_onnx, *patients, "--ray", "--out", out, "--resume", "--json", tmp_path / "s.json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["resumed"] == 6 and summary["predicted"] == 6
    from ctmask.runtime.parquet import read_slices

    full = tmp_path / "full.jsonl"
    assert invoke("infer", small_onnx, *patients, "--out", full, "-q").exit_code == 0
    got = {rec["key"]: rec["probs"] for rec in read_slices(out)}
    want = {rec["key"]: rec["probs"] for rec in read_jsonl(full)}
    assert got == want


def test_a_killed_actor_is_recovered_nothing_lost_or_duplicated(small_onnx, scans, tmp_path):
    """SIGKILL the actor process that delivered the first chunk while the others are in flight:
    Ray restarts it and runs its chunks again; every slice comes once, as the local path gives it."""
    from ctmask.backends.registry import model_spec
    from ctmask.runtime.batch_run import PredictOptions, predict_sources
    from ctmask.runtime.runner import OnnxRuntimeRunner
    from ctmask.scale.ray_batch import RayOptions, RayStats, predict_sources_ray, ray_cluster
    from ctmask.scans.listing import collect_sources
    from ctmask.scans.types import Failure

    refs, _ = collect_sources([scans / "synth" / "dicom", scans / "synth" / "nifti"])
    refs = refs * 3  # 72 slices, 36 chunks of 2
    with OnnxRuntimeRunner(small_onnx) as runner:
        want = [(i[0].key, i[0].probs) for i in predict_sources(runner, refs, PredictOptions(2))
                if not isinstance(i, Failure)]
    stats = RayStats()
    killed: list[str] = []

    def kill_first_worker(n: int) -> None:
        if not killed:
            worker = next(iter(stats.by_worker))
            killed.append(worker)
            os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)

    with ray_cluster(None, stats):
        got = [(p.key, p.probs) for p, _ in predict_sources_ray(small_onnx, model_spec(small_onnx), refs,
                                                                RayOptions(actors=1, cpus_per_actor=1.0), stats,
                                                                batch_size=2, on_batch=kill_first_worker)]
    assert killed
    assert got == want  # nothing lost, nothing twice, same order and numbers
    assert len(stats.by_worker) >= 2, stats.by_worker  # the restarted actor (a new process) ran the rest
    assert sum(stats.by_worker.values()) == 36


@pytest.mark.parametrize("args, message", [
    (["--actors", "2"], "only apply with --ray"),
    (["--ray", "--actors", "0"], "--actors must be >= 1"),
    (["--ray", "--gpus-per-actor", "nan"], "--gpus-per-actor must be"),
    (["--ray", "--actors", "8", "--cpus-per-actor", "1"], "do not fit"),
    (["--ray", "--gpus-per-actor", "1"], "do not fit"),
])
def test_bad_ray_options_exit_2_and_write_nothing(small_onnx, scans, tmp_path, args, message):
    out = tmp_path / "p.jsonl"
    r = invoke("infer", small_onnx, scans / "mixed", "--out", out, *args, "-q")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_ray_refuses_a_checkpoint_and_a_broken_model(cls_ckpt, scans, tmp_path):
    r = invoke("infer", cls_ckpt, scans / "mixed", "--ray", "-q")
    assert r.exit_code == 2 and "export the checkpoint" in r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00" * 150)
    r = invoke("infer", bad, scans / "mixed", "--ray", "-q")
    assert r.exit_code == 2 and "not a loadable ONNX model" in r.output, r.output


def test_overlays_on_ray_match_the_local_ones(small_onnx, scans, tmp_path):
    series = next(next((scans / "synth" / "dicom").iterdir()).iterdir())
    work = tmp_path / "w"
    shutil.copytree(series, work / "series")
    old = Path.cwd()
    os.chdir(work)  # relative --overlays: records name it as given, both ways
    try:
        assert invoke("infer", small_onnx, "series", "--out", "a.jsonl", "--overlays", "ov-a", "-q").exit_code == 0
        assert invoke("infer", small_onnx, "series", "--ray", "--out", "b.jsonl", "--overlays", "ov-b",
                      "-q").exit_code == 0
    finally:
        os.chdir(old)
    a, b = read_jsonl(work / "a.jsonl"), read_jsonl(work / "b.jsonl")
    assert [r["overlay"].replace("ov-a", "ov-b") for r in a] == [r["overlay"] for r in b]
    for ra, rb in zip(a, b):
        assert (work / ra["overlay"]).read_bytes() == (work / rb["overlay"]).read_bytes()


def test_an_address_where_nothing_listens_fails_at_once(small_onnx, scans, tmp_path):
    """`ray.init` would retry for minutes; ctmask says so before Ray starts (a new process: the
    module's Ray is not initialised there)."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # released: nothing listens there
    out = tmp_path / "p.jsonl"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ctmask", "infer", str(small_onnx), str(scans / "mixed"), "--ray",
                        "--address", f"127.0.0.1:{port}", "--out", str(out), "-q"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "nothing answers there" in r.stderr and "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < 60 and not out.exists()


def test_a_model_the_actors_cannot_load_fails_the_run_cleanly(small_onnx, scans, tmp_path):
    """The driver reads only the metadata; an actor that cannot build its runner stops the run
    with exit 2 and the reason (Ray would restart an actor whose constructor raised forever)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(small_onnx))
    model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.input[0].name], ["junk"]))
    bad = tmp_path / "unloadable.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "p.jsonl"
    r = invoke("infer", bad, scans / "synth" / "dicom", "--ray", "--out", out, "-q")
    assert r.exit_code == 2, r.output
    assert "could not load the model" in r.output and "Traceback" not in r.output
    assert not out.exists()
