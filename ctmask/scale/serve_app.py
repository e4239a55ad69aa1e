"""The HTTP application of ``ctmask serve``: one ctmask model behind HTTP on Ray Serve, with
dynamic batching (the driver that starts it: :mod:`ctmask.scale.serve`).

Each replica loads one :class:`~ctmask.runtime.runner.Runner` (any backend ``ctmask infer``
runs: onnxruntime, OpenVINO, a TensorRT ``.engine``, a checkpoint in PyTorch) and answers:

* ``POST /predict``: the raw request body is one slice (DICOM, PNG, JPEG, TIFF, BMP). It is
  streamed to a private temporary file (at most ``max_body_mb``; the ``Content-Length`` is
  checked first), found and decoded by the same readers ``ctmask infer`` uses
  (:func:`ctmask.scans.listing.collect_sources`, then
  :func:`ctmask.scans.batch.load_batch`), and its ``[1, 1, S, S]`` array waits for the
  batcher (``@serve.batch``): the requests that arrive within ``batch_wait_ms`` (up to
  ``max_batch``) run as one ``runner.infer`` call, and each request's record is made by
  :func:`ctmask.runtime.batch_run.slice_predictions`, as ``infer`` makes it. The answer is
  200 JSON: ``class``, ``class_index``, ``probs``, ``top_rois``, ``top_boxes`` (the top RoIs'
  boxes in the uploaded slice's own pixels), ``n_rois``, ``size``, ``kind``, ``batch`` (how
  many requests ran in that inference call), ``model`` (file name, its sha256, the weights'
  digest) and ``replica``.
* ``GET /health``: 200 once the runner is loaded; ``GET /metadata``: the graph spec metadata,
  ``runner.describe()``, the limits and the batching settings; ``GET /stats``: this
  replica's counters (answers by status, batches formed by size) with its id. Requests reach
  replicas at random: a caller that wants every replica's counters asks until it has seen
  ``replicas`` ids (:func:`ctmask.scale.loadtest.collect_stats`).

With a token (:data:`~ctmask.scale.serve_options.TOKEN_ENV` or ``--token-file``, never a
command-line value: ``ps`` shows those), every endpoint but ``/health`` wants ``Authorization:
Bearer TOKEN`` and answers 401 without it or with another token (compared in constant time).
``/metadata`` names files only (the model, the checkpoint it was exported from), never their
folders on either machine.

Every error is JSON ``{"error": reason, "status": code}``: 400 empty body, 401 no or wrong token, 404 unknown path,
405 wrong method, 408 nothing of the body arrived for ``read_timeout_s``, 499 (counted, nobody
reads it) the client closed the connection first, 413 body over the limit or an image
declaring more than 8192 px a side (the readers' limit, refused before decoding), 415 not an
image, DICOM or NIfTI file, 422 a file the readers refuse (truncated or corrupt, a DICOM of
another modality, a localizer, no pixels, too small) or that holds more than one slice
(multi-frame DICOM, NIfTI volume: one slice per request). An upload never causes a 500: a
500 is the server's own failure (the runner failing). A request Ray Serve's HTTP server
cannot parse (a Content-Length that is not a number) gets its plain-text 400 before it
reaches the replica.

The body limit protects the replica (memory, the temporary file, the decoders): a body
declaring more is refused on its Content-Length before a byte of it is read, a chunked one
is cut at the limit. Ray Serve's HTTP proxy still receives whatever the client sends (it
queues the request's messages for the replica), so a server exposed beyond trusted clients
wants a reverse proxy with its own body cap in front.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ctmask.core.errors import TooLargeError, UnsupportedFileError
from ctmask.core.preprocess import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from ctmask.scale.serve_options import ModelInfo, ServeOptions, check_crop
from ctmask.scans.sniff import DICOM_SUFFIXES, NIFTI_SUFFIXES, RASTER_SUFFIXES, magic
from ctmask.scans.types import Failure

DEPLOYMENT_NAME = "CtmaskModel"

CONTENT_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/tiff": ".tif",
                 "image/bmp": ".bmp", "application/dicom": ".dcm"}
"""Content-Type -> the suffix the upload is saved with (so it is read as ``infer`` reads a file
of that suffix). Other types (``application/octet-stream``) leave the readers to tell the file
type from its content, as they do for PACS files without a suffix."""

KNOWN_SUFFIXES = (*RASTER_SUFFIXES, *DICOM_SUFFIXES, *NIFTI_SUFFIXES)

ROUTES = {"/predict": "POST", "/health": "GET", "/metadata": "GET", "/stats": "GET"}
OPEN_ROUTES = ("/health",)
"""Answered without the token (load balancers and orchestrators probe it)."""


def _authorized(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").strip().partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


_ABSOLUTE = re.compile(r"^(/|\\\\|[A-Za-z]:[\\/])")
_NAME_ONLY_KEYS = ("ctmask.checkpoint", "model")


def file_name(path: str) -> str:
    """The last component of a POSIX or Windows path (the machine that wrote it may be either)."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


def without_paths(obj):
    """``obj`` (nested dicts and lists) with every absolute path, and the values of
    ``ctmask.checkpoint`` and ``model``, reduced to file names: what a server tells its
    clients names no folder of this machine or the one that exported the model."""
    if isinstance(obj, dict):
        return {k: file_name(v) if k in _NAME_ONLY_KEYS and isinstance(v, str) else without_paths(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_paths(v) for v in obj]
    if isinstance(obj, str) and _ABSOLUTE.match(obj):
        return file_name(obj)
    return obj



# ---------------------------------------------------------------- the replica


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status, headers=headers)


def _status_of(failure: Failure) -> int:
    """HTTP status of an upload the readers refused, by the type of their error (never its text): 413
    too large, 415 not an image, DICOM or NIfTI file, 422 any other refusal."""
    if issubclass(failure.error, TooLargeError):
        return 413
    if issubclass(failure.error, UnsupportedFileError):
        return 415
    return 422


def _sniff_magic(head: bytes) -> str:
    """The suffix of a PNG, JPEG or DICOM Part 10 upload known by its signature, else ``""``
    (weaker ones, TIFF's and BMP's, are left to the readers, which check them by decoding the
    header: text starting with ``BM`` stays "not an image"), by the readers' sniffer
    (:func:`ctmask.scans.sniff.magic`)."""
    return {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}.get(magic(head), "")


def _suffix_hint(request: Request, head: bytes) -> str:
    """The suffix the upload is saved with: what its signature says (PNG, JPEG, DICOM Part 10),
    else the X-Filename header's, else the Content-Type's,
    else ``.nii`` / ``.nii.gz`` for NIfTI (which the readers know by suffix only), else none
    (the readers then tell DICOM and raster images by their content)."""
    sniffed = _sniff_magic(head)
    if sniffed:
        return sniffed
    name = (request.headers.get("x-filename") or request.query_params.get("filename") or "").lower()
    for suffix in sorted(KNOWN_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in CONTENT_TYPES:
        return CONTENT_TYPES[ctype]
    if head[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return ".nii"
    return ""


@dataclass
class _Upload:
    """One decoded upload, waiting for its batch."""

    loaded: object  # ctmask.scans.batch.Loaded with one slice


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _replica_grpc_on_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on ``[::]:0`` (every
    interface) whatever the node's address (Ray 2.60, ``ray.serve._private.replica``). On a node
    whose address is the loopback (the local clusters ctmask starts) nothing beyond this machine
    may reach it: called in the replica's constructor, before Serve starts that server, this
    binds it to 127.0.0.1. A node with a network address (``--address``) is left as Ray makes it."""
    from ray.util import get_node_ip_address

    if get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "ctmask_loopback", False):
        return  # another Ray: tests/test_exposure.py tells whether it still listens beyond the loopback

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    on_loopback.ctmask_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


@serve.deployment(name=DEPLOYMENT_NAME)
class CtmaskModel:
    """One replica: one activated runner, the batcher and this replica's counters."""

    def __init__(self, opts: ServeOptions, info: ModelInfo):
        from ctmask.backends.registry import make_runner
        from ctmask.scans.batch import ReadOptions

        _replica_grpc_on_loopback()
        self.opts = opts
        self.info = info
        self.runner = make_runner(Path(opts.model), opts.backend, opts.device, opts.threads).activate()
        self.spec = self.runner.spec
        check_crop(self.spec.crop, opts.uncropped, Path(opts.model))
        self.read_opts = ReadOptions(opts.force_modality, opts.hu_offset)
        self._batched.set_max_batch_size(opts.max_batch)
        self._batched.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000.0)
        # 0700: uploads are private; the port names the server the folder belongs to
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ctmask-serve-{opts.port}-"))
        # a 260 KB PNG can declare 8192 x 8192 RGBA (256 MiB decoded): at most this many decodes at
        # once in this replica
        self.decoding = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (a direct call): name it by process
            self.replica = f"pid-{os.getpid()}"
        self.started = time.time()
        self.predict_answers: dict[int, int] = {}  # /predict answers by status
        self.errors: dict[int, int] = {}  # every endpoint's error answers by status
        self.batches: dict[int, int] = {}  # inference calls by batch size
        self.ready = True

    def __del__(self) -> None:
        tmp = getattr(self, "tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.deactivate()

    # -------------------------------------------------------------- routing

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        method = request.method.upper()
        want = ROUTES.get(path)
        token = self.opts.token
        if token is not None and path not in OPEN_ROUTES and not _authorized(request.headers.get("authorization"),
                                                                             token):
            response = _error(401, "this server wants a token: send the header 'Authorization: Bearer TOKEN'",
                              headers={"WWW-Authenticate": 'Bearer realm="ctmask"'})
        elif want is None:
            response = _error(404, f"no such endpoint {path!r}; endpoints: POST /predict, GET /health, "
                                   "GET /metadata, GET /stats")
        elif method != want and not (want == "GET" and method == "HEAD"):
            response = _error(405, f"{path} takes {want}, not {method}", headers={"Allow": want})
        elif path == "/predict":
            try:
                response = await self._predict(request)
            except ray.exceptions.TaskCancelledError:  # Ray cancels a request whose client disconnected
                response = _error(499, "the client closed the connection before the answer")
            except asyncio.CancelledError:  # ... or cancels this coroutine itself: counted, then let go
                self.predict_answers[499] = self.predict_answers.get(499, 0) + 1
                self.errors[499] = self.errors.get(499, 0) + 1
                raise
            except Exception as exc:  # a bug of the server, never the upload's doing: still a JSON answer
                logging.getLogger("ray.serve").exception("ctmask: /predict failed")
                response = _error(500, f"internal error ({exc.__class__.__name__}: {exc})")
        elif path == "/health":
            response = (JSONResponse({"status": "ok", "replica": self.replica}) if self.ready and
                        self.runner.is_active else _error(503, "the runner is not loaded"))
        elif path == "/metadata":
            response = JSONResponse(self.metadata())
        else:
            response = JSONResponse(self.stats())
        code = response.status_code
        if path == "/predict" and want is not None and method == want:
            self.predict_answers[code] = self.predict_answers.get(code, 0) + 1
        if code >= 400:
            self.errors[code] = self.errors.get(code, 0) + 1
        return response

    def metadata(self) -> dict:
        o = self.opts
        return {"model": self.info.identity(), "spec": without_paths(self.spec.metadata()),
                "runner": without_paths(self.runner.describe()),
                "replica": self.replica, "replicas": o.replicas,
                "batching": {"max_batch": o.max_batch, "batch_wait_ms": o.batch_wait_ms},
                "limits": {"max_body_mb": o.max_body_mb, "max_body_bytes": o.max_body_bytes,
                           "image_side": [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE], "slices_per_request": 1},
                "read": {"force_modality": o.force_modality, "hu_offset": o.hu_offset, "uncropped": o.uncropped},
                "top_rois": o.top_rois}

    def stats(self) -> dict:
        """This replica's counters: ``requests`` (POST /predict received), ``served`` (answered
        200), ``predict_answers`` (/predict by status), ``errors`` (every endpoint's error
        answers by status) and ``batches`` (inference calls by batch size)."""
        return {"replica": self.replica, "uptime_s": round(time.time() - self.started, 3),
                "requests": sum(self.predict_answers.values()), "served": self.predict_answers.get(200, 0),
                "predict_answers": {str(k): v for k, v in sorted(self.predict_answers.items())},
                "errors": {str(k): v for k, v in sorted(self.errors.items())},
                "batches": {str(k): v for k, v in sorted(self.batches.items())}}

    # -------------------------------------------------------------- /predict

    async def _predict(self, request: Request) -> JSONResponse:
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.tmp)
        paths = [Path(name)]
        try:
            try:
                head = await self._receive(request, fd)
                suffix = _suffix_hint(request, head)
                if suffix:
                    paths.append(paths[0].with_name(paths[0].name + suffix))
                    os.replace(paths[0], paths[-1])
                async with self.decoding:  # bounds the memory concurrent decodes take
                    upload = await asyncio.to_thread(self._decode, paths[-1])
            except _Refused as exc:
                return _error(exc.status, exc.reason)
            try:
                pred, batch = await self._batched(upload)
            except ray.exceptions.TaskCancelledError:
                raise  # the client went away: answered 499 in __call__, not the runner's failure
            except Exception as exc:  # the runner failed: the server's fault, not the upload's
                return _error(500, f"inference failed ({exc.__class__.__name__}: {exc})")
            rec = pred.to_dict()
            body = {k: rec[k] for k in ("class", "class_index", "probs", "top_rois", "top_boxes", "n_rois", "size",
                                        "kind") if k in rec}
            body.update(batch=batch, model=self.info.identity(), replica=self.replica)
            filename = request.headers.get("x-filename") or request.query_params.get("filename")
            if filename:
                body["filename"] = filename
            return JSONResponse(body)
        finally:
            for p in paths:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    async def _receive(self, request: Request, fd: int) -> bytes:
        """Stream the body into ``fd`` (closed on return), at most ``max_body_bytes``; the head
        (first 348 bytes) is returned for the type hint."""
        limit = self.opts.max_body_bytes
        too_big = f"request body is larger than the limit of {self.opts.max_body_mb:g} MiB ({limit} bytes)"
        with os.fdopen(fd, "wb") as fh:
            declared = request.headers.get("content-length")
            if declared is not None:
                try:
                    n = int(declared)
                except ValueError:
                    raise _Refused(400, f"bad Content-Length header {declared[:40]!r}") from None
                if n > limit:
                    raise _Refused(413, too_big + f": Content-Length says {n}")
                if n <= 0:
                    raise _Refused(400, "empty request body: send the slice's file (DICOM, PNG, JPEG, TIFF) as the "
                                        "body")
            got = {"total": 0, "head": b""}

            async def pump() -> None:
                pieces = request.stream().__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(pieces.__anext__(), timeout=self.opts.read_timeout_s)
                    except StopAsyncIteration:
                        return
                    if not chunk:
                        continue
                    got["total"] += len(chunk)
                    if got["total"] > limit:
                        raise _Refused(413, too_big)
                    if len(got["head"]) < 348:
                        got["head"] += chunk[: 348 - len(got["head"])]
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise _Refused(503, f"the server cannot store the upload now ({exc.strerror or exc})") from None

            try:
                # a deadline for each piece of the body: a client that declares more than it sends
                # holds one of the replica's request slots until then, not forever; a slow but
                # steady upload goes on (the body limit bounds how long it can take)
                await pump()
            except ClientDisconnect:
                raise _Refused(400, "the client went away before the body was complete") from None
            except asyncio.TimeoutError:
                raise _Refused(408, f"the request body stalled: nothing arrived for {self.opts.read_timeout_s:g} s "
                                    f"({got['total']} bytes received)") from None
            total, head = got["total"], got["head"]
        if total == 0:
            raise _Refused(400, "empty request body: send the slice's file (DICOM, PNG, JPEG, TIFF) as the body")
        return head

    def _decode(self, path: Path) -> _Upload:
        """Find and decode the upload's slice exactly as ``ctmask infer`` does (on a worker thread).

        Raises:
            _Refused: with the readers' reason; anything else a decoder raises is the
                upload's failure too (422), as it is a file's failure in ``infer``.
        """

        def clean(reason: str) -> str:
            return reason.replace(str(path), "the upload").replace(path.name, "the upload")

        try:
            return self._decode_checked(path, clean)
        except _Refused:
            raise
        except MemoryError:
            raise _Refused(413, "out of memory decoding the upload") from None
        except Exception as exc:
            raise _Refused(422, clean(f"cannot read the upload ({exc.__class__.__name__}: {exc})")) from None

    def _decode_checked(self, path: Path, clean) -> _Upload:
        from ctmask.scans.batch import load_batch
        from ctmask.scans.listing import collect_sources

        # One file: none of collect_sources' series warnings can apply to a slice that is kept
        # (warnings.catch_warnings is not thread-safe, so none is set here).
        refs, failures = collect_sources([path], force_modality=self.opts.force_modality)
        if failures:
            reason = clean(failures[0].reason)
            raise _Refused(_status_of(failures[0]), reason)
        if not refs:
            raise _Refused(422, "the upload holds no slice")
        if len(refs) > 1:
            raise _Refused(422, f"one slice per request: the upload holds {len(refs)} slices (a multi-frame DICOM "
                                "or a NIfTI volume); send each slice on its own, or run `ctmask infer` on the file")
        loaded = load_batch(refs, self.spec, None, False, self.read_opts)
        if loaded.failures:
            reason = clean(loaded.failures[0].reason)
            raise _Refused(_status_of(loaded.failures[0]), reason)
        return _Upload(loaded)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, uploads: list[_Upload]) -> list[tuple[object, int]]:
        """One ``runner.infer`` call for the requests that arrived together (settings: __init__)."""
        from ctmask.core.spec import INPUT
        from ctmask.runtime.batch_run import slice_predictions

        batch = np.concatenate([u.loaded.batch for u in uploads])
        outputs = await asyncio.to_thread(self.runner.infer, {INPUT: batch})
        n = len(uploads)
        self.batches[n] = self.batches.get(n, 0) + 1
        results = []
        for i, u in enumerate(uploads):
            one = {k: v[i : i + 1] for k, v in outputs.items()}
            results.append((slice_predictions(u.loaded, one, self.spec, self.opts.top_rois)[0], n))
        return results
