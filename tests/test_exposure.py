"""What ``ctmask serve`` and ``ctmask infer --ray`` open to the network, seen from outside.

Each command runs as its own process (``python -m ctmask``), as a user starts it; the test
lists the listening sockets of that process and of every process under it (Ray's GCS, raylet,
dashboard head and agent, runtime-env agent, workers, Serve's proxy and controller) with psutil,
and tries each port on this machine's network address. Nothing may listen beyond the loopback
but Serve's HTTP port on ``--host``. ``serve`` with a token answers 401 without it (``/health``
stays open), and ``/metadata`` names no folder.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

psutil = pytest.importorskip("psutil", reason="psutil is a test dependency: pip install 'ctmask[dev]'")
pytest.importorskip("ray", reason="Ray is not installed: pip install 'ctmask[ray]'")

START_TIMEOUT_S = 300.0


# ---------------------------------------------------------------- helpers


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket of
    ``pid`` and its descendants."""
    found = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for p in procs:
        try:
            name = " ".join(p.cmdline()[:2]) or p.name()
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.laddr and (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM):
                found.add((name, c.laddr.ip, c.laddr.port))
    return found


def network_addresses() -> list[str]:
    """This machine's IPv4 addresses other than the loopback (where a remote client would connect)."""
    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family == socket.AF_INET and not is_loopback(a.address)})


def assert_loopback_only(seen: set[tuple[str, str, int]], allowed: set[tuple[str, int]] = frozenset()) -> None:
    exposed = sorted((name, ip, port) for name, ip, port in seen if not is_loopback(ip) and (ip, port) not in allowed)
    assert not exposed, f"listening beyond the loopback: {exposed}"
    for ip in network_addresses():  # and from outside: nothing answers on the network address
        for _, _, port in sorted(seen):
            if (ip, port) in allowed:
                continue
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()


def assert_ray_was_seen(seen: set[tuple[str, str, int]]) -> None:
    """The check looked at a running cluster: Ray's own servers were among the sockets."""
    names = " ".join(name for name, _, _ in seen)
    for server in ("gcs_server", "raylet", "DashboardAgent"):
        assert server in names, f"no socket of {server} seen (the check saw {sorted(seen)})"


def ctmask(*args) -> list[str]:
    return [sys.executable, "-m", "ctmask", *(str(a) for a in args)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (ctmask shuts Ray down), then SIGKILL to the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def request(url: str, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, dict]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), dict(r.getheaders())
    finally:
        conn.close()


def strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


# ---------------------------------------------------------------- serve


@pytest.mark.slow
def test_serve_listens_on_the_loopback_only_and_wants_its_token(small_onnx, synth_dir, tmp_path):
    import onnx

    from ctmask.core.errors import ServerError
    from ctmask.scale.http import free_port, wait_healthy

    token = secrets.token_urlsafe(32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(ctmask("serve", small_onnx, "--port", port), env=os.environ | {
            "CTMASK_SERVE_TOKEN": token}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                wait_healthy(url, 5)
                break
            except ServerError:
                assert time.monotonic() < deadline, log.read_text()
        seen = listening(proc.pid)
        assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in seen}
        assert_ray_was_seen(seen)
        assert_loopback_only(seen)
        assert token not in " ".join(psutil.Process(proc.pid).cmdline())

        # the token: 401 without it or with another one, /health open
        slice_png = sorted((synth_dir / "images").glob("test_*.png"))[0].read_bytes()
        good = {"Authorization": f"Bearer {token}"}
        status, body, _ = request(url, "/health")
        assert status == 200 and body["status"] == "ok"
        for headers in ({}, {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"}, {"Authorization": "Bearer "}):
            for method, path, payload in (("POST", "/predict", slice_png), ("GET", "/metadata", None),
                                          ("GET", "/stats", None), ("GET", "/nowhere", None)):
                status, body, got = request(url, path, method, payload, headers)
                assert status == 401 and body["status"] == 401 and "Bearer" in body["error"], (path, headers, body)
                assert got.get("www-authenticate", got.get("WWW-Authenticate", "")).startswith("Bearer")
        status, body, _ = request(url, "/predict", "POST", slice_png, {"authorization": f"bearer {token}"})
        assert status == 200 and body["class"] in body["probs"], body

        # /metadata: file names, no folder of this machine or of the one that exported the model
        status, meta, _ = request(url, "/metadata", headers=good)
        assert status == 200
        props = {p.key: p.value for p in onnx.load(str(small_onnx), load_external_data=False).metadata_props}
        assert Path(props["ctmask.checkpoint"]).is_absolute()  # what the exporter stored
        assert meta["spec"]["ctmask.checkpoint"] == Path(props["ctmask.checkpoint"]).name
        assert meta["runner"]["model"] == small_onnx.name
        leaked = [s for s in strings(meta) if s.startswith("/") or str(tmp_path.parent) in s or "\\" in s]
        assert not leaked, leaked
        status, stats, _ = request(url, "/stats", headers=good)
        assert status == 200 and stats["errors"]["401"] == 20
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert "SIGTERM: shutting Serve down" in log.read_text()  # ours, not Ray's (which aborts)
    assert "WITHOUT AUTHENTICATION" not in log.read_text()


# ---------------------------------------------------------------- infer --ray


@pytest.mark.slow
def test_infer_on_ray_listens_on_the_loopback_only(small_onnx, synth_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    log = tmp_path / "infer.log"
    seen: set[tuple[str, str, int]] = set()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(ctmask("infer", small_onnx, synth_dir / "images", "--ray", "--out", out, "-q"),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None:  # the cluster lives as long as the run: look while it runs
            assert time.monotonic() < deadline, log.read_text()
            seen |= listening(proc.pid)
            time.sleep(0.2)
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert len(out.read_text().splitlines()) == len(list((synth_dir / "images").glob("*.png")))
    assert_ray_was_seen(seen)
    assert_loopback_only(seen)


# ---------------------------------------------------------------- options (nothing starts)


def invoke_serve(*args, env: dict | None = None):
    from ctmask.cli.main import app

    return CliRunner().invoke(app, ["serve", *(str(a) for a in args)], env={"CTMASK_SERVE_TOKEN": None, **(env or {})})


def test_a_bad_token_exits_2_before_ray_starts_and_is_never_printed(tmp_path):
    import ray

    ray_was_up = ray.is_initialized()
    short, spaced = "s3cr3t-short", "a token with spaces in it"
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text(short + "\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" * 20)
    good = tmp_path / "good"
    good.write_text(secrets.token_urlsafe(32) + "\n")
    cases = [
        ((), {"CTMASK_SERVE_TOKEN": short}, "at least 16 characters"),
        ((), {"CTMASK_SERVE_TOKEN": spaced}, "no spaces"),
        ((), {"CTMASK_SERVE_TOKEN": "  "}, "CTMASK_SERVE_TOKEN is empty"),
        (("--token-file", tmp_path / "empty"), {}, "is empty"),
        (("--token-file", tmp_path / "short"), {}, "at least 16 characters"),
        (("--token-file", tmp_path / "binary"), {}, "does not hold one token"),
        (("--token-file", tmp_path / "missing"), {}, "cannot read the token file"),
        (("--token-file", good), {"CTMASK_SERVE_TOKEN": secrets.token_urlsafe(32)}, "set one of them"),
    ]
    for args, env, words in cases:
        res = invoke_serve(tmp_path / "model.onnx", *args, env=env)  # the token is read first
        assert res.exit_code == 2 and words in res.output, (args, env, res.output)
        assert "Traceback" not in res.output
        for secret in (short, spaced):
            assert secret not in res.output
    if not ray_was_up:
        assert not ray.is_initialized(), "a refused `ctmask serve` started Ray"


def test_a_token_file_that_is_a_named_pipe_or_too_large_exits_2_at_once(tmp_path):
    """A named pipe without a writer would wait forever: refused before it is read, like a file over 4 KB."""
    fifo, big = tmp_path / "tokfifo", tmp_path / "big"
    os.mkfifo(fifo)
    big.write_text("A" * 8192)
    env = {k: v for k, v in os.environ.items() if k != "CTMASK_SERVE_TOKEN"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    for path, words in ((fifo, "not a regular file"), (big, "8192 bytes")):
        try:
            done = subprocess.run(ctmask("serve", tmp_path / "model.onnx", "--token-file", path), timeout=60,
                                  capture_output=True, text=True, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`ctmask serve --token-file {path.name}` hung")
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_serving_beyond_the_loopback_without_a_token_warns_loudly(foreign_model):
    # the warning comes once the options are checked, before the model is loaded (a foreign
    # model then stops the command: nothing starts)
    res = invoke_serve(foreign_model, "--host", "0.0.0.0")
    assert res.exit_code == 2 and "warning: --host 0.0.0.0 serves BEYOND THIS MACHINE WITHOUT AUTHENTICATION" \
        in res.output, res.output
    for args, env in ((("--host", "0.0.0.0"), {"CTMASK_SERVE_TOKEN": secrets.token_urlsafe(32)}),
                      (("--host", "127.0.0.1"), {}), (("--host", "localhost"), {}), (("--host", "::1"), {})):
        res = invoke_serve(foreign_model, *args, env=env)
        assert res.exit_code == 2 and "WITHOUT AUTHENTICATION" not in res.output, (args, res.output)


def test_metadata_paths_become_file_names():
    from ctmask.scale.serve_app import without_paths

    meta = {"ctmask.checkpoint": "/home/alice/runs/robust3/cls.pt", "ctmask.preset": "small",
            "runner": {"model": "models/small.onnx", "threads": "default", "cache": "C:\\Users\\bob\\ov\\m.blob",
                       "list": ["\\\\server\\share\\x.onnx", "/opt/a/b.engine", "cpu"]}}
    assert without_paths(meta) == {
        "ctmask.checkpoint": "cls.pt", "ctmask.preset": "small",
        "runner": {"model": "small.onnx", "threads": "default", "cache": "m.blob",
                   "list": ["x.onnx", "b.engine", "cpu"]}}


def test_a_local_cluster_needs_a_ray_with_token_authentication_on_by_default():
    from ctmask.core.errors import RayError
    from ctmask.scale.ray_batch import check_ray_version

    for old in ("2.40.0", "2.52.1", "2.58.0", "1.13.0"):
        with pytest.raises(RayError, match="Ray >= 2.59"):
            check_ray_version(old)
    for new in ("2.59.0", "2.60.0", "2.61.0rc1", "3.0.0"):
        check_ray_version(new)
