"""Batch inference on Ray Data: ``ctmask infer --ray``.

The same pipeline as :func:`ctmask.runtime.batch_run.predict_sources`, spread over a Ray
cluster (a local one that ctmask starts, or one it joins with ``--address``):

1. **Listing**: the driver walks the inputs (:func:`ctmask.scans.listing.list_inputs`, no file
   opened); every file's headers are probed in Ray tasks (:func:`~ctmask.scans.listing.probe_file`);
   the driver groups DICOM series and orders them (:func:`~ctmask.scans.listing.assemble`), so
   the slices, their order and the refused files are exactly the local ones.
2. **Decoding and pre-processing** in Ray tasks, one chunk of ``batch_size`` slices each
   (:func:`~ctmask.scans.batch.load_batch`: crop, resize; unreadable slices are failures).
3. **Inference** in an actor pool (``map_batches`` with a callable class): each actor builds
   one :class:`~ctmask.runtime.runner.Runner` (onnxruntime, OpenVINO or TensorRT) once and
   runs one chunk per call, so every runner call sees exactly the batch the local path would
   (same slices, same batch size: same numbers).
4. The driver takes the chunks as they finish and yields predictions **in input order**.

Fault tolerance is Ray's: an actor that dies (killed, out of memory, node lost) is restarted
and the chunks it held are run again (``max_restarts=-1``, ``max_task_retries=-1``); a chunk
is yielded once, whatever the retries (a chunk delivered twice is counted in
:attr:`RayStats.duplicates` and dropped). Input paths must be readable on every node (a
shared file system) and ctmask installed there (see docs/scale-out/ray.md: ``ray job submit``).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError, CtmaskError, CtmaskWarning, RayError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.batch_run import slice_predictions
from ctmask.runtime.predict import CropBoxes, Prediction, check_crop
from ctmask.scans.batch import ReadOptions, load_batch
from ctmask.scans.types import Failure, SliceRef

PROBE_CHUNK = 64
"""Files per listing task."""
DECODE_CPUS = 0.5
"""Logical CPUs a decoding task reserves (decoding is a small share of the work: ~6 % on the
small preset; a fraction leaves the cores to the actors)."""


CONNECT_TIMEOUT_S = 120.0
"""How long joining a Ray cluster at ``--address`` may take before ctmask gives up."""
MIN_RAY = (2, 59)
"""Oldest Ray ctmask starts a local cluster with: the first release whose new local clusters turn
Ray's token authentication on by default (``RAY_AUTH_MODE=token`` unless set otherwise)."""
LOOPBACK = "127.0.0.1"
"""The one address every server of a local cluster ctmask starts listens on."""
MAX_DEFAULT_CPU_ACTORS = 16
"""Most CPU actors the default pool makes (each holds its own copy of the model, ~0.5 GB for the
small preset); ``--actors`` sets any number."""


@dataclass(frozen=True)
class RayOptions:
    """``infer --ray`` settings.

    Attributes:
        address: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); ``None``
            starts a local one for the run (all the machine's cores).
        actors: inference actors (default: one per GPU with ``gpus_per_actor``; else one per
            CPU of the cluster, less what decoding reserves, at most
            :data:`MAX_DEFAULT_CPU_ACTORS`: on 2 cores, 2 actors of one thread ran 1.18x faster
            than one actor of two threads).
        gpus_per_actor: GPUs each actor reserves (0: CPU inference).
        cpus_per_actor: CPUs each actor reserves (default: the cluster's CPUs, less what
            decoding needs, shared by the actors); onnxruntime / OpenVINO use that many threads
            unless ``--threads`` says otherwise.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if not (0 <= self.gpus_per_actor <= 64):  # also refuses nan
            raise ConfigError(f"--gpus-per-actor must be in [0, 64], got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None and not (0 < self.cpus_per_actor <= 1024):
            raise ConfigError(f"--cpus-per-actor must be in (0, 1024], got {self.cpus_per_actor}")


@dataclass
class RayStats:
    """What the Ray job did, for the summary.

    Attributes:
        cluster: CPUs and GPUs of the cluster; ``started``: ctmask started it for this run.
        actors / cpus_per_actor / gpus_per_actor / threads: the actor pool.
        chunks: chunks of ``batch_size`` slices run; ``duplicates``: chunks delivered more
            than once (dropped); ``by_worker``: chunks per actor process (``node:pid``; more
            processes than actors means actors were restarted).
        runner: one actor's ``runner.describe()``.
        listing_seconds: listing and probing the inputs.
    """

    cluster: dict = field(default_factory=dict)
    started: bool = False
    actors: int = 0
    cpus_per_actor: float = 0.0
    gpus_per_actor: float = 0.0
    threads: int | None = None
    chunks: int = 0
    duplicates: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)
    runner: dict = field(default_factory=dict)
    listing_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "started_local_cluster": self.started, "actors": self.actors,
                "cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor,
                "threads": self.threads, "chunks": self.chunks, "duplicates_dropped": self.duplicates,
                "chunks_by_worker": self.by_worker, "listing_seconds": round(self.listing_seconds, 3)}


def _ray():
    import ray  # the `ray` extra; user_errors names it when missing
    import ray.data

    return ray


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _quiet_data_context() -> None:
    """No Ray Data progress bars, plan dumps or notices on the terminal (ctmask draws its own
    progress); errors still print. Ray Data sets its loggers' levels when a dataset first
    runs, so filters, not levels."""
    ray = _ray()
    # Ray Data logs from its own threads, also while a failed run is being reported: a log record
    # that cannot be written (its stream replaced or closed) must not print logging's own
    # "--- Logging error ---" traceback into the user's output (the production setting).
    logging.raiseExceptions = False
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for attr in ("print_on_execution_start", "enable_operator_progress_bars"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    for name in ("ray.data._internal.progress", "ray.data._internal.progress.logging_progress",
                 "ray.data._internal.execution.streaming_executor", "ray.data.dataset", "ray.data.context"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())


def check_address(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) address where nothing listens, within
    ``timeout_s``: ``ray.init`` would retry for minutes. ``auto`` and other forms are left to Ray.

    Raises:
        RayError: naming the address.
    """
    import socket

    target = address.strip().removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host or (":" in host and not host.startswith("[")):
        return  # "auto", no port, or an IPv6 address without brackets: Ray's to judge
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayError(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                       f"({exc.strerror or exc.__class__.__name__})",
                       hint="start one with `ray start --head` (its address is HEAD:6379), use --address auto "
                            "inside a Ray job, or leave out --address for a local cluster") from None


def check_ray_version(version: str) -> None:
    """Refuse to start a local cluster on a Ray older than :data:`MIN_RAY`.

    Raises:
        RayError: naming the version found and the one needed.
    """
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if len(parts) == 2 and tuple(parts) >= MIN_RAY:
        return
    need = ".".join(map(str, MIN_RAY))
    raise RayError(f"Ray {version} is installed; ctmask starts local clusters on Ray >= {need} only (older ones run "
                   "without token authentication, and anyone who reaches their ports can run code on this machine)",
                   hint=f"pip install -U 'ray[data,serve]>={need}'")


@contextmanager
def _loopback_node() -> Iterator[dict]:
    """While a local cluster starts: Ray takes 127.0.0.1 as this node's address, so its servers
    (GCS, raylet and object manager, workers, dashboard head and agent, runtime-env agent,
    metrics exporters) listen on the loopback only. On Linux Ray replaces a loopback node
    address by the machine's network one unless its single-machine mode is on (the default on
    macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): that mode is set for this
    process while ``ray.init`` runs and for the processes it spawns, then restored, so joining a
    cluster later is unaffected."""
    from ray._private import ray_constants

    env = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before = os.environ.get(env), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
    finally:
        if before[0] is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = before[0]
        ray_constants.ENABLE_RAY_CLUSTER = before[1]


def init_ray(address: str | None, logging_level: int = logging.ERROR) -> None:
    """Join the cluster at ``address`` (checked first), or start a new local one with this
    machine's cores (``address="local"``: never a cluster someone else started here).

    A local cluster listens on 127.0.0.1 only (every server Ray starts for it) and runs with
    Ray's token authentication unless ``RAY_AUTH_MODE`` says otherwise (Ray >= 2.59's default).

    Raises:
        RayError: the cluster cannot be joined; a local one cannot be started on this Ray or did
            not come up on the loopback.
    """
    ray = _ray()
    kwargs: dict = {"include_dashboard": False, "logging_level": logging_level, "log_to_driver": True,
                    "configure_logging": True}
    if address is not None:
        address = address.strip()
        check_address(address)
    else:
        check_ray_version(ray.__version__)
        if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
            warnings.warn("RAY_AUTH_MODE=disabled: the local Ray cluster runs without token authentication; it "
                          "listens on 127.0.0.1 only, but anyone on this machine can run code through it",
                          CtmaskWarning, stacklevel=2)
    what = f"join the Ray cluster at {address!r}" if address else "start Ray"
    hint = "start one with `ray start --head`, or leave out --address for a local one"
    outcome: dict = {}

    def connect() -> None:
        try:
            if address is not None:
                ray.init(address=address, **kwargs)
            else:
                with _loopback_node() as loopback:
                    ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs, **loopback)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    if address is None:
        # Starting a local cluster spawns its processes with a parent-death signal tied to the
        # spawning *thread*: it must be this (long-lived) one.
        connect()
    else:
        # Something that listens at the address but is no Ray head makes ray.init retry for
        # minutes: joining (no process is spawned) runs on a daemon thread, given up after
        # CONNECT_TIMEOUT_S.
        thread = threading.Thread(target=connect, name="ctmask-ray-init", daemon=True)
        thread.start()
        thread.join(CONNECT_TIMEOUT_S)
        if thread.is_alive():
            raise RayError(f"cannot {what}: no answer within {CONNECT_TIMEOUT_S:g} s", hint=hint)
    exc = outcome.get("error")
    if isinstance(exc, (ConnectionError, TimeoutError, RuntimeError, ValueError)):
        raise RayError(f"cannot {what} ({_ray_reason(exc)})", hint=hint) from None
    if exc is not None:
        raise exc
    if address is None and (node := _node_address()) != LOOPBACK:
        # fail closed: a Ray whose local node is not on the loopback exposes its servers
        ray.shutdown()
        raise RayError(f"the local Ray cluster came up on {node}, not {LOOPBACK}: its servers would listen beyond "
                       "this machine", hint="report this with `ray --version`; until then use --address with a "
                                            "cluster you secured")


def _node_address() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


@contextmanager
def ray_cluster(address: str | None, stats: RayStats | None = None) -> Iterator[None]:
    """Use the Ray already initialised in this process, join ``address``, or start a local
    cluster for the block (and shut down only what was started here)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        init_ray(address)
        started = True
    if stats is not None:
        res = ray.cluster_resources()
        stats.cluster = {"cpus": float(res.get("CPU", 0)), "gpus": float(res.get("GPU", 0)),
                         "nodes": len([n for n in ray.nodes() if n.get("Alive")])}
        stats.started = started and address is None
    _quiet_data_context()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- listing


@contextmanager
def _driver_dir(cwd: str) -> Iterator[None]:
    """Run a task in the driver's working directory, where relative input paths point (the
    records keep the paths as given); on another node, where that folder does not exist,
    paths must be absolute on a shared file system."""
    here = os.getcwd()
    moved = cwd != here and os.path.isdir(cwd)
    if moved:
        os.chdir(cwd)
    try:
        yield
    finally:
        if moved:
            os.chdir(here)


def _probe_chunks(batch: dict[str, np.ndarray], force_modality: bool, cwd: str) -> dict[str, np.ndarray]:
    """Ray task: probe one chunk of files (pickled :class:`FileTask` lists in, probes out)."""
    from ctmask.scans.listing import probe_file

    with _driver_dir(cwd):
        out = [pickle.dumps([probe_file(t, force_modality) for t in pickle.loads(blob)]) for blob in batch["tasks"]]
    return {"n": batch["n"], "probes": np.array(out, dtype=object)}


def collect_sources_ray(inputs: list[str | Path], force_modality: bool = False,
                        stats: RayStats | None = None) -> tuple[list[SliceRef], list[Failure]]:
    """:func:`ctmask.scans.listing.collect_sources` with the files probed in Ray tasks (call inside
    :func:`ray_cluster`): the same slices, order and failures."""
    from ctmask.scans.listing import collect_sources

    _quiet_data_context()
    t0 = time.perf_counter()

    def probe_all(tasks: list) -> list:
        if not tasks:
            return []
        ray = _ray()
        chunks = [tasks[i : i + PROBE_CHUNK] for i in range(0, len(tasks), PROBE_CHUNK)]
        # Paths travel pickled: Arrow strings are UTF-8 and a file name need not be.
        ds = ray.data.from_items([{"n": n, "tasks": pickle.dumps(c)} for n, c in enumerate(chunks)],
                                 override_num_blocks=min(len(chunks), 200))
        ds = ds.map_batches(_probe_chunks, fn_kwargs={"force_modality": force_modality, "cwd": os.getcwd()},
                            batch_size=1, batch_format="numpy", num_cpus=DECODE_CPUS)
        done: dict[int, list] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for n, blob in zip(batch["n"], batch["probes"]):
                done.setdefault(int(n), pickle.loads(blob))
        missing = [n for n in range(len(chunks)) if n not in done]
        if missing:
            raise RayError(f"the Ray listing lost {len(missing)} chunk(s) of files")
        return [p for n in range(len(chunks)) for p in done[n]]

    try:
        return collect_sources(inputs, force_modality, probe_all=probe_all)
    finally:
        if stats is not None:
            stats.listing_seconds = time.perf_counter() - t0


# ---------------------------------------------------------------- decoding and inference


def _decode_chunks(batch: dict[str, np.ndarray], spec: GraphSpec, boxes: CropBoxes | None, keep_pixels: bool,
                   opts: ReadOptions, cwd: str) -> dict[str, np.ndarray]:
    """Ray task: decode and pre-process one chunk of slices (a pickled ``Loaded`` out)."""
    with _driver_dir(cwd):
        out = [pickle.dumps(load_batch(pickle.loads(blob), spec, boxes, keep_pixels, opts), protocol=5)
               for blob in batch["refs"]]
    return {"n": batch["n"], "loaded": np.array(out, dtype=object)}


class ChunkPredictor:
    """The actor class: one runner per actor, built once, one chunk per call.

    Args:
        model: ONNX graph or TensorRT engine.
        backend / device / threads: as ``infer``'s options.
        top_rois: RoI rows kept per slice.
        overlays: folder for overlay PNGs (drawn here, where the pixels are), or ``None``:
            ``(absolute path, the path as given)``; records name the overlay as ``infer``
            without Ray does, under the path as given.
    """

    def __init__(self, model: str, backend: str, device: str, threads: int | None, top_rois: int,
                 overlays: tuple[str, str] | None):
        import socket

        from ctmask.backends.registry import make_runner

        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.top_rois = top_rois
        self.overlays = overlays
        # A model that does not load here (the driver only read its metadata) is reported by the
        # first call: an error raised in the constructor would make Ray restart the actor forever.
        self.load_error: str | None = None
        try:
            self.runner = make_runner(Path(model), backend, device, threads).activate()
            self.spec = self.runner.spec
            self.described = pickle.dumps(self.runner.describe())  # what runs: the same for every call
        except Exception as exc:
            self.load_error = f"{exc.__class__.__name__}: {exc}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_error is not None:
            raise RayError(f"an inference actor ({self.worker}) could not load the model: {self.load_error}")
        out = []
        for blob in batch["loaded"]:
            loaded = pickle.loads(blob)
            preds: list[Prediction] = []
            failures: list[Failure] = list(loaded.failures)
            if loaded.refs:
                outputs = self.runner.infer({INPUT: loaded.batch})
                preds = slice_predictions(loaded, outputs, self.spec, self.top_rois)
                if self.overlays is not None:
                    from ctmask.runtime.overlays import write_overlay

                    folder, given = self.overlays
                    for pred, decoded in zip(preds, loaded.decoded):
                        if decoded is not None:
                            written, reason = write_overlay(folder, pred, decoded, self.top_rois)
                            pred.overlay = None if written is None else str(Path(given) / Path(written).name)
                            if reason is not None:
                                failures.append(Failure(pred.key or pred.file, reason))
            out.append(pickle.dumps((preds, failures)))
        return {"n": batch["n"], "result": np.array(out, dtype=object),
                "worker": np.array([self.worker] * len(out), dtype=object),
                "runner": np.array([self.described] * len(out), dtype=object)}


def _bound_predictor(**config) -> type:
    """:class:`ChunkPredictor` with its arguments bound in the class (shipped with the class
    itself). Ray Data still keeps its own pool arguments in the object store for the pool's
    life, which Ray's core names in an error-level notice; restarts work (a test kills an actor)."""

    class BoundChunkPredictor(ChunkPredictor):
        def __init__(self) -> None:
            super().__init__(**config)

    return BoundChunkPredictor


def _pool(stats: RayStats, opts: RayOptions, threads: int | None, n_chunks: int) -> tuple[int, float, int | None]:
    """Actors, CPUs per actor and runner threads for this cluster (never more default actors
    than chunks to run)."""
    cpus, gpus = stats.cluster.get("cpus", 1.0), stats.cluster.get("gpus", 0.0)
    actors = opts.actors
    if actors is None:
        if opts.gpus_per_actor > 0:
            actors = int(gpus // opts.gpus_per_actor)
        else:  # CPU: one single-threaded runner per core measured faster than one runner with all cores
            actors = min(MAX_DEFAULT_CPU_ACTORS, math.floor(cpus - DECODE_CPUS + 0.5))
        actors = max(1, min(actors, n_chunks))
    if opts.gpus_per_actor > 0 and actors * opts.gpus_per_actor > gpus:
        raise ConfigError(f"{actors} actor(s) x {opts.gpus_per_actor} GPU(s) do not fit the cluster's {gpus:g} GPU(s)")
    cpa = opts.cpus_per_actor
    if cpa is None:
        cpa = max(0.25, math.floor((cpus - DECODE_CPUS) / actors * 4) / 4)
    if actors * cpa + DECODE_CPUS > cpus + 1e-9:
        raise ConfigError(f"{actors} actor(s) x {cpa:g} CPU(s), plus {DECODE_CPUS:g} for decoding, do not fit the "
                          f"cluster's {cpus:g} CPU(s): lower --actors or --cpus-per-actor")
    if threads is None and opts.gpus_per_actor == 0:
        threads = max(1, round(cpa))
    return actors, cpa, threads


def predict_sources_ray(
    model: Path,
    spec: GraphSpec,
    refs: list[SliceRef],
    options: RayOptions,
    stats: RayStats,
    batch_size: int = 8,
    top_rois: int = 5,
    on_batch: Callable[[int], None] | None = None,
    boxes: CropBoxes | None = None,
    uncropped: bool = False,
    overlays: Path | None = None,
    opts: ReadOptions = ReadOptions(),
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
) -> Iterator[tuple[Prediction, None] | Failure]:
    """Predict every slice on Ray (call inside :func:`ray_cluster`), in input order.

    Yields what :func:`ctmask.runtime.batch_run.predict_sources` yields (``(prediction,
    None)``: overlays, when asked, are drawn by the actors and named in
    ``prediction.overlay``), for the same slices in the same order, with the same batches.

    Raises:
        ConfigError: bad options, a cropping model without boxes.
        RayError: the actors could not load the model.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    check_crop(spec, boxes, uncropped)
    if not spec.crop or uncropped:
        boxes = None
    if not refs:
        return
    ray = _ray()
    _quiet_data_context()
    chunks = [refs[i : i + batch_size] for i in range(0, len(refs), batch_size)]
    actors, cpa, threads = _pool(stats, options, threads, len(chunks))
    stats.actors, stats.cpus_per_actor, stats.threads = actors, cpa, threads
    stats.gpus_per_actor = options.gpus_per_actor
    stats.chunks = len(chunks)
    ds = ray.data.from_items([{"n": n, "refs": pickle.dumps(c)} for n, c in enumerate(chunks)],
                             override_num_blocks=min(len(chunks), 1000))
    ds = ds.map_batches(_decode_chunks, fn_kwargs={"spec": spec, "boxes": boxes, "keep_pixels": overlays is not None,
                                                   "opts": opts, "cwd": os.getcwd()},
                        batch_size=1, batch_format="numpy", num_cpus=DECODE_CPUS)
    folder = None if overlays is None else (str(Path(overlays).resolve()), str(overlays))
    predictor = _bound_predictor(model=str(Path(model).resolve()), backend=backend, device=device, threads=threads,
                                 top_rois=top_rois, overlays=folder)
    ds = ds.map_batches(predictor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpa, num_gpus=options.gpus_per_actor or None)
    yield from _in_order(ds, chunks, stats, on_batch)


def _in_order(ds, chunks: list[list[SliceRef]], stats: RayStats,
              on_batch: Callable[[int], None] | None) -> Iterator[tuple[Prediction, None] | Failure]:
    """The chunks' results as the actors deliver them, yielded in input order (a chunk Ray
    delivered twice counted in ``stats.duplicates`` and dropped).

    Raises:
        RayError: the Ray job failed, or ended with chunks not delivered.
    """
    waiting: dict[int, tuple[list[Prediction], list[Failure]]] = {}
    seen: set[int] = set()
    next_n = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for n, blob, worker, described in zip(batch["n"], batch["result"], batch["worker"], batch["runner"]):
                n = int(n)
                if n in seen:
                    stats.duplicates += 1
                    continue
                seen.add(n)
                stats.by_worker[str(worker)] = stats.by_worker.get(str(worker), 0) + 1
                if not stats.runner:
                    stats.runner = pickle.loads(described)
                waiting[n] = pickle.loads(blob)
            while next_n in waiting:
                preds, failures = waiting.pop(next_n)
                yield from failures
                for pred in preds:
                    yield pred, None
                if on_batch is not None:
                    on_batch(len(chunks[next_n]))
                next_n += 1
    except Exception as exc:
        if isinstance(exc, CtmaskError):
            raise
        raise RayError(f"the Ray job failed ({_ray_reason(exc)})") from None
    if next_n != len(chunks):  # Ray delivers every block or raises; this would be a lost chunk
        raise RayError(f"the Ray job ended with {len(chunks) - next_n} of {len(chunks)} chunks not delivered")


def _ray_reason(exc: BaseException) -> str:
    """The first meaningful line of a Ray error (its tracebacks run to pages)."""
    text = str(exc)
    for marker in ("RayError", "ModelError", "ConfigError", "DataError", "EngineError", "TensorRTMissing"):
        at = text.find(marker + ":")
        if at >= 0:
            return text[at:].splitlines()[0][:400]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else exc.__class__.__name__)[:400]
