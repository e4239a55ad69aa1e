"""``ctmask serve``'s driver: checks the options and the model, starts (or joins) Ray, deploys
the HTTP application (:mod:`ctmask.scale.serve_app`, whose doc lists the endpoints and their
answers) on Ray Serve and waits until it is healthy (:func:`start_server`); :func:`run_server`
serves until SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ctmask.core.errors import ConfigError, CtmaskWarning
from ctmask.scale.http import wait_healthy
from ctmask.scale.serve_app import CtmaskModel
from ctmask.scale.serve_options import ModelInfo, ServeOptions, check_model, exposure_warning, read_token

APP_NAME = "ctmask"


def _check_port(host: str, port: int) -> None:
    """ConfigError when nothing here can listen on ``host:port`` (in use, or not this machine's address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): the port is in use or the "
                              "address is not this machine's", hint="choose another --port / --host") from None


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
        _deploy(opts, info)
        wait_healthy(handle.url, ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle


def _deploy(opts: ServeOptions, info: ModelInfo) -> None:
    """Start Serve's HTTP proxy on ``opts.host:opts.port`` and deploy the application (not
    blocking), each replica asking Ray for ``min(1, CPUs / replicas)`` CPUs."""
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    per_replica = min(1.0, cpus / opts.replicas)
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)  # serve.run's "New http_options will not be applied" is not so
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port}, logging_config=quiet)
        app = CtmaskModel.options(
            num_replicas=opts.replicas, ray_actor_options={"num_cpus": per_replica},
            max_ongoing_requests=max(32, 4 * opts.max_batch), max_constructor_retry_count=1,
        ).bind(opts, info)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    finally:
        serve_logger.setLevel(level)


class _Stopped(Exception):
    """A stop signal arrived while the server was starting (raised once Ray is up)."""


def run_server(model: str | Path, token_file: str | Path | None = None,
               echo: Callable[[str], None] = print, **options: Any) -> None:
    """Serve ``model`` until SIGINT / SIGTERM (``ctmask serve``), then shut Serve down.

    The token comes from :data:`~ctmask.scale.serve_options.TOKEN_ENV` or ``token_file``
    (:func:`~ctmask.scale.serve_options.read_token`); ``options`` are :func:`start_server`'s;
    ``echo`` takes the progress lines.

    A stop signal is a clean stop (return, exit status 0) at any moment:
    * while the model loads, our handler notes it, and the start ends as soon as Ray is up
      (Serve is never deployed);
    * while Ray starts: ``ray.init`` first installs its own SIGTERM handler, which raises
      ``SystemExit(SIGTERM)``; that is caught here and Ray shut down;
    * once Ray is up our handlers are installed again (:func:`start_server`'s
      ``on_ray_started``), through the deploy, the wait for health and serving.
    The previous handlers are restored before Serve shuts down, so a second Ctrl-C can break a
    shutdown that hangs.
    """
    token = read_token(os.environ, token_file)
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum, frame) -> None:
        stop["signal"] = signum

    def install() -> dict:
        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def ray_started() -> None:
        install()
        if stop["signal"] is not None:
            raise _Stopped

    previous = install()
    handle: ServerHandle | None = None
    try:
        handle = _start_or_stop(model, token, ray_started, stop, echo, options)
        if handle is None:
            return
        o = handle.options
        if stop["signal"] is None:
            echo(f"serving {model} on {handle.url} ({o.replicas} replica(s), batch <= {o.max_batch}, wait "
                 f"{o.batch_wait_ms:g} ms): POST {handle.url}/predict; Ctrl-C stops")
        while stop["signal"] is None:
            time.sleep(0.2)
        echo(f"{signal.Signals(stop['signal']).name}: shutting Serve down")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if handle is not None:
            handle.stop()


def _start_or_stop(model: str | Path, token: str | None, ray_started: Callable[[], None], stop: dict,
                   echo: Callable[[str], None], options: dict) -> ServerHandle | None:
    """:func:`start_server`, or ``None`` when a stop signal arrived during the start (what was
    started is shut down)."""
    try:
        return start_server(model, token=token, on_ray_started=ray_started, **options)
    except _Stopped:  # start_server stopped what it had started
        echo(f"{signal.Signals(stop['signal']).name}: stopped before Serve was deployed")
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        if ray.is_initialized():
            ray.shutdown()
        echo("SIGTERM: stopped while Ray was starting")
    return None
