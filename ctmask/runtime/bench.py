"""Latency, throughput and peak memory of a runner on a fixed batch (no torch here).

Runners are measured one after another in the same process on the same inputs, so
their ratios are meaningful even on a shared, noisy machine. Peak memory is the
process's resident-set high-water mark while the runner is built and run (Linux:
``VmHWM``, reset through ``/proc/self/clear_refs``), which includes what the backend
loads (libraries, weights, arenas).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner, onnxruntime_devices

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark (Linux); False where that is impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)} | {
        "mean": round(float(ms.mean()), 3), "min": round(float(ms.min()), 3)}


def benchmark(
    make_runner: Callable[[], Runner],
    images: np.ndarray,
    warmup: int = 2,
    iterations: int = 10,
    on_iteration: Callable[[], None] | None = None,
) -> dict:
    """Build a runner, warm it up, then time ``iterations`` calls on ``images``.

    Args:
        make_runner: builds the (inactive) runner; called here so its memory is counted.
        images: float32 [B, 1, S, S], the batch every iteration runs.
        warmup: untimed calls first (lazy allocation, kernel selection).
        iterations: timed calls.
        on_iteration: progress callback, once per call (warm-up included).

    Returns:
        ``backend`` details, ``batch_size``, ``latency_ms`` (p50/p90/p99/mean/min per
        batch), ``throughput`` (slices/s at the median latency), ``activate_s``,
        ``peak_rss_mb`` (process high-water mark) and ``added_rss_mb`` (that mark minus
        the resident size before the runner was built).
    """
    gc.collect()
    measured_peak = reset_peak_rss()
    before = rss_mb()
    t0 = time.perf_counter()
    runner = make_runner()
    runner.activate()
    activate_s = time.perf_counter() - t0
    try:
        feed = {INPUT: images}
        for _ in range(warmup):
            runner.infer(feed)
            if on_iteration:
                on_iteration()
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - t)
            if on_iteration:
                on_iteration()
        info = runner.describe()
        extra = runner.memory_report()
    finally:
        runner.deactivate()
    lat = percentiles_ms(times)
    b = images.shape[0]
    return {
        **info,
        "batch_size": b,
        "iterations": iterations,
        "warmup": warmup,
        "latency_ms": lat,
        "throughput": round(b / (lat["p50"] / 1e3), 3),
        "activate_s": round(activate_s, 3),
        **_memory(measured_peak, before),
        **extra,
    }


def _memory(measured_peak: bool, before: float | None) -> dict:
    peak = peak_rss_mb() if measured_peak else None
    if peak is None or before is None:
        return {"peak_rss_mb": None, "added_rss_mb": None}
    return {"peak_rss_mb": round(peak, 1), "added_rss_mb": round(peak - before, 1)}


def speedups(results: list[dict], reference: str) -> dict[str, dict[int, float]]:
    """Throughput of every backend over ``reference``'s, per batch size."""
    ref = {r["batch_size"]: r["throughput"] for r in results if r["backend"] == reference}
    out: dict[str, dict[int, float]] = {}
    for r in results:
        if r["backend"] != reference and r["batch_size"] in ref:
            out.setdefault(r["backend"], {})[r["batch_size"]] = round(r["throughput"] / ref[r["batch_size"]], 3)
    return out


BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "torch-cpu", "torch-cuda")
REFERENCE = "torch-cpu"

Resolver = Callable[[str, GraphSpec], tuple[Callable[[], Runner] | None, str]]
"""(device, graph spec) -> (runner factory, "") or (None, why the backend cannot run here)."""


@dataclass
class BenchPlan:
    """Which backends to run (name -> runner factory) and which were left out, and why."""

    model: Path
    spec: GraphSpec
    factories: dict[str, Callable[[], Runner]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def onnxruntime_resolver(model: Path, threads: int | None) -> Resolver:
    """Resolver of the ``onnxruntime-*`` backends for ``model``."""

    def resolve(device: str, spec: GraphSpec) -> tuple[Callable[[], Runner] | None, str]:
        if device not in onnxruntime_devices():
            return None, "this onnxruntime build has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        return functools.partial(OnnxRuntimeRunner, model, device, threads), ""

    return resolve


def plan_backends(model: str | Path, wanted: list[str] | None, resolvers: dict[str, Resolver]) -> BenchPlan:
    """Resolve the backends to benchmark; unavailable ones are skipped with a reason.

    Args:
        model: ctmask ONNX file.
        wanted: backend names (default: all of :data:`BACKENDS`).
        resolvers: per backend kind ("onnxruntime", "torch"), what builds its runners.
            The runtime knows only onnxruntime; the caller adds the PyTorch reference
            (:func:`ctmask.exporter.reference.torch_resolver`), so nothing here imports torch.

    Raises:
        ConfigError: an unknown backend name, or an explicitly requested backend that
            cannot run here.
    """
    model = Path(model)
    with OnnxRuntimeRunner(model) as probe:
        spec = probe.spec
    plan = BenchPlan(model, spec)
    for name in wanted or ():
        if name not in BACKENDS:
            raise ConfigError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    for name in wanted or BACKENDS:
        kind, device = name.rsplit("-", 1)
        resolver = resolvers.get(kind)
        factory, why = resolver(device, spec) if resolver else (None, f"no {kind} backend was offered")
        if factory is None:
            plan.skipped[name] = why
        else:
            plan.factories[name] = factory
    if wanted:
        missing = [n for n in wanted if n in plan.skipped]
        if missing:
            raise ConfigError("cannot run " + "; ".join(f"{n}: {plan.skipped[n]}" for n in missing))
    if not plan.factories:
        raise ConfigError("no backend can run here: " + "; ".join(f"{k}: {v}" for k, v in plan.skipped.items()))
    return plan


def bench_images(spec: GraphSpec, n: int, folder: Path | None) -> np.ndarray:
    """``n`` input slices [n, 1, S, S]: the first files of ``folder`` (repeated), or synthetic."""
    if folder is not None:
        from ctmask.runtime.predict import collect_images, load_batch

        files, _ = collect_images([folder])
        if not files:
            raise ConfigError(f"no images in {folder}")
        batch, ok, bad = load_batch(files[:n], spec)
        if bad:
            raise ConfigError("unreadable bench input: " + "; ".join(f"{f.file}: {f.reason}" for f in bad))
        reps = -(-n // len(batch))
        return np.ascontiguousarray(np.concatenate([batch] * reps)[:n])
    from ctmask.core.preprocess import resize
    from ctmask.data.synth import generate_slice

    slices = [resize(generate_slice(0, i, i % 3).image.astype(np.float32) / 255.0, spec.image_size) for i in range(n)]
    return np.stack(slices)[:, None].astype(np.float32)


def run_plan(plan: BenchPlan, batch_sizes: list[int], folder: Path | None, warmup: int, iterations: int,
             show_progress: bool = True) -> dict:
    """Benchmark every planned backend at every batch size, on the same inputs."""
    from ctmask.core.progress import progress

    if any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {batch_sizes}")
    inputs = bench_images(plan.spec, max(batch_sizes), folder)
    results = []
    total = len(plan.factories) * len(batch_sizes) * (warmup + iterations)
    with progress(total, "bench", show_progress) as advance:
        for name, factory in plan.factories.items():
            for b in batch_sizes:
                advance(0, status=f"{name} b={b}")
                results.append({**benchmark(factory, inputs[:b], warmup, iterations, advance), "backend": name})
    reference = REFERENCE if REFERENCE in plan.factories else None
    return {
        "model": str(plan.model),
        "preset": plan.spec.preset,
        "input": "synthetic slices" if folder is None else str(folder),
        "cpu_count": os.cpu_count(),
        "reference": reference,
        "skipped": plan.skipped,
        "results": results,
        "speedup": speedups(results, reference) if reference else {},
    }
