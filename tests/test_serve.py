"""``ctmask serve`` on Ray Serve (ctmask.scale.serve) and ``ctmask bench-serve`` (ctmask.scale.loadtest).

One real server (a local Ray, one replica, the test ONNX graph) is shared by the whole module
and shut down at its end; nothing of Ray is stubbed.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from tests_helpers import invoke, write_ct_dicom

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 3.0
MAX_BODY_MB = 1


# ---------------------------------------------------------------- helpers


def post(url: str, body, path: str = "/predict", method: str = "POST", headers: dict | None = None,
         chunked: bool = False) -> tuple[int, dict]:
    """One request on a fresh connection; the answer's status and JSON body. A server that answers
    before reading the whole body may reset the connection while it is sent: the answer still counts."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data)
    finally:
        conn.close()


def assert_error(status: int, body: dict, allowed: tuple[int, ...], *words: str) -> None:
    assert status in allowed, (status, body)
    assert set(body) == {"error", "status"} and body["status"] == status, body
    assert isinstance(body["error"], str) and body["error"].strip(), body
    for w in words:
        assert w.lower() in body["error"].lower(), (w, body)


def hu_from_png(path: Path, level=-600.0, width=1500.0) -> np.ndarray:
    """HU whose lung-window rendering is the 8-bit synthetic slice (a realistic CT DICOM)."""
    from PIL import Image

    v = np.asarray(Image.open(path), np.float32)[::2, ::2] / 255.0  # 256 x 256: a 2-frame file stays under 1 MiB
    return np.round(level - width / 2 + v * width).astype(np.float32)


def edited_dicom(src: Path, dst: Path, **changes) -> Path:
    import pydicom

    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slices(synth_dir, tmp_path_factory) -> dict[str, Path]:
    """Three PNG test slices, two CT DICOM slices made from them, and the refused DICOM kinds."""
    folder = tmp_path_factory.mktemp("serve-slices")
    pngs = sorted((synth_dir / "images").glob("test_*.png"))[:3]
    out = {}
    for i, p in enumerate(pngs):
        out[f"png{i}"] = Path(shutil.copy(p, folder / p.name))
    for i in range(2):
        out[f"dcm{i}"] = folder / f"ct{i}.dcm"
        write_ct_dicom(out[f"dcm{i}"], hu_from_png(pngs[i]))
    ref = out["dcm0"]
    other = tmp_path_factory.mktemp("serve-bad")
    out["mr"] = edited_dicom(ref, other / "mr.dcm", Modality="MR")
    out["localizer"] = edited_dicom(ref, other / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    out["nopixels"] = edited_dicom(ref, other / "nopix.dcm", PixelData=None)
    import pydicom

    ds = pydicom.dcmread(ref)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(other / "multiframe.dcm", enforce_file_format=True)
    out["multiframe"] = other / "multiframe.dcm"
    return out


@pytest.fixture(scope="module")
def server(small_onnx):
    """The module's one server: a free loopback port, batches of up to 8 waiting 50 ms, a 1 MiB body limit."""
    import ray

    from ctmask.scale.http import free_port
    from ctmask.scale.serve import start_server

    handle = start_server(small_onnx, port=free_port(), replicas=1, max_batch=8, batch_wait_ms=50,
                          max_body_mb=MAX_BODY_MB, read_timeout_s=READ_TIMEOUT_S)
    try:
        yield handle
    finally:
        handle.stop()
        if handle.started_ray:
            assert not ray.is_initialized()


@pytest.fixture(scope="module")
def infer_records(small_onnx, slices, tmp_path_factory) -> dict[str, dict]:
    """What ``ctmask infer`` writes for the PNG and DICOM slices, by file name."""
    out = tmp_path_factory.mktemp("serve-infer") / "p.jsonl"
    files = [slices[k] for k in ("png0", "png1", "png2", "dcm0", "dcm1")]
    res = invoke("infer", small_onnx, *files, "--out", out, "-q")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    return {Path(r["file"]).name: r for r in recs}


def assert_same_prediction(answer: dict, rec: dict) -> None:
    assert answer["class"] == rec["class"] and answer["class_index"] == rec["class_index"]
    assert set(answer["probs"]) == set(rec["probs"])
    for c, p in rec["probs"].items():
        assert abs(answer["probs"][c] - p) <= 1e-5, (c, answer["probs"], rec["probs"])
    assert answer["size"] == rec["size"] and answer["kind"] == rec["kind"] and answer["n_rois"] == rec["n_rois"]
    assert len(answer["top_boxes"]) == len(rec["top_boxes"]) > 0
    np.testing.assert_allclose(answer["top_boxes"], rec["top_boxes"], atol=0.02)
    np.testing.assert_allclose(answer["top_rois"], rec["top_rois"], atol=1e-4)


# ---------------------------------------------------------------- CLI options (before the server)


def test_serve_refuses_bad_options_before_ray_starts(small_onnx, foreign_model, tmp_path):
    import socket

    import ray

    ray_was_up = ray.is_initialized()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cases = [
            (["--port", "70000"], "--port must be 1..65535"),
            (["--port", "0"], "--port must be 1..65535"),
            (["--replicas", "0"], "--replicas must be >= 1"),
            (["--max-batch", "0"], "--max-batch must be"),
            (["--max-body-mb", "0"], "--max-body-mb must be"),
            (["--port", str(busy.getsockname()[1])], "cannot listen on"),
        ]
        for args, words in cases:
            res = invoke("serve", small_onnx, *args)
            assert res.exit_code == 2 and words in res.output, (args, res.output)
        for model, words in ((tmp_path / "missing.onnx", "does not exist"), (foreign_model, "no ctmask metadata")):
            res = invoke("serve", model)
            assert res.exit_code == 2 and words in res.output, res.output
    finally:
        busy.close()
    if not ray_was_up:
        assert not ray.is_initialized(), "a refused `ctmask serve` started Ray"


# ---------------------------------------------------------------- endpoints


def test_health(server):
    status, body = post(server.url, None, "/health", "GET")
    assert status == 200 and body["status"] == "ok" and body["replica"]


def test_metadata_matches_the_onnx_file(server, small_onnx):
    import onnx

    from ctmask.core.fileio import sha256_file

    status, meta = post(server.url, None, "/metadata", "GET")
    assert status == 200
    props = {p.key: p.value for p in onnx.load(str(small_onnx), load_external_data=False).metadata_props}
    # file names only: the exporter stored the checkpoint's absolute path
    assert meta["spec"] == props | {"ctmask.checkpoint": Path(props["ctmask.checkpoint"]).name}
    assert meta["runner"]["model"] == small_onnx.name
    assert meta["model"]["file"] == small_onnx.name and meta["model"]["sha256"] == sha256_file(small_onnx)
    assert meta["model"]["weights_sha256"] == props["ctmask.weights_sha256"]
    assert meta["runner"]["backend"] == "onnxruntime-cpu" and meta["runner"]["provider"] == "CPUExecutionProvider"
    assert meta["batching"] == {"max_batch": 8, "batch_wait_ms": 50.0}
    assert meta["limits"]["max_body_bytes"] == MAX_BODY_MB << 20 and meta["limits"]["image_side"] == [32, 8192]
    assert meta["replicas"] == 1


@pytest.mark.parametrize("key", ["png0", "dcm0"])
def test_prediction_equals_ctmask_infer(server, slices, infer_records, key):
    path = slices[key]
    rec = infer_records[path.name]
    data = path.read_bytes()
    # the bytes alone (the readers tell the type from the content), with the file name as a hint, and
    # streamed in chunks without a Content-Length
    for body, headers, chunked in ((data, {}, False), (data, {"X-Filename": path.name}, False),
                                   (iter([data[:1000], data[1000:]]), {"Transfer-Encoding": "chunked"}, True)):
        status, answer = post(server.url, body, headers=headers, chunked=chunked)
        assert status == 200, answer
        assert_same_prediction(answer, rec)
        assert answer["batch"] >= 1 and answer["model"]["file"] == "small.onnx"
        assert answer["kind"] == ("dicom-hu" if key.startswith("dcm") else "image-8bit")


def test_concurrent_requests_are_batched(server, slices, infer_records):
    names = ["png0", "png1", "png2", "dcm0", "dcm1"]
    n = 12
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def client(i: int) -> None:
        path = slices[names[i % len(names)]]
        barrier.wait()
        results[i] = (path.name, *post(server.url, path.read_bytes()))

    before = post(server.url, None, "/stats", "GET")[1]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = post(server.url, None, "/stats", "GET")[1]
    assert all(r is not None and r[1] == 200 for r in results), results
    for name, _, answer in results:
        assert_same_prediction(answer, infer_records[name])
    sizes = [answer["batch"] for _, _, answer in results]
    assert max(sizes) > 1, sizes
    assert after["served"] - before["served"] == n
    formed = {int(k): v - before["batches"].get(k, 0) for k, v in after["batches"].items()}
    assert sum(k * v for k, v in formed.items()) == n and max(k for k, v in formed.items() if v) > 1, formed
    assert after["replica"] == before["replica"]


# ---------------------------------------------------------------- refused uploads


def _png_bytes(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_bytes(gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((64, 64, 3), np.int16), np.eye(4))
    data = img.to_bytes()
    return gzip.compress(data) if gz else data


BAD_UPLOADS = {
    # name: (body maker, allowed statuses, words in the reason)
    "empty": (lambda s: b"", (400,), ("empty",)),
    "random bytes": (lambda s: np.random.default_rng(1).bytes(4096), (415, 422), ("not an image",)),
    "text": (lambda s: b"patient: doe\nfindings: none\n" * 20, (415, 422), ("not an image",)),
    "truncated png": (lambda s: s["png0"].read_bytes()[:300], (415, 422), ("cannot decode",)),
    "150-byte file": (lambda s: s["png0"].read_bytes()[:150], (415, 422), ()),
    "mr dicom": (lambda s: s["mr"].read_bytes(), (422,), ("MR",)),
    "localizer": (lambda s: s["localizer"].read_bytes(), (422,), ("localizer",)),
    "dicom without pixels": (lambda s: s["nopixels"].read_bytes(), (422,), ("pixel",)),
    "multi-frame dicom": (lambda s: s["multiframe"].read_bytes(), (422,), ("one slice per request", "2 slices")),
    "nifti volume": (lambda s: _nifti_bytes(False), (422,), ("one slice per request", "3 slices")),
    "nifti.gz volume": (lambda s: _nifti_bytes(True), (422,), ("one slice per request",)),
    "image too large": (lambda s: _png_bytes(9000, 40), (413, 422), ("maximum",)),
    "image too small": (lambda s: _png_bytes(16, 16), (422,), ("minimum",)),
}


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_bad_upload_is_refused_with_a_json_reason(server, slices, kind):
    make, allowed, words = BAD_UPLOADS[kind]
    status, body = post(server.url, make(slices))
    assert_error(status, body, allowed, *words)
    assert "upload-" not in body["error"] and tempfile.gettempdir() not in body["error"], body


def test_random_and_truncated_bytes_never_answer_5xx(server, slices):
    rng = np.random.default_rng(7)
    png, dcm = slices["png1"].read_bytes(), slices["dcm1"].read_bytes()
    bodies = [rng.bytes(int(rng.integers(1, 3000))) for _ in range(10)]
    bodies += [src[: int(rng.integers(1, len(src)))] for src in (png, dcm) for _ in range(7)]
    for src in (png, dcm):
        for _ in range(3):
            flipped = bytearray(src)
            for k in rng.integers(0, len(src), 8):
                flipped[k] = int(rng.integers(0, 256))
            bodies.append(bytes(flipped))
    bodies.append(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    bodies.append(b"\x00" * 128 + b"DICM" + rng.bytes(500))
    assert len(bodies) >= 30
    for i, body in enumerate(bodies):
        status, answer = post(server.url, body)
        assert status < 500, (i, len(body), answer)
        if status != 200:
            assert_error(status, answer, (400, 413, 415, 422))


def test_oversized_body_is_413(server):
    big = b"\x00" * ((MAX_BODY_MB << 20) + 1)
    status, body = post(server.url, big)
    assert_error(status, body, (413,), "larger than the limit", "Content-Length")
    # no Content-Length (chunked): the stream is cut at the limit
    chunks = (b"\x00" * 65536 for _ in range((MAX_BODY_MB << 20) // 65536 + 2))
    status, body = post(server.url, chunks, headers={"Transfer-Encoding": "chunked"}, chunked=True)
    assert_error(status, body, (413,), "larger than the limit")
    # just under the limit is read (and refused for what it is, not for its size)
    status, body = post(server.url, b"\x00" * (MAX_BODY_MB << 20))
    assert_error(status, body, (415, 422), "not an image")


def _raw(url: str, head: bytes, body: bytes, wait_s: float, close_after_s: float | None = None) -> bytes:
    """Send a request head and part of a body on a raw socket; the bytes answered within ``wait_s``
    (or nothing, when the socket is closed by us after ``close_after_s``)."""
    import socket
    import time
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        if close_after_s is not None:
            time.sleep(close_after_s)
            return b""
        got = b""
        try:
            while b"\r\n\r\n" not in got or len(got) < got.find(b"\r\n\r\n") + 8:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        return got


def test_a_body_shorter_than_its_content_length_gets_408_not_a_hang(server):
    """A client that declares more than it sends holds a request slot until the deadline, then 408;
    one that goes away is a 499 in the counters, never a 500; the server keeps answering."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    answer = _raw(server.url, head, b"0123456789", wait_s=READ_TIMEOUT_S + 20)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"the request body stalled" in answer
    for _ in range(3):  # clients that give up mid-body
        _raw(server.url, head, b"0123456789", wait_s=5, close_after_s=0.5)
    status, body = post(server.url, b"\x89PNG" + b"\x00" * 100)
    assert status in (415, 422)  # still answering
    import time

    time.sleep(READ_TIMEOUT_S + 1)  # the abandoned requests end at their deadline at the latest
    status, stats = post(server.url, None, "/stats", "GET")
    assert status == 200 and stats["errors"].get("500", 0) == 0, stats


def test_a_slow_but_steady_upload_is_read_to_the_end(server, slices):
    """The deadline is for a stall, not for the whole body: pieces that keep coming are read."""
    import socket
    import time
    from urllib.parse import urlsplit

    data = slices["png0"].read_bytes()
    u = urlsplit(server.url)
    pieces = [data[i : i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                     + str(len(data)).encode() + b"\r\n\r\n")
        for piece in pieces:  # 6+ pieces, 1 s apart: longer in all than the 3 s stall deadline
            sock.sendall(piece)
            time.sleep(READ_TIMEOUT_S / 3)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@pytest.mark.parametrize("body", [b"BM this is a plain text note, not a bitmap. " * 3, b"II*\x00 not a TIFF" * 10])
def test_text_that_starts_like_an_image_is_415(server, body):
    assert_error(*post(server.url, body), (415,), "not an image")


def test_an_oversized_image_without_a_name_is_413(server):
    """A PNG declaring 20000 x 20000 px, sent with no filename or type: refused for its size (413)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    status, body = post(server.url, buf.getvalue())
    assert_error(status, body, (413,), "maximum")


def test_unknown_path_and_wrong_method(server):
    assert_error(*post(server.url, None, "/nope", "GET"), (404,), "no such endpoint")
    assert_error(*post(server.url, b"x", "/health", "POST"), (405,), "GET")
    assert_error(*post(server.url, None, "/predict", "GET"), (405,), "POST")


def test_uploads_leave_no_temporary_files(server, slices):
    post(server.url, slices["png0"].read_bytes())
    post(server.url, b"junk" * 10)
    port = server.url.rsplit(":", 1)[1]  # this server's replica folder, not another server's on this machine
    folders = list(Path(tempfile.gettempdir()).glob(f"ctmask-serve-{port}-*"))
    assert folders and [p for f in folders for p in f.glob("upload-*")] == []
    status, stats = post(server.url, None, "/stats", "GET")
    assert status == 200 and stats["errors"].get("500", 0) == 0 and stats["served"] >= 1


# ---------------------------------------------------------------- the load test


def test_bench_serve_against_the_running_server(server, small_onnx, slices, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in ("png0", "png1", "dcm0"):
        shutil.copy(slices[k], folder / slices[k].name)
    out = tmp_path / "bench.json"
    res = invoke("bench-serve", small_onnx, "--images", folder, "--clients", "1,4", "--requests", "8",
                 "--url", server.url, "--json", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["images"] == 3 and not report["server_started"]
    assert [lv["clients"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["ok"] == 8 and lv["lost"] == 0 and lv["non200"] == 0 and lv["mismatched"] == 0, lv
        assert sum(int(k) * v for k, v in lv["batches_formed"].items()) == 8 and lv["stats"]["complete"], lv
        assert sum(lv["batch_sizes"].values()) == 8 and lv["p50_ms"] > 0
    assert [r["batch_size"] for r in report["reference"]] == [1, 8]


def test_load_test_judging_counts_lost_and_mismatched_answers():
    """The judge itself: a wrong class, a moved probability, a missing answer and an error answer all count."""
    from ctmask.scale.loadtest import Answer, Level, Upload, judge_level

    exp = {"class": "normal", "probs": {"normal": 0.9, "pneumonia": 0.05, "covid19": 0.05}}
    up = [Upload("a.png", b"", exp)]

    def ans(i, status, body=None):
        return Answer(i, 0, status, 0.01, body)

    good = {"class": "normal", "probs": dict(exp["probs"]), "batch": 2}
    wrong = {"class": "covid19", "probs": dict(exp["probs"]), "batch": 1}
    moved = {"class": "normal", "probs": {**exp["probs"], "normal": 0.9001}, "batch": 1}
    level = Level(1, 6, 1.0, [ans(0, 200, good), ans(1, 200, wrong), ans(2, 200, moved), ans(3, 422, None),
                              ans(4, None)])
    r = judge_level(level, up)
    assert (r["ok"], r["non200"], r["lost"], r["mismatched"]) == (3, 1, 2, 2), r
    assert r["batch_sizes"] == {"1": 2, "2": 1} and r["statuses"] == {"422": 1}
    assert judge_level(Level(1, 1, 1.0, [ans(0, 200, good)]), up)["mismatched"] == 0
