"""Latency, throughput and peak memory of a runner on a fixed batch (no torch here).

Runners are measured one after another in the same process on the same inputs, so
their ratios are meaningful even on a shared, noisy machine: several graphs of one model
(FP32, FP16, INT8) on several backends, next to the PyTorch reference, in one run. Peak memory is the
process's resident-set high-water mark while the runner is built and run (Linux:
``VmHWM``, reset through ``/proc/self/clear_refs``), which includes what the backend
loads (libraries, weights, arenas).

Which backends run a model, and their runners, come from :mod:`ctmask.backends.registry`
(:func:`~ctmask.backends.registry.plan_models`); this module measures a plan.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError, CtmaskError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.runner import Runner

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
    """Throughput of every backend over ``reference``'s, per batch size (one model's rows)."""
    ref = {r["batch_size"]: r["throughput"] for r in results if r["backend"] == reference}
    out: dict[str, dict[int, float]] = {}
    for r in results:
        if r["backend"] != reference and r["batch_size"] in ref:
            out.setdefault(r["backend"], {})[r["batch_size"]] = round(r["throughput"] / ref[r["batch_size"]], 3)
    return out


def speedups_by_model(results: list[dict], reference: str) -> dict[str, dict[str, dict[int, float]]]:
    """``[backend][model][batch]``: throughput of every graph row over ``reference``'s (the
    PyTorch checkpoint) at the same batch size."""
    ref = {r["batch_size"]: r["throughput"] for r in results if r["backend"] == reference}
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        if r["backend"] != reference and r["batch_size"] in ref:
            out.setdefault(r["backend"], {}).setdefault(r["model"], {})[r["batch_size"]] = round(
                r["throughput"] / ref[r["batch_size"]], 3)
    return out


def speedups_vs_fp32(results: list[dict], baseline: str) -> dict[str, dict[str, dict[int, float]]]:
    """``[backend][model][batch]``: throughput of every row over the ``baseline`` graph's
    (the FP32 one) on the same backend at the same batch size; the baseline itself is 1."""
    ref = {(r["backend"], r["batch_size"]): r["throughput"] for r in results if r["model"] == baseline}
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in results:
        base = ref.get((r["backend"], r["batch_size"]))
        if base:
            out.setdefault(r["backend"], {}).setdefault(r["model"], {})[r["batch_size"]] = round(
                r["throughput"] / base, 3)
    return out


REFERENCE = "torch-cpu"
"""The backend the speed-ups are taken over (the PyTorch checkpoint on the CPU)."""
ONCE = ("torch",)
"""Backend kinds that run the checkpoint, not a graph: planned for the first model only."""


def _kind(backend: str) -> str:
    """``onnxruntime-cpu`` -> ``onnxruntime``."""
    return backend.rsplit("-", 1)[0]


def precision_label(precision: str, int8_target: str | None = None) -> str:
    """``fp32``, ``fp16``, ``int8 (cpu)``, ``int8 (tensorrt)``."""
    return f"{precision} ({int8_target})" if precision == "int8" and int8_target else precision


def _first_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, CtmaskError) else str(exc).strip()
    line = text.splitlines()[0][:300] if text else ""
    return line if isinstance(exc, CtmaskError) else f"{exc.__class__.__name__}: {line}".rstrip(": ")


@dataclass
class BenchPlan:
    """One model's backends to run (name -> runner factory) and which were left out, and why."""

    model: Path
    spec: GraphSpec
    factories: dict[str, Callable[[], Runner]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class MultiPlan:
    """The plans of several graphs of one input size (one model's precisions, or several presets), benchmarked
    together; the checkpoint backends (``torch-*``) are in the first plan only."""

    plans: list[BenchPlan]

    @property
    def spec(self) -> GraphSpec:
        return self.plans[0].spec

    @property
    def skipped(self) -> dict[str, str]:
        """Backends that cannot run here (those of the first model: the backend's own reason)."""
        return self.plans[0].skipped

    @property
    def backends(self) -> list[str]:
        """Every planned backend, in plan order."""
        names: dict[str, None] = {}
        for plan in self.plans:
            names |= dict.fromkeys(plan.factories)
        return list(names)


def bench_images(spec: GraphSpec, n: int, folder: Path | None) -> np.ndarray:
    """``n`` input slices [n, 1, S, S]: the first files of ``folder`` (repeated), or synthetic."""
    if folder is not None:
        from ctmask.runtime.predict import collect_images
        from ctmask.scans.batch import load_batch

        files, skipped = collect_images([folder])
        if not files:
            why = "; ".join(f"{f.file}: {f.reason}" for f in skipped[:3])
            raise ConfigError(f"no single-slice images in {folder}" + (f" ({why})" if why else ""))
        loaded = load_batch(files[:n], spec)
        batch, bad = loaded.batch, loaded.failures
        if bad:
            raise ConfigError("unreadable bench input: " + "; ".join(f"{f.file}: {f.reason}" for f in bad))
        reps = -(-n // len(batch))
        return np.ascontiguousarray(np.concatenate([batch] * reps)[:n])
    from ctmask.core.preprocess import resize
    from ctmask.data.synth import generate_slice

    slices = [resize(generate_slice(0, i, i % 3).image.astype(np.float32) / 255.0, spec.image_size) for i in range(n)]
    return np.stack(slices)[:, None].astype(np.float32)


def _display_names(paths: list[Path]) -> dict[str, str]:
    """Model path -> what the table calls it: the file name, or the path where names clash."""
    names = [p.name for p in paths]
    return {str(p): (p.name if names.count(p.name) == 1 else str(p)) for p in paths}


def _model_entry(plan: BenchPlan, name: str) -> dict:
    """One benchmarked model in the report's ``models``."""
    spec = plan.spec
    return {"model": str(plan.model), "name": name, "preset": spec.preset, "precision": spec.precision,
            "int8_target": spec.int8_target or None, "label": precision_label(spec.precision, spec.int8_target)}


def run_plan(plan: BenchPlan | MultiPlan, batch_sizes: list[int], folder: Path | None, warmup: int,
             iterations: int, show_progress: bool = True) -> dict:
    """Benchmark every planned model on every planned backend at every batch size, on the same
    inputs, one after another (backend by backend, model by model).

    A model a backend refuses (it does not load, compile or run) is left out with the reason,
    in ``not_benchmarked``, and the others go on.

    Returns:
        The report: per-run ``results`` (each names ``backend``, ``model``, ``precision`` and
        ``int8_target``), ``speedup`` (the first model over ``torch-cpu``, per backend and batch),
        ``speedup_vs_torch`` and ``speedup_vs_fp32`` (per backend, model and batch; the latter
        over the first FP32 graph, ``fp32_baseline``, on the same backend) and ``not_benchmarked``.
    """
    from ctmask.core.progress import progress

    multi = plan if isinstance(plan, MultiPlan) else MultiPlan([plan])
    if any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {batch_sizes}")
    inputs = bench_images(multi.spec, max(batch_sizes), folder)
    graphs = [p.model for p in multi.plans]
    display = _display_names(graphs)
    results: list[dict] = []
    # Backends the first model can use but a later one cannot (resolvers are per model).
    failed = [{"backend": name, "model": str(p.model), "batch_size": None, "reason": why}
              for p in multi.plans[1:] for name, why in p.skipped.items() if name not in multi.skipped]
    per_run = warmup + iterations
    total = sum(len(p.factories) for p in multi.plans) * len(batch_sizes) * per_run
    with progress(total, "bench", show_progress) as advance:
        for name in multi.backends:
            for p in multi.plans:
                factory = p.factories.get(name)
                if factory is None:
                    continue
                done = 0

                def step(n: int = 1, status: str = "") -> None:
                    nonlocal done
                    done += n
                    advance(n, status=status)

                graph = _kind(name) not in ONCE
                label = display[str(p.model)] if graph else "reference"
                for b in batch_sizes:
                    advance(0, status=f"{name} {label} b={b}")
                    try:
                        row = benchmark(factory, inputs[:b], warmup, iterations, step)
                    except Exception as exc:  # a backend refusing a graph is a finding, not a crash
                        failed.append({"backend": name, "model": str(p.model), "batch_size": b,
                                       "reason": _first_line(exc)})
                        advance(len(batch_sizes) * per_run - done)
                        break
                    if graph:
                        row |= {"model": str(p.model), "precision": p.spec.precision,
                                "int8_target": p.spec.int8_target or None}
                    else:
                        row |= {"model": row.get("checkpoint", ""), "precision": "fp32", "int8_target": None}
                    results.append({**row, "backend": name})
    reference = REFERENCE if any(r["backend"] == REFERENCE for r in results) else None
    fp32 = next((p.model for p in multi.plans if p.spec.precision == "fp32"), None)
    first = str(graphs[0])
    first_rows = [r for r in results if r["model"] == first or _kind(r["backend"]) in ONCE]
    return {
        "model": first,
        "models": [_model_entry(p, display[str(p.model)]) for p in multi.plans],
        "preset": multi.spec.preset,
        "input": "synthetic slices" if folder is None else str(folder),
        "cpu_count": os.cpu_count(),
        "reference": reference,
        "fp32_baseline": None if fp32 is None else str(fp32),
        "skipped": multi.skipped,
        "not_benchmarked": failed,
        "results": results,
        "speedup": speedups(first_rows, reference) if reference else {},
        "speedup_vs_torch": speedups_by_model(results, reference) if reference else {},
        "speedup_vs_fp32": speedups_vs_fp32(results, str(fp32)) if fp32 is not None else {},
    }
