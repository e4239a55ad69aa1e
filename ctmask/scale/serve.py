"""``ctmask serve``: one ctmask model behind HTTP on Ray Serve, with dynamic batching.

Each replica loads one :class:`~ctmask.runtime.runner.Runner` (any backend ``ctmask infer``
runs: onnxruntime, OpenVINO, a TensorRT ``.engine``, a checkpoint in PyTorch) and answers:

* ``POST /predict``: the raw request body is one slice (DICOM, PNG, JPEG, TIFF, BMP). It is
  streamed to a private temporary file (at most ``max_body_mb``; the ``Content-Length`` is
  checked first), found and decoded by the same readers ``ctmask infer`` uses
  (:func:`ctmask.core.readers.collect_sources`, then
  :func:`ctmask.runtime.batch_run.load_refs`), and its ``[1, 1, S, S]`` array waits for the
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

With a token (:data:`TOKEN_ENV` or ``--token-file``, never a command-line value: ``ps`` shows
those), every endpoint but ``/health`` wants ``Authorization: Bearer TOKEN`` and answers 401
without it or with another token (compared in constant time). ``/metadata`` names files only
(the model, the checkpoint it was exported from), never their folders on either machine.

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
import ipaddress
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ctmask.core.errors import ConfigError, CtmaskWarning
from ctmask.core.preprocess import DICOM_SUFFIXES, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from ctmask.core.readers import NIFTI_SUFFIXES, RASTER_SUFFIXES
from ctmask.scale.loadtest import wait_healthy

APP_NAME = "ctmask"
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

TOKEN_ENV = "CTMASK_SERVE_TOKEN"
"""Environment variable holding the bearer token (``--token-file`` names a file instead)."""
MIN_TOKEN_CHARS = 16
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: sent as is in the header


def check_token(token: str, source: str) -> str:
    """The token as sent in ``Authorization: Bearer TOKEN`` (surrounding white space removed).

    Raises:
        ConfigError: empty, shorter than :data:`MIN_TOKEN_CHARS`, or holding characters a bearer
            token cannot carry; naming ``source`` (never the token).
    """
    token = token.strip()
    make = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not token:
        raise ConfigError(f"{source} is empty: no token to check requests against", hint=make)
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(f"{source} must hold one token of at least {MIN_TOKEN_CHARS} characters among "
                          "A-Z a-z 0-9 . _ ~ + / = - (no spaces)", hint=make)
    return token


def read_token(env: Mapping[str, str], token_file: str | Path | None) -> str | None:
    """The serve token from the environment (:data:`TOKEN_ENV`) or from ``token_file``; ``None``
    when neither is set.

    Raises:
        ConfigError: both set, the file unreadable, not a regular file (a named pipe would wait for
            a writer forever) or larger than 4096 bytes, or a token :func:`check_token` refuses.
    """
    from_env = env.get(TOKEN_ENV)
    if from_env is not None and token_file is not None:
        raise ConfigError(f"a token in both {TOKEN_ENV} and --token-file: set one of them")
    if token_file is not None:
        path = Path(token_file)
        try:  # non-blocking: opening a named pipe without a writer returns at once, and is refused below
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            with open(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
                    raise ConfigError(f"--token-file {path.name} must be a regular file of at most 4096 bytes; it is "
                                      + ("not a regular file (a named pipe, a device or a folder)"
                                         if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes"), path)
                data = fh.read(4097)
        except OSError as exc:
            raise ConfigError(f"cannot read the token file ({exc.strerror or exc.__class__.__name__})", path) from None
        try:
            text = data.decode("ascii") if len(data) <= 4096 else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            raise ConfigError(f"--token-file {path.name} does not hold one token (ASCII, at most 4096 bytes)")
        return check_token(text, f"--token-file {path.name}")
    if from_env is not None:
        return check_token(from_env, TOKEN_ENV)
    return None


def is_loopback(host: str) -> bool:
    """``host`` is this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token, else ``None``."""
    if token is not None or is_loopback(host):
        return None
    return (f"--host {host} serves BEYOND THIS MACHINE WITHOUT AUTHENTICATION: anyone who reaches "
            f"{host} can run the model and read /metadata and /stats. Set {TOKEN_ENV} or --token-file, and put a "
            "reverse proxy with TLS in front (README: Serving on Ray Serve)")


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


@dataclass(frozen=True)
class ServeOptions:
    """What one server runs (the ``ctmask serve`` flags)."""

    model: str
    port: int = 8000
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    host: str = "127.0.0.1"
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_body_mb: float = 64.0
    top_rois: int = 5
    force_modality: bool = False
    hu_offset: float = 1024.0
    uncropped: bool = False
    read_timeout_s: float = 30.0
    token: str | None = field(default=None, repr=False)
    """Bearer token every endpoint but ``/health`` wants (``None``: no authentication)."""

    def check(self) -> None:
        """Refuse bad values (before anything starts).

        Raises:
            ConfigError: naming the option and the accepted range.
        """
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch must be 1..1024, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"--batch-wait-ms must be 0..10000, got {self.batch_wait_ms:g}")
        if not 0 < self.max_body_mb <= 4096:
            raise ConfigError(f"--max-body-mb must be > 0 and at most 4096, got {self.max_body_mb:g}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.top_rois < 1:
            raise ConfigError(f"--top-rois must be >= 1, got {self.top_rois}")
        if not 0 < self.read_timeout_s <= 3600:
            raise ConfigError(f"--read-timeout-s must be > 0 and at most 3600, got {self.read_timeout_s:g}")
        if self.token is not None:
            check_token(self.token, "the serve token")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned by loading the model once (before Ray starts)."""

    file: str
    sha256: str
    spec_metadata: dict
    runner: dict

    def identity(self) -> dict:
        return {"file": self.file, "sha256": self.sha256,
                "weights_sha256": self.spec_metadata.get("ctmask.weights_sha256", ""),
                "checkpoint_sha256": self.spec_metadata.get("ctmask.checkpoint_sha256", "")}


def check_model(opts: ServeOptions) -> ModelInfo:
    """Load the model once in this process: a missing file, a file that is not a ctmask
    graph, a backend that cannot run it or a cropping model fail here, as a
    :class:`~ctmask.core.errors.CtmaskError`, before Ray starts."""
    from ctmask.backends.registry import make_runner
    from ctmask.core.fileio import sha256_file

    path = Path(opts.model)
    if not path.is_file():
        raise ConfigError(f"{path}: model file does not exist" if not path.exists() else
                          f"{path}: not a model file")
    runner = make_runner(path, opts.backend, opts.device, opts.threads)
    with runner:
        spec = runner.spec
        _check_crop(spec.crop, opts.uncropped, path)
        described = runner.describe()
    return ModelInfo(path.name, sha256_file(path), spec.metadata(), described)


def _check_crop(crop: bool, uncropped: bool, path: Path) -> None:
    if crop and not uncropped:
        raise ConfigError(f"{path} was trained on slices cropped to their body box (train-cls --crop): an upload "
                          "carries no crop box", hint="serve a model trained on whole slices, or pass --uncropped "
                                                      "to run it on whole slices anyway (off its training "
                                                      "distribution)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (bound once and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): the port is in use or the "
                              "address is not this machine's", hint="choose another --port / --host") from None


# ---------------------------------------------------------------- the replica


def _error(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status, headers=headers)


def _status_of(reason: str) -> int:
    """HTTP status of a reason the readers give for refusing an upload."""
    if reason.startswith("not an image (") or reason.startswith("cannot decode image: not an image ("):
        return 415
    if "more than the maximum" in reason or reason.startswith("image declares too many pixels"):
        return 413
    return 422


def _sniff_magic(head: bytes) -> str:
    """The suffix of a PNG, JPEG or DICOM Part 10 upload known by its signature, else ``""``
    (weaker ones, TIFF's and BMP's, are left to the readers, which check them by decoding the
    header: text starting with ``BM`` stays "not an image")."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[128:132] == b"DICM":
        return ".dcm"
    return ""


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

    loaded: object  # ctmask.runtime.batch_run.Loaded with one slice


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
        from ctmask.runtime.batch_run import ReadOptions

        _replica_grpc_on_loopback()
        self.opts = opts
        self.info = info
        self.runner = make_runner(Path(opts.model), opts.backend, opts.device, opts.threads).activate()
        self.spec = self.runner.spec
        _check_crop(self.spec.crop, opts.uncropped, Path(opts.model))
        self.read_opts = ReadOptions(opts.force_modality, opts.hu_offset)
        self._batched.set_max_batch_size(opts.max_batch)
        self._batched.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000.0)
        self.tmp = Path(tempfile.mkdtemp(prefix="ctmask-serve-"))  # 0700: uploads are private
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
        from ctmask.core.readers import collect_sources
        from ctmask.runtime.batch_run import load_refs

        # One file: none of collect_sources' series warnings can apply to a slice that is kept
        # (warnings.catch_warnings is not thread-safe, so none is set here).
        refs, failures = collect_sources([path], force_modality=self.opts.force_modality)
        if failures:
            reason = clean(failures[0].reason)
            raise _Refused(_status_of(reason), reason)
        if not refs:
            raise _Refused(422, "the upload holds no slice")
        if len(refs) > 1:
            raise _Refused(422, f"one slice per request: the upload holds {len(refs)} slices (a multi-frame DICOM "
                                "or a NIfTI volume); send each slice on its own, or run `ctmask infer` on the file")
        loaded = load_refs(refs, self.spec, None, False, self.read_opts)
        if loaded.failures:
            reason = clean(loaded.failures[0].reason)
            raise _Refused(_status_of(reason), reason)
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


# ---------------------------------------------------------------- the driver


@dataclass
class ServerHandle:
    """A running server: its ``url``; :meth:`stop` shuts Serve down (and Ray, when this
    process started it)."""

    url: str
    options: ServeOptions
    model: ModelInfo
    started_ray: bool
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            serve.shutdown()
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(model: str | Path, port: int = 8000, replicas: int = 1, max_batch: int = 8,
                 batch_wait_ms: float = 10.0, host: str = "127.0.0.1", backend: str = "auto", device: str = "cpu",
                 threads: int | None = None, max_body_mb: float = 64.0, address: str | None = None,
                 top_rois: int = 5, force_modality: bool = False, hu_offset: float = 1024.0,
                 uncropped: bool = False, ready_timeout_s: float = 180.0,
                 read_timeout_s: float = 30.0, token: str | None = None,
                 on_ray_started: Callable[[], None] | None = None) -> ServerHandle:
    """Serve ``model`` on ``http://host:port`` with ``replicas`` replicas; returns once
    ``/health`` answers 200.

    Options are checked and the model is loaded once here first (a bad option, a missing
    model, a file that is not a ctmask graph or a backend that cannot run it raise a
    :class:`~ctmask.core.errors.CtmaskError` before Ray starts). Then a new local Ray starts
    (``ray.init`` with this machine's CPUs, no dashboard), or the cluster at ``address`` is
    joined (a Ray already initialised in this process is used as it is), Serve's HTTP proxy
    listens on ``host:port`` and the application is deployed (``serve.run(...,
    blocking=False)``).

    Each replica asks Ray for ``min(1, CPUs / replicas)`` CPUs: fractional CPUs are fine for
    Ray's scheduling (they only decide how many replicas fit), so R replicas always fit the
    cluster's CPUs; the inference threads are set apart from that: ``threads`` per replica,
    by default the backend's own choice for one replica and this machine's cores divided among
    the replicas (at least 1) for several.

    Args:
        model: ONNX graph, TensorRT ``.engine`` or checkpoint (as ``ctmask infer``).
        max_batch, batch_wait_ms: the batcher: at most ``max_batch`` requests per inference
            call, waiting at most ``batch_wait_ms`` for them after the first.
        max_body_mb: largest request body (413 above it).
        read_timeout_s: how long the body may stall (no new bytes) before a 408.
        uncropped: serve a model trained on body-cropped slices on whole slices (uploads carry
            no crop box; refused otherwise).
        token: the bearer token every endpoint but ``/health`` wants (401 without it); ``None``
            serves without authentication, with a :class:`~ctmask.core.errors.CtmaskWarning`
            when ``host`` is not a loopback address.
        on_ray_started: called once Ray is up, before Serve starts. ``ray.init`` installs Ray's
            own SIGTERM handler (it aborts the process); a caller that stops on SIGTERM
            installs its handler again here, so that a signal during Serve's start is its own.

    A local Ray started here listens on 127.0.0.1 only, whatever ``host`` is
    (:func:`ctmask.scale.ray_batch.init_ray`); only Serve's HTTP proxy listens on ``host``.

    Raises:
        ConfigError: a bad option, or the port in use.
        ModelError / CtmaskError: the model cannot be loaded.
        ServerError: Serve did not become healthy within ``ready_timeout_s``.
    """
    if threads is None and replicas > 1:
        threads = max(1, (os.cpu_count() or 1) // replicas)
    opts = ServeOptions(str(model), port, replicas, max_batch, float(batch_wait_ms), host, backend, device, threads,
                        float(max_body_mb), top_rois, force_modality, hu_offset, uncropped, float(read_timeout_s),
                        token)
    opts.check()
    exposed = exposure_warning(host, token)
    if exposed:
        warnings.warn(exposed, CtmaskWarning, stacklevel=2)
    info = check_model(opts)
    _check_port(host, port)
    started_ray = False
    if not ray.is_initialized():
        from ctmask.scale.ray_batch import init_ray

        # a cluster at `address` (checked: nothing listening fails at once), or a new local one,
        # never a cluster someone else started on this machine
        init_ray(address or None, logging.WARNING)
        started_ray = True
    handle = ServerHandle(f"http://{host}:{port}", opts, info, started_ray)
    try:
        if on_ray_started is not None:
            on_ray_started()
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        per_replica = min(1.0, cpus / replicas)
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve_logger = logging.getLogger("ray.serve")
        level = serve_logger.level
        serve_logger.setLevel(logging.WARNING)  # serve.run's "New http_options will not be applied" is not so
        try:
            serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
            app = CtmaskModel.options(
                num_replicas=replicas, ray_actor_options={"num_cpus": per_replica},
                max_ongoing_requests=max(32, 4 * max_batch), max_constructor_retry_count=1,
            ).bind(opts, info)
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
        finally:
            serve_logger.setLevel(level)
        wait_healthy(handle.url, ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle
