"""``ctmask bench-serve``: load test of a ``ctmask serve`` endpoint, checked against the local runner.

For each concurrency level C, exactly C client threads send ``POST /predict`` requests one
after another (stdlib ``http.client``, one keep-alive connection per thread), N requests in
all per level over the given slices (cycled). Per level: throughput, latency p50 / p99, the
batch sizes the answers report (``batch``: requests per batch size) and the inference calls
the replicas counted (``/stats`` before and after, summed over every replica), the non-200
answers, and *lost* requests (sent, but neither a 200 nor an error answer came back: a
broken connection, a thread that died): it must be 0. Every 200 answer is compared with the
local runner's prediction of the same file (decoded and predicted as ``ctmask infer`` does:
:func:`~ctmask.scans.listing.collect_sources`, then
:func:`~ctmask.runtime.batch_run.predict_sources`): same class, probabilities within
:data:`PROB_ATOL` (the served batch and the local one differ in size, and a backend's
batched kernels may move the 7th digit).

The same slices also run through the plain in-process runner (no HTTP, batch 1 and the
server's maximum batch) for reference throughput. Nothing here imports Ray unless the server
is started in this process (:func:`run_loadtest` without ``url``).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError
from ctmask.scale.http import auth_headers, free_port, get_json, wait_healthy

PROB_ATOL = 1e-5
"""Largest difference of any class probability between the served answer and the local
prediction that still counts as the same prediction."""


# ---------------------------------------------------------------- replicas' counters


def collect_stats(url: str, replicas: int, tries: int | None = None, timeout_s: float = 10.0) -> dict:
    """Every replica's ``/stats``: asks until ``replicas`` distinct replica ids answered (or
    ``tries`` requests, default ``20 * replicas``: requests reach replicas at random), and
    sums their counters.

    Returns:
        ``{"replicas": {id: stats}, "complete": bool, "requests": n, "served": n,
        "predict_answers": {status: n}, "errors": {status: n}, "batches": {size: n}}``.
    """
    seen: dict[str, dict] = {}
    for _ in range(tries or 20 * replicas):
        s = get_json(url + "/stats", timeout_s)
        seen[s["replica"]] = s
        if len(seen) >= replicas:
            break
    total: dict = {"replicas": seen, "complete": len(seen) >= replicas, "requests": 0, "served": 0,
                   "predict_answers": {}, "errors": {}, "batches": {}}
    for s in seen.values():
        for key in ("requests", "served"):
            total[key] += s[key]
        for key in ("predict_answers", "errors", "batches"):
            for k, v in s[key].items():
                total[key][k] = total[key].get(k, 0) + v
    return total


def _delta(after: dict, before: dict) -> dict:
    keys = sorted({*after, *before}, key=int)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) - before.get(k, 0)}


# ---------------------------------------------------------------- the client


@dataclass
class Upload:
    """One slice file as the client sends it, with the local runner's record of it."""

    name: str
    body: bytes
    expected: dict
    path: str = ""


@dataclass
class Answer:
    index: int
    upload: int
    status: int | None  # None: no answer (the request is lost)
    latency_s: float
    body: dict | None = None
    error: str = ""


@dataclass
class Level:
    """The answers of one concurrency level."""

    clients: int
    requests: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)


def run_level(url: str, uploads: list[Upload], clients: int, requests: int, timeout_s: float = 120.0) -> Level:
    """Exactly ``clients`` threads, each sending its share of ``requests`` sequentially
    (request i goes to thread i mod clients; upload i mod len(uploads)) on one keep-alive
    connection (reopened after a broken one)."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or (443 if parsed.scheme == "https" else 80)
    conn_class = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    path = (parsed.path.rstrip("/") or "") + "/predict"
    answers: list[Answer] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        conn = None
        mine: list[Answer] = []
        try:
            for i in range(t, requests, clients):
                k = i % len(uploads)
                up = uploads[k]
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = conn_class(host, port, timeout=timeout_s)
                    conn.request("POST", path, body=up.body, headers={
                        "Content-Type": "application/octet-stream", "X-Filename": up.name, **auth_headers()})
                    r = conn.getresponse()
                    data = r.read()
                    status = r.status
                    if r.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as exc:
                    mine.append(Answer(i, k, None, time.perf_counter() - t0, error=f"{exc.__class__.__name__}: {exc}"))
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                latency = time.perf_counter() - t0
                try:
                    body = json.loads(data)
                except ValueError:
                    body = None
                mine.append(Answer(i, k, status, latency, body if isinstance(body, dict) else None,
                                   "" if status == 200 else data[:300].decode("utf-8", "replace")))
        finally:
            if conn is not None:
                conn.close()
            with lock:
                answers.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return Level(clients, requests, time.perf_counter() - t0, sorted(answers, key=lambda a: a.index))


def judge_level(level: Level, uploads: list[Upload]) -> dict:
    """Figures of one level; every 200 answer compared with the local prediction."""
    got = [a for a in level.answers if a.status is not None]
    ok = [a for a in got if a.status == 200]
    non200 = [a for a in got if a.status != 200]
    lost = level.requests - len(ok) - len(non200)
    mismatches, max_diff, batch_sizes = [], 0.0, {}
    for a in ok:
        exp = uploads[a.upload].expected
        body = a.body or {}
        why = ""
        if not isinstance(body.get("probs"), dict) or set(body["probs"]) != set(exp["probs"]):
            why = f"answer has no probs for {sorted(exp['probs'])}"
        else:
            diff = max(abs(float(body["probs"][c]) - float(p)) for c, p in exp["probs"].items())
            max_diff = max(max_diff, diff)
            if body.get("class") != exp["class"] or diff > PROB_ATOL:
                why = (f"served {body.get('class')} {body['probs']}, local {exp['class']} {exp['probs']} (max prob "
                       f"difference {diff:.2g})")
        if why:
            mismatches.append({"request": a.index, "file": uploads[a.upload].name, "why": why})
        b = str(body.get("batch", "?"))
        batch_sizes[b] = batch_sizes.get(b, 0) + 1
    lat = np.array([a.latency_s for a in ok]) * 1000.0
    statuses: dict[str, int] = {}
    for a in non200:
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
    return {
        "clients": level.clients, "requests": level.requests, "seconds": round(level.seconds, 3),
        "throughput_rps": round(len(ok) / level.seconds, 2) if level.seconds > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "mean_ms": round(float(lat.mean()), 2) if len(lat) else None,
        "ok": len(ok), "non200": len(non200), "statuses": statuses, "lost": lost,
        "mismatched": len(mismatches), "max_prob_diff": max_diff,
        "batch_sizes": dict(sorted(batch_sizes.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0])
                                                                         if kv[0].isdigit() else 0))),
        "examples": {"mismatch": mismatches[:5],
                     "non200": [{"request": a.index, "file": uploads[a.upload].name, "status": a.status,
                                 "error": a.error} for a in non200[:5]],
                     "lost": [{"request": a.index, "file": uploads[a.upload].name, "error": a.error}
                              for a in level.answers if a.status is None][:5]},
    }


# ---------------------------------------------------------------- local reference


def local_uploads(runner, files: list[Path], batch_size: int, top_rois: int) -> tuple[list[Upload], list[str]]:
    """Each file's bytes and its local record (as ``ctmask infer`` predicts it); files the
    local runner cannot predict are left out and named."""
    from ctmask.runtime.batch_run import PredictOptions, predict_sources
    from ctmask.scans.listing import collect_sources
    from ctmask.scans.types import Failure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs, failures = collect_sources(files)
    skipped = [f"{f.file}: {f.reason}" for f in failures]
    records: dict[str, dict] = {}
    for item in predict_sources(runner, refs, PredictOptions(batch_size, top_rois)):
        if isinstance(item, Failure):
            skipped.append(f"{item.file}: {item.reason}")
        else:
            records[item[0].key] = item[0].to_dict()
    uploads = [Upload(Path(r.path).name, Path(r.path).read_bytes(), records[r.key], r.path) for r in refs
               if r.key in records and r.frame is None]
    return uploads, skipped


def reference_throughput(runner, files: list[Path], requests: int, batch_size: int) -> dict:
    """Slices per second of the in-process runner (decode + inference, as ``ctmask infer``),
    ``requests`` slices (the files cycled) at ``batch_size``."""
    from ctmask.runtime.batch_run import PredictOptions, predict_sources
    from ctmask.scans.types import SliceRef

    refs = [SliceRef(str(files[i % len(files)])) for i in range(requests)]
    t0 = time.perf_counter()
    n = sum(1 for _ in predict_sources(runner, refs, PredictOptions(batch_size)))
    seconds = time.perf_counter() - t0
    return {"batch_size": batch_size, "slices": n, "seconds": round(seconds, 3),
            "throughput_sps": round(n / seconds, 2) if seconds > 0 else 0.0}


# ---------------------------------------------------------------- the run


def run_loadtest(model: str | Path, images: str | Path, clients: list[int], requests: int = 200,
                 url: str | None = None, replicas: int = 1, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 backend: str = "auto", device: str = "cpu", threads: int | None = None, top_rois: int = 5,
                 warmup: int = 8, timeout_s: float = 120.0, on_level=None, on_note=None) -> dict:
    """Load-test ``url`` (or a server started here on a free loopback port), see the module doc.

    Args:
        on_level: called with each level's figures as it finishes.
        on_note: called with progress notes (str).

    Returns:
        the report: ``levels`` (one dict per concurrency level), ``reference``
        (in-process throughput), ``server``, ``model``, ``passed``.

    Raises:
        ConfigError: bad options, no predictable slice in ``images``, or the server at ``url``
            serves another model.
    """
    note = on_note or (lambda text: None)
    _check_options(model, images, clients, requests, max_batch)
    model = Path(model)
    local = _local_reference(model, images, requests, max_batch, backend, device, threads, top_rois, note)
    uploads = local["uploads"]
    handle = None
    try:
        if url is None:
            from ctmask.scale.serve import start_server

            port = free_port()
            note(f"starting the server on 127.0.0.1:{port} ({replicas} replica(s), batch <= {max_batch}, "
                 f"wait {batch_wait_ms:g} ms)")
            handle = start_server(model, port=port, replicas=replicas, max_batch=max_batch,
                                  batch_wait_ms=batch_wait_ms, backend=backend, device=device, threads=threads,
                                  top_rois=top_rois)
            url = handle.url
        url = url.rstrip("/")
        meta = _server_metadata(url, model, local["sha256"], top_rois, note)
        n_replicas = int(meta.get("replicas", replicas))
        for i in range(min(warmup, len(uploads))):  # first calls of a runner are slow: not measured
            run_level(url, uploads[i : i + 1], 1, 1, timeout_s)
        levels = [_measured_level(url, uploads, c, requests, n_replicas, timeout_s, on_level) for c in clients]
        passed = all(lv["lost"] == 0 and lv["mismatched"] == 0 and lv["non200"] == 0 for lv in levels)
        return {"url": url, "server_started": handle is not None, "model": meta["model"],
                "server": {"replicas": n_replicas, "batching": meta.get("batching"), "runner": meta.get("runner")},
                "local_runner": local["runner"], "images": len(uploads), "requests_per_level": requests,
                "prob_atol": PROB_ATOL, "levels": levels, "reference": local["reference"], "passed": passed}
    finally:
        if handle is not None:
            handle.stop()


def _check_options(model: str | Path, images: str | Path, clients: list[int], requests: int, max_batch: int) -> None:
    """Refuse bad :func:`run_loadtest` options (ConfigError) before anything runs."""
    if not clients or any(c < 1 for c in clients):
        raise ConfigError(f"--clients takes concurrency levels >= 1, got {clients}")
    if requests < 1:
        raise ConfigError(f"--requests must be >= 1, got {requests}")
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"{model}: model file does not exist")
    if not Path(images).is_dir():
        raise ConfigError(f"--images {images}: not a folder")


def _local_reference(model: Path, images: str | Path, requests: int, max_batch: int, backend: str, device: str,
                     threads: int | None, top_rois: int, note) -> dict:
    """The uploads (each file's bytes and local record), the in-process reference throughput,
    the local runner's description and the model's sha256."""
    from ctmask.backends.registry import make_runner
    from ctmask.core.fileio import sha256_file
    from ctmask.runtime.predict import collect_images

    files, refused = collect_images([images])
    for f in refused:
        note(f"not used: {f.file}: {f.reason}")
    sha = sha256_file(model)
    runner = make_runner(model, backend, device, threads)
    with runner:
        uploads, skipped = local_uploads(runner, files, max_batch, top_rois)
        for s in skipped:
            note(f"not used (the local runner cannot predict it): {s}")
        if not uploads:
            raise ConfigError(f"--images {images}: no slice the local runner can predict")
        used = [Path(u.path) for u in uploads]
        note(f"reference: in-process runner ({runner.describe().get('provider', runner.name)}), {requests} slices "
             f"at batch 1 and {max_batch}")
        reference = [reference_throughput(runner, used, requests, b) for b in sorted({1, max_batch})]
        return {"uploads": uploads, "reference": reference, "runner": runner.describe(), "sha256": sha}


def _server_metadata(url: str, model: Path, sha: str, top_rois: int, note) -> dict:
    """The server's ``/metadata`` once it is healthy; ConfigError when it serves another model."""
    wait_healthy(url, 60.0)
    meta = get_json(url + "/metadata")
    if meta["model"]["sha256"] != sha:
        raise ConfigError(f"the server at {url} serves {meta['model']['file']} (sha256 "
                          f"{meta['model']['sha256'][:12]}...), not {model} ({sha[:12]}...): the answers could "
                          "not be checked against the local runner")
    if int(meta.get("top_rois", top_rois)) != top_rois:
        note(f"the server keeps {meta['top_rois']} RoI rows per answer; only class and probs are compared")
    return meta


def _measured_level(url: str, uploads: list[Upload], clients: int, requests: int, n_replicas: int,
                    timeout_s: float, on_level) -> dict:
    """One concurrency level run and judged, with the replicas' counters before and after."""
    before = collect_stats(url, n_replicas)
    level = judge_level(run_level(url, uploads, clients, requests, timeout_s), uploads)
    after = collect_stats(url, n_replicas)
    level["batches_formed"] = _delta(after["batches"], before["batches"])
    level["stats"] = {"complete": before["complete"] and after["complete"],
                      "replicas_seen": len(after["replicas"]),
                      "served": after["served"] - before["served"],
                      "requests": after["requests"] - before["requests"],
                      "predict_answers": _delta(after["predict_answers"], before["predict_answers"])}
    if on_level is not None:
        on_level(level)
    return level


def format_report(report: dict) -> str:
    """Plain-text table of a :func:`run_loadtest` report."""

    def hist(d: dict) -> str:
        return " ".join(f"{k}:{v}" for k, v in d.items()) or "-"

    srv = report["server"]
    lines = [f"bench-serve {report['url']} ({report['model']['file']}, {srv['replicas']} replica(s), batch <= "
             f"{(srv.get('batching') or {}).get('max_batch')}, wait {(srv.get('batching') or {}).get('batch_wait_ms')} "
             f"ms; {report['images']} slices, {report['requests_per_level']} requests per level)",
             f"{'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>7} {'lost':>5} {'mismatch':>8}  "
             "batch sizes (requests per size)  |  inference calls per size (/stats)"]
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for lv in report["levels"]:
        partial = "" if lv["stats"]["complete"] else f" (stats of {lv['stats']['replicas_seen']} replica(s) only)"
        lines.append(f"{lv['clients']:>7} {lv['throughput_rps']:>8.1f} {fmt(lv['p50_ms']):>8} {fmt(lv['p99_ms']):>8} "
                     f"{lv['non200']:>7} {lv['lost']:>5} {lv['mismatched']:>8}  {hist(lv['batch_sizes'])}  |  "
                     f"{hist(lv['batches_formed'])}{partial}")
        for kind, items in lv["examples"].items():
            for item in items[:3]:
                lines.append(f"        {kind}: {json.dumps(item)[:300]}")
    for ref in report["reference"]:
        lines.append(f"in-process runner, batch {ref['batch_size']}: {ref['throughput_sps']:.1f} slices/s "
                     f"({ref['slices']} slices in {ref['seconds']:.2f} s, no HTTP)")
    lines.append("PASSED" if report["passed"] else "FAILED: requests lost, mismatched or not answered 200")
    return "\n".join(lines)
