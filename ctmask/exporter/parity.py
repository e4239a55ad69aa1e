"""Parity: run the PyTorch reference and an exported graph on the same tensors and judge
every output against the graph's per-output tolerances.

Running and comparing are separate: :func:`run_pair` produces two output dicts,
:func:`compare_outputs` (pure numpy) judges them and collects every failing output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ctmask.core.compare import (
    OutputComparison,
    argmax_agreement,
    compare_arrays,
    compare_rois,
    match_roi_rows,
)
from ctmask.core.errors import ConfigError
from ctmask.core.fileio import atomic_path, sha256_file
from ctmask.core.spec import INPUT, OUTPUTS, GraphSpec, ModelError
from ctmask.exporter.reference import TorchRunner
from ctmask.runtime.predict import Failure, collect_images, load_batch
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner


def resolve_ties(
    actual: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    spec: GraphSpec,
    classify: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Reference outputs with tie-affected slices' logits / probs recomputed.

    Where near-tied RoI rows came out in another order (or another candidate took the
    last row), S legitimately saw a different input. For those slices the reference
    logits and probs become the reference S applied to the candidate's own RoIs, so S is
    still checked to full precision there. RoIs themselves are judged tie-robustly by
    :func:`ctmask.core.compare.compare_rois`.

    Args:
        classify: reference S, rois [b, N, 5] -> {"logits", "probs"}.

    Returns:
        the resolved reference and the indices of the tie-affected slices.
    """
    tol = spec.tolerances
    affected = match_roi_rows(actual["rois"], expected["rois"], tol["rois.score"].atol, tol["rois.deltas"]).tie_affected
    if not affected:
        return expected, []
    redo = classify(np.ascontiguousarray(actual["rois"][affected]))
    resolved = dict(expected)
    for name in ("logits", "probs"):
        resolved[name] = expected[name].copy()
        resolved[name][affected] = redo[name]
    return resolved, affected


def _rows(outputs: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The same rows (slices) of every output."""
    return {k: v[index] for k, v in outputs.items()}


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]


def _checks(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray],
            spec: GraphSpec) -> tuple[list[OutputComparison], dict]:
    """Every judged quantity (rois.score, rois.deltas, logits, probs) and the RoI matching counts."""
    tol = spec.tolerances
    checks, counts = compare_rois(actual["rois"], expected["rois"], tol["rois.score"], tol["rois.deltas"])
    checks += [compare_arrays(name, actual[name], expected[name], tol[name]) for name in ("logits", "probs")]
    return checks, counts


def compare_outputs(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], spec: GraphSpec,
                    min_argmax_agreement: float = 1.0) -> dict:
    """Judge ``actual`` (exported graph) against ``expected`` (PyTorch, ties resolved).

    Returns:
        ``outputs`` (one entry per judged quantity: rois.score, rois.deltas, logits,
        probs), ``rois`` matching counts, ``argmax_agreement``, ``failures`` (names of
        every failing check) and ``passed``.
    """
    rows, counts = _checks(actual, expected, spec)
    agreement = argmax_agreement(actual["logits"], expected["logits"])
    failures = [r.name for r in rows if not r.passed]
    if agreement < min_argmax_agreement:
        failures.append("argmax_agreement")
    return {
        "outputs": {r.name: r.to_dict() for r in rows},
        "rois": counts,
        "failing_slices": failing_slices(actual, expected, spec) if failures else [],
        "argmax_agreement": agreement,
        "min_argmax_agreement": min_argmax_agreement,
        "failures": failures,
        "passed": not failures,
    }


def failing_slices(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], spec: GraphSpec) -> list[dict]:
    """Per slice: which checks fail there, with the largest error of each (for finding causes)."""
    out = []
    for i in range(len(expected["logits"])):
        one = slice(i, i + 1)
        checks, counts = _checks(_rows(actual, one), _rows(expected, one), spec)
        bad = {c.name: c.max_abs for c in checks if not c.passed}
        agrees = bool(actual["logits"][i].argmax() == expected["logits"][i].argmax())
        if bad or not agrees:
            out.append({"index": i, "max_abs": bad, "unmatched_rows": counts["unmatched_rows"],
                        "argmax_agrees": agrees})
    return out


def unstable_slices(reference: Runner, images: np.ndarray, failing: list[dict], expected: dict[str, np.ndarray],
                    spec: GraphSpec, jitter: float, seeds: int = 2) -> dict[int, dict[str, float]]:
    """Failing slices on which the reference itself is not reproducible to the tolerances.

    Each failing slice is run through the reference again with uniform input noise of
    +-``jitter`` (1e-6 is far below the 1/255 step of an 8-bit slice). When every check
    that failed there also fails between the reference and its own jittered run, the
    slice sits on a selection boundary of the detector (a top-k cut or an NMS decision
    that the noise flips), and no backend can be held to the tolerance on it.

    Returns:
        {slice index: the reference's own largest jitter error per failing check}.
    """
    out = {}
    for item in failing:
        i = item["index"]
        moved: dict[str, float] = {}
        class_moved = False
        for seed in range(seeds):
            noise = np.random.default_rng(seed).uniform(-jitter, jitter, images[i : i + 1].shape)
            jittered = reference.infer({INPUT: np.clip(images[i : i + 1] + noise, 0, 1).astype(np.float32)})
            checks, _ = _checks(jittered, _rows(expected, slice(i, i + 1)), spec)
            for c in checks:
                if not c.passed:
                    moved[c.name] = max(moved.get(c.name, 0.0), c.max_abs)
            class_moved |= bool(jittered["logits"][0].argmax() != expected["logits"][i].argmax())
        if all(name in moved for name in item["max_abs"]) and (item["argmax_agrees"] or class_moved):
            out[i] = moved
    return out


def judge_out_unstable(report: dict, unstable: dict[int, dict[str, float]], actual: dict[str, np.ndarray],
                       resolved: dict[str, np.ndarray], spec: GraphSpec, min_argmax_agreement: float,
                       max_unstable_fraction: float) -> dict:
    """The report re-judged without the unstable slices, which are listed separately.

    More unstable slices than ``max_unstable_fraction`` of all is itself a failure.
    """
    listed = [{"index": f["index"], "graph_max_abs": f["max_abs"], "reference_jitter_max_abs": unstable[f["index"]]}
              for f in report["failing_slices"] if f["index"] in unstable]
    if unstable:
        n = len(resolved["logits"])
        keep = [i for i in range(n) if i not in unstable]
        report = compare_outputs(_rows(actual, keep), _rows(resolved, keep), spec, min_argmax_agreement)
        for item in report["failing_slices"]:
            item["index"] = keep[item["index"]]
        if len(unstable) > max_unstable_fraction * n:
            report["failures"].append("unstable_slices")
            report["passed"] = False
    report["unstable_slices"] = listed
    return report


def run_pair(reference: Runner, candidate: Runner, images: np.ndarray, batch_size: int,
             on_batch: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Run both active runners on ``images`` [M, 1, S, S] in batches; concatenate outputs."""
    ref: dict[str, list] = {k: [] for k in OUTPUTS}
    cand: dict[str, list] = {k: [] for k in OUTPUTS}
    for batch in _batches(len(images), batch_size):
        feed = {INPUT: np.ascontiguousarray(images[batch])}
        for store, runner in ((ref, reference), (cand, candidate)):
            for k, v in runner.infer(feed).items():
                store[k].append(v)
        if on_batch:
            on_batch(len(feed[INPUT]))
    return ({k: np.concatenate(v) for k, v in ref.items()}, {k: np.concatenate(v) for k, v in cand.items()})


def check_parity(
    checkpoint: str | Path,
    model: str | Path,
    inputs: list[str | Path],
    max_images: int = 64,
    batch_size: int = 8,
    min_argmax_agreement: float = 1.0,
    polygraphy_dir: str | Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    jitter: float = 1e-6,
    max_unstable_fraction: float = 0.05,
) -> dict:
    """PyTorch (checkpoint) against onnxruntime (model) on up to ``max_images`` slices.

    Args:
        checkpoint: classifier checkpoint the model was exported from.
        model: ctmask ONNX file.
        inputs: image files or folders.
        max_images: slices used (the first ones, in sorted order).
        batch_size: slices per inference call.
        min_argmax_agreement: fraction of slices whose predicted class must agree.
        polygraphy_dir: if given, also write the inputs and the PyTorch outputs there in
            Polygraphy's JSON formats, for ``polygraphy run --load-inputs/--load-outputs``.
        on_batch: progress callback (slices done in the batch).
        on_start: called once with the number of slices about to be compared.
        jitter: input noise of the stability probe (:func:`unstable_slices`); 0 turns
            it off. Unstable slices are reported and judged out, up to
            ``max_unstable_fraction`` of the slices; beyond that the check fails.

    Returns:
        the report of :func:`compare_outputs` plus ``model``, ``checkpoint``, ``n_images``,
        ``skipped`` (unreadable files), ``warnings``, and the runners' descriptions.
    """
    files, skipped = collect_images(inputs)
    files = files[:max_images]
    with OnnxRuntimeRunner(model) as candidate, TorchRunner(checkpoint) as reference:
        spec, ref_spec = candidate.spec, reference.spec
        if (spec.preset, spec.image_size, spec.n_rois) != (ref_spec.preset, ref_spec.image_size, ref_spec.n_rois):
            raise ModelError(f"graph is preset {spec.preset!r} ({spec.image_size} px, N={spec.n_rois}) but the "
                             f"checkpoint is preset {ref_spec.preset!r} ({ref_spec.image_size} px, "
                             f"N={ref_spec.n_rois})", model)
        warnings = []
        ref_sha = sha256_file(checkpoint)
        if spec.checkpoint_sha256 and spec.checkpoint_sha256 != ref_sha:
            warnings.append(f"{model} was exported from a different checkpoint (sha256 {spec.checkpoint_sha256[:12]}"
                            f"..., {checkpoint} is {ref_sha[:12]}...)")
        images, ok, bad = load_batch(files, spec)
        skipped += bad
        if not ok:
            raise ConfigError("no readable slices to compare: " + "; ".join(f"{f.file}: {f.reason}" for f in skipped))
        if on_start:
            on_start(len(ok))
        expected, actual = run_pair(reference, candidate, images, batch_size, on_batch)
        runners = {"reference": reference.describe(), "candidate": candidate.describe()}
        resolved, affected = resolve_ties(actual, expected, spec, reference.classify)
        report = compare_outputs(actual, resolved, spec, min_argmax_agreement)
        unstable = {}
        if jitter > 0 and report["failing_slices"]:
            unstable = unstable_slices(reference, images, report["failing_slices"], expected, spec, jitter)
    report = judge_out_unstable(report, unstable, actual, resolved, spec, min_argmax_agreement, max_unstable_fraction)
    report["argmax_agreement_end_to_end"] = argmax_agreement(actual["logits"], expected["logits"])
    for item in report["failing_slices"] + report["unstable_slices"]:
        item["file"] = str(ok[item["index"]])
    report["logits_reference"] = ("torch end to end; torch S on the graph's own RoIs for the tie-affected slices "
                                  f"{affected}" if affected else "torch end to end")
    if polygraphy_dir is not None:
        save_for_polygraphy(polygraphy_dir, images, resolved, batch_size)
    return {
        "model": str(model),
        "checkpoint": str(checkpoint),
        "preset": spec.preset,
        "n_images": len(ok),
        "batch_size": batch_size,
        "skipped": [f.to_dict() for f in skipped if isinstance(f, Failure)],
        "warnings": warnings,
        "runners": runners,
        **report,
    }


def save_for_polygraphy(out_dir: str | Path, images: np.ndarray, expected: dict[str, np.ndarray],
                        batch_size: int) -> dict[str, Path]:
    """Write ``inputs.json`` and ``reference_outputs.json`` (runner "pytorch") for Polygraphy.

    ``expected`` should be the tie-resolved reference (:func:`resolve_ties`); Polygraphy
    compares elementwise, so judge ``rois`` there with a robust statistic (median).

    Raises:
        ConfigError: Polygraphy is not installed.
    """
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise ConfigError("writing Polygraphy files needs polygraphy: pip install polygraphy") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = _batches(len(images), batch_size)
    feeds = [{INPUT: np.ascontiguousarray(images[b])} for b in batches]
    outs = [{k: np.ascontiguousarray(v) for k, v in _rows(expected, b).items()} for b in batches]
    paths = {"inputs": out_dir / "inputs.json", "outputs": out_dir / "reference_outputs.json"}
    G_LOGGER.module_severity = G_LOGGER.ERROR  # its "[I] Saving ..." lines would mix into our output
    results = RunResults()
    results.add(outs, runner_name="pytorch")
    with atomic_path(paths["inputs"]) as tmp:
        save_json(feeds, str(tmp), description="ctmask parity inputs")
    with atomic_path(paths["outputs"]) as tmp:
        results.save(str(tmp))
    return paths
