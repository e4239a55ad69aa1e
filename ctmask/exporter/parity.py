"""Parity: run the PyTorch reference and an exported graph on the same tensors and judge
every output against ctmask's own tolerances for the graph's declared precision.

The definition (the README states it in one paragraph):

* PyTorch ranks N + K candidates (K = :data:`CANDIDATES`) with the same module; its first
  N rows are its output and feed its S. Every real row of the graph is matched one to one
  to a reference candidate (:func:`ctmask.core.compare.align_rows`); ``rois.score``,
  ``rois.deltas`` and ``boxes`` (the row's decoded box, against its partner's; padding
  rows' boxes against zeros) are judged on the matched pairs, rows entering at the N cut
  included; ``rois.rows`` fails on any unmatched, missing or intruding row or broken padding.
* ``rois.order``: two rows may be in the other order only when their reference scores
  are within the precision's order tolerance, and the graph's scores must descend within
  it.
* ``class``: the graph's class call against PyTorch's, end to end, on every slice.
  ``logits`` / ``probs``: against PyTorch end to end; on a slice whose rows were
  legitimately reordered (or swapped at the cut), against PyTorch's S on the reference's
  own rows in the graph's order. ``s.logits``: the graph's logits against PyTorch's S on
  the graph's own RoIs, every slice, full precision.
* A failing slice is judged out as unstable only when PyTorch, under tiny input noise,
  moves by at least :data:`COMPARABLE` of the graph's error on every line that failed
  there (``probs`` follows ``logits``); both are reported. At most 5% of the slices may
  be judged out: when more fail, none is probed and the check fails.

Running and judging are separate: :func:`run_pair` produces two output dicts,
:func:`judge_parity` (numpy; S passed in as a callable) judges them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmask.core.compare import (
    PAD,
    UNMATCHED,
    OutputComparison,
    RowAlignment,
    align_rows,
    compare_arrays,
    reference_in_graph_order,
)
from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.fileio import atomic_path, sha256_file
from ctmask.core.graphs import content_sha256, load_proto, precision_problems
from ctmask.core.noise import NOISE_GRAY_LEVELS, NoiseFloor
from ctmask.core.spec import (
    INPUT,
    PARITY_AGREEMENT,
    PARITY_OFF_TOLERANCE,
    GraphSpec,
    Tolerance,
    parity_tolerances,
)
from ctmask.exporter.reference import TorchRunner
from ctmask.runtime.predict import collect_images
from ctmask.runtime.runner import OnnxRuntimeRunner, Runner
from ctmask.scans.batch import load_batch
from ctmask.scans.types import Failure

COMPARABLE = 0.5
"""A failing slice is judged out as unstable only when PyTorch, under input noise, moves
by at least this fraction of the graph's error on every line the graph failed there."""

CANDIDATES = 64
"""K: the reference ranks N + K candidates, so rows entering at the N cut are matched."""

NUMERIC_LINES = ("rois.score", "rois.deltas", "rois.order", "boxes", "logits", "probs", "s.logits",
                 "probs.softmax")
"""Judged numeric lines: ``s.logits`` is the graph's logits against PyTorch's S applied to
the graph's own RoIs (S checked on its own, to full precision); ``probs.softmax`` the
graph's probs against the softmax of its own logits (never excusable: PyTorch's own
movement on it is zero)."""

TOLERANCE_OF = {"s.logits": "logits", "probs.softmax": "probs"}
"""Lines judged with another line's tolerance, unless the precision's table names them."""

EXCUSABLE_REDUCED = frozenset({"rois.score", "rois.deltas", "rois.order", "rois.rows", "boxes", "logits", "probs",
                               "class"})
"""Lines an FP16 / INT8 graph may fail on a few slices (up to the precision's
``PARITY_OFF_TOLERANCE``): reduced precision legitimately moves near-tied rows and
proposals. Its class agreement still counts every slice; ``s.logits`` (S on the graph's
own RoIs), ``probs.softmax`` and the metadata are never excused."""


def line_tolerance(tol: dict[str, Tolerance], name: str) -> Tolerance:
    """The tolerance judging line ``name``: its own entry, else the one it borrows."""
    return tol[name] if name in tol else tol[TOLERANCE_OF.get(name, name)]


def _rows(outputs: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The same rows (slices) of every output."""
    return {k: v[index] for k, v in outputs.items()}


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, n, batch_size)]


@dataclass
class SliceJudgement:
    """Everything judged on one slice.

    Attributes:
        index: slice index.
        alignment: the graph rows' matching to the reference candidates.
        pairs: per numeric line, the (graph, reference) arrays compared on this slice.
        class_agrees: the graph's class call equals PyTorch's, end to end.
        reference_logits: the reference logits the ``logits`` line used here: PyTorch end to
            end, or, on a slice whose rows were legitimately reordered, PyTorch's S on the
            reference's own rows in the graph's order.
    """

    index: int
    alignment: RowAlignment
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    class_agrees: bool
    reference_logits: str

    def errors(self, tol: dict[str, Tolerance]) -> dict[str, OutputComparison]:
        return {name: compare_arrays(name, a, e, line_tolerance(tol, name))
                for name, (a, e) in self.pairs.items()}

    def magnitudes(self, tol: dict[str, Tolerance]) -> dict[str, float]:
        """Size of the error on every line: max abs per numeric line, bad rows, class flip (0/1)."""
        out = {name: c.max_abs for name, c in self.errors(tol).items()}
        out["rois.rows"] = float(self.alignment.bad_rows)
        out["class"] = float(not self.class_agrees)
        return out

    def failing(self, tol: dict[str, Tolerance]) -> dict[str, float]:
        """The lines that fail on this slice, with their error size."""
        out = {name: c.max_abs for name, c in self.errors(tol).items() if not c.passed}
        if self.alignment.bad_rows:
            out["rois.rows"] = float(self.alignment.bad_rows)
        if not self.class_agrees:
            out["class"] = 1.0
        return out


def box_partners(ranks: np.ndarray, rows: np.ndarray, candidates: np.ndarray, boxes: np.ndarray,
                 candidate_boxes: np.ndarray, tol: dict[str, Tolerance]) -> np.ndarray:
    """The reference candidate each graph row's box is judged against: its row's partner
    (``ranks``, :func:`ctmask.core.compare.align_rows`), except among rows that score and
    deltas cannot tell apart.

    Two candidates of nearly the same proposal (untrained weights make many) can have score
    and deltas equal within the ``rois`` tolerances while their boxes differ by a fraction
    of a pixel; the row matching then pairs them arbitrarily. So the partners of the matched
    rows are re-assigned among themselves, minimising the box error, where each graph row
    may only take a partner whose score and deltas it matches within tolerance (or its own
    partner): membership never changes, and rows that score or deltas tell apart keep
    their partners (a graph that swaps their boxes fails ``boxes``).
    """
    from scipy.optimize import linear_sum_assignment

    g = np.flatnonzero(ranks >= 0)
    if len(g) < 2:
        return ranks
    r = ranks[g]
    a, e = rows[g].astype(np.float64), candidates[r].astype(np.float64)
    st, dt = tol["rois.score"], tol["rois.deltas"]
    with np.errstate(invalid="ignore"):
        ok_score = np.abs(a[:, None, 0] - e[None, :, 0]) <= st.atol + st.rtol * np.abs(e[None, :, 0])
        ok_deltas = (np.abs(a[:, None, 1:] - e[None, :, 1:]) <= dt.atol + dt.rtol * np.abs(e[None, :, 1:])).all(-1)
    allowed = (ok_score & ok_deltas) | np.eye(len(g), dtype=bool)
    if allowed.sum() == len(g):  # every row can only keep its own partner
        return ranks
    err = np.abs(boxes[g].astype(np.float64)[:, None] - candidate_boxes[r].astype(np.float64)[None]).max(-1)
    err = np.where(np.isfinite(err), np.minimum(err, 1e9), 1e9)
    rows_, cols = linear_sum_assignment(np.where(allowed, err, 1e12))
    out = ranks.copy()
    out[g[rows_]] = r[cols]
    return out


def judge_slices(actual: dict[str, np.ndarray], reference: dict[str, np.ndarray], tol: dict[str, Tolerance],
                 classify: Callable[[np.ndarray], dict[str, np.ndarray]]) -> list[SliceJudgement]:
    """Judge every slice of ``actual`` (the graph) against ``reference`` (PyTorch).

    Args:
        actual: ``rois`` [B, N, 5], ``logits`` / ``probs`` [B, 3], ``boxes`` [B, N, 4] of the graph.
        reference: the same from PyTorch plus ``candidates`` [B, N + K, 5], the reference's
            ranking of more candidates than it keeps (its first N rows are ``rois``), and
            their decoded boxes ``candidate_boxes`` [B, N + K, 4].
        tol: parity tolerances (ctmask's table for the graph's precision).
        classify: PyTorch's S, rois [b, N, 5] -> {"logits", "probs"} [b, 3].

    Raises:
        ValueError: an output is missing or of the wrong shape.
    """
    b, n = actual["rois"].shape[:2]
    if reference["candidates"].shape[1] < n:
        raise ValueError(f"reference ranked {reference['candidates'].shape[1]} candidates, fewer than N = {n}")
    for side, key, rows in ((actual, "boxes", n), (reference, "candidate_boxes", reference["candidates"].shape[1])):
        if key not in side or side[key].shape != (b, rows, 4):
            raise ValueError(f"{key}: expected [{b}, {rows}, 4] boxes, got "
                             f"{list(side[key].shape) if key in side else 'none'}")
    s_on_graph = classify(np.ascontiguousarray(actual["rois"]))["logits"]
    aligned = [align_rows(actual["rois"][i], reference["candidates"][i], n, tol) for i in range(len(actual["rois"]))]
    # Legitimately reordered slices: the reference's own rows in the graph's order through S.
    permuted = [i for i, al in enumerate(aligned) if al.permuted and not al.bad_rows
                and al.order_gap <= tol["rois.order"].atol]
    judged = {"logits": reference["logits"].copy(), "probs": reference["probs"].copy()}
    if permuted:
        rows = np.stack([reference_in_graph_order(aligned[i], reference["candidates"][i]) for i in permuted])
        redo = classify(rows)
        for name in judged:
            judged[name][permuted] = redo[name]
    out = []
    for i, al in enumerate(aligned):
        a, e = actual["rois"][i].astype(np.float64), reference["candidates"][i].astype(np.float64)
        m = al.ranks >= 0
        # Boxes of matched rows against their partner's (a permuted near-tie against its own
        # reference box), of padding rows against zeros; unmatched rows fail rois.rows.
        shown = al.ranks != UNMATCHED
        ranks = box_partners(al.ranks, a, e, actual["boxes"][i], reference["candidate_boxes"][i], tol)
        partner = np.where(m[:, None], reference["candidate_boxes"][i][np.maximum(ranks, 0)], 0.0)
        pairs = {
            "rois.score": (a[m, 0], e[al.ranks[m], 0]),
            "rois.deltas": (a[m, 1:], e[al.ranks[m], 1:]),
            "rois.order": (np.array([max(al.order_gap, al.rise)]), np.zeros(1)),
            "boxes": (actual["boxes"][i][shown].astype(np.float64), partner[shown].astype(np.float64)),
            "logits": (actual["logits"][i], judged["logits"][i]),
            "probs": (actual["probs"][i], judged["probs"][i]),
            "s.logits": (actual["logits"][i], s_on_graph[i]),
            "probs.softmax": (actual["probs"][i], softmax(actual["logits"][i].astype(np.float64))),
        }
        agrees = bool(actual["logits"][i].argmax() == reference["logits"][i].argmax())
        how = "torch S on the reference rows in the graph's order" if i in permuted else "torch end to end"
        out.append(SliceJudgement(i, al, pairs, agrees, how))
    return out


def summarize(judged: list[SliceJudgement], tol: dict[str, Tolerance], min_argmax_agreement: float = 1.0,
              exclude: frozenset[int] = frozenset(), agreement_on_all: bool = False) -> dict:
    """Whole-run verdict over the slices not in ``exclude``.

    ``agreement_on_all``: the class agreement counts the excluded slices too (slices
    excused for reduced precision keep their class call in the count).

    Returns:
        ``outputs`` (one :class:`OutputComparison` dict per numeric line), ``rois`` (row
        counts), ``argmax_agreement`` (end to end), ``failing_slices``, ``failures`` (every
        failing line) and ``passed``.
    """
    kept = [j for j in judged if j.index not in exclude]
    outputs = {}
    for name in NUMERIC_LINES:
        a = np.concatenate([np.ravel(j.pairs[name][0]) for j in kept]) if kept else np.zeros(0)
        e = np.concatenate([np.ravel(j.pairs[name][1]) for j in kept]) if kept else np.zeros(0)
        outputs[name] = compare_arrays(name, a, e, line_tolerance(tol, name)).to_dict()
    counts = {k: sum(getattr(j.alignment, k) for j in kept)
              for k in ("unmatched", "missing", "intruders", "bad_padding", "cut_swaps", "reordered")}
    counts["rows"] = int(sum((j.alignment.ranks != PAD).sum() for j in kept))
    counts["permuted_slices"] = [j.index for j in kept if j.reference_logits != "torch end to end"]
    counted = judged if agreement_on_all else kept
    agreement = float(np.mean([j.class_agrees for j in counted])) if counted else 1.0
    failures = [name for name, r in outputs.items() if not r["passed"]]
    if any(j.alignment.bad_rows for j in kept):
        failures.append("rois.rows")
    if agreement < min_argmax_agreement:
        failures.append("class")
    failing = [{"index": j.index, "max_abs": f, "reference_logits": j.reference_logits}
               for j in kept if (f := j.failing(tol))]
    return {"outputs": outputs, "rois": counts, "argmax_agreement": agreement,
            "min_argmax_agreement": min_argmax_agreement, "failing_slices": failing, "failures": failures,
            "passed": not failures}


def probe_stability(reference: Runner, images: np.ndarray, expected: dict[str, np.ndarray], indices: list[int],
                    tol: dict[str, Tolerance], jitter: float, seeds: int = 2) -> dict[int, dict[str, float]]:
    """How far PyTorch moves from itself under +-``jitter`` uniform input noise, per line.

    Each slice is run again with noise (1e-6 is far below the 1/255 step of an 8-bit
    slice) and the jittered run is judged against the clean one exactly as a graph would
    be; the largest error per line over ``seeds`` runs is returned.
    """
    out = {}
    for i in indices:
        moved: dict[str, float] = {}
        clean = _rows(expected, slice(i, i + 1))
        for seed in range(seeds):
            noise = np.random.default_rng(seed).uniform(-jitter, jitter, images[i : i + 1].shape)
            run = reference.infer({INPUT: np.clip(images[i : i + 1] + noise, 0, 1).astype(np.float32)})
            for name, v in judge_slices(run, clean, tol, reference.classify)[0].magnitudes(tol).items():
                moved[name] = max(moved.get(name, 0.0), v)
        out[i] = moved
    return out


SERVED_METADATA = ("class_names", "crop", "resize", "window", "head")
"""Graph metadata the runtime acts on or reports, which must equal the checkpoint's (``metadata``
line): a graph claiming the pooled head while holding the paper's S fails here."""

DERIVED = {"probs": "logits"}
"""Lines computed from another inside the graph (probs = softmax(logits)): on a probed
slice they follow their source line, since the size of a softmax change depends on the
direction of the logit change, not only on its size."""


def unstable(failing: list[dict], moved: dict[int, dict[str, float]]) -> set[int]:
    """Failing slices on which PyTorch's own movement is comparable to the graph's error on
    every failing line (at least :data:`COMPARABLE` of it); a :data:`DERIVED` line counts
    as comparable when its source line failed there and is."""

    def comparable(i: int, errors: dict[str, float], name: str) -> bool:
        source = DERIVED.get(name)
        if source in errors:
            name = source
        return moved[i].get(name, 0.0) >= COMPARABLE * errors[name]

    return {f["index"] for f in failing if f["index"] in moved
            and all(comparable(f["index"], f["max_abs"], k) for k in f["max_abs"])}


def run_pair(reference: Runner, candidate: Runner, images: np.ndarray, batch_size: int,
             on_batch: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Run both active runners on ``images`` [M, 1, S, S] in batches; concatenate outputs."""
    ref: dict[str, list] = {}
    cand: dict[str, list] = {}
    for batch in _batches(len(images), batch_size):
        feed = {INPUT: np.ascontiguousarray(images[batch])}
        for store, runner in ((ref, reference), (cand, candidate)):
            for k, v in runner.infer(feed).items():
                store.setdefault(k, []).append(v)
        if on_batch:
            on_batch(len(feed[INPUT]))
    return ({k: np.concatenate(v) for k, v in ref.items()}, {k: np.concatenate(v) for k, v in cand.items()})


def judge_parity(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: dict[str, Tolerance],
                 classify: Callable[[np.ndarray], dict[str, np.ndarray]], min_argmax_agreement: float = 1.0,
                 probe: Callable[[list[int]], dict[int, dict[str, float]]] | None = None,
                 max_unstable_fraction: float = 0.05, off_tolerance: float = 0.0) -> dict:
    """The parity verdict of a graph's outputs against PyTorch's (see :func:`judge_slices`).

    Args:
        actual, expected, tol, classify: as for :func:`judge_slices`.
        min_argmax_agreement: fraction of slices whose class call must agree end to end.
        probe: slice indices -> PyTorch's own movement per line under input noise
            (:func:`probe_stability`); None: no slice is judged out.
        max_unstable_fraction: at most this fraction of the slices may be judged out; when
            more slices fail, none is probed or judged out (the check fails either way).
        off_tolerance: reduced precision (``PARITY_OFF_TOLERANCE``): up to this fraction of
            the slices may fail :data:`EXCUSABLE_REDUCED` lines only; they are reported as
            ``off_tolerance_slices`` and the class agreement still counts them. Replaces the
            stability probe (0: FP32 rules).

    Returns:
        :func:`summarize`'s report over the slices not judged out, plus ``unstable_slices``
        (judged out) and ``probed_slices`` (every probed slice, with the graph's error and
        PyTorch's own movement per failing line, and whether it was judged out).
    """
    judged = judge_slices(actual, expected, tol, classify)
    if off_tolerance > 0:
        return _judge_reduced(judged, expected, tol, min_argmax_agreement, off_tolerance)
    report = summarize(judged, tol, min_argmax_agreement)
    probed: list[dict] = []
    out: set[int] = set()
    # With more failing slices than may be judged out, the check fails whatever the probe
    # finds: it is skipped (it costs two reference runs per slice).
    failing = len(report["failing_slices"])
    report["probe_skipped"] = bool(probe is not None and failing > max_unstable_fraction * len(judged))
    if probe is not None and failing and not report["probe_skipped"]:
        moved = probe([f["index"] for f in report["failing_slices"]])
        out = unstable(report["failing_slices"], moved)
        probed = [{"index": f["index"], "graph_max_abs": f["max_abs"],
                   "reference_jitter_max_abs": {k: moved[f["index"]].get(k, 0.0) for k in f["max_abs"]},
                   "judged_out": f["index"] in out} for f in report["failing_slices"]]
        if out:
            report = summarize(judged, tol, min_argmax_agreement, frozenset(out))
    report["unstable_slices"] = [p for p in probed if p["judged_out"]]
    report["probed_slices"] = probed
    report["judged_reference"] = _judged_reference(judged, expected)
    return report


def _judged_reference(judged: list[SliceJudgement], expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference outputs saved for Polygraphy. ``boxes`` are left out: Polygraphy compares
    rows in place, and a legitimately reordered row's box moves by pixels (parity judges
    boxes on matched rows); it skips an output the reference does not have."""
    return {"rois": expected["rois"],
            "logits": np.stack([j.pairs["logits"][1] for j in judged]).astype(np.float32),
            "probs": np.stack([j.pairs["probs"][1] for j in judged]).astype(np.float32)}


def _judge_reduced(judged: list[SliceJudgement], expected: dict[str, np.ndarray], tol: dict[str, Tolerance],
                   min_argmax_agreement: float, off_tolerance: float) -> dict:
    """:func:`judge_parity` for an FP16 / INT8 graph (``off_tolerance`` > 0)."""
    report = summarize(judged, tol, min_argmax_agreement)
    allowed = int(np.floor(off_tolerance * len(judged)))
    excusable = [f for f in report["failing_slices"] if set(f["max_abs"]) <= EXCUSABLE_REDUCED]
    excused: list[dict] = []
    if excusable and len(excusable) <= allowed:
        excused = excusable
        report = summarize(judged, tol, min_argmax_agreement, frozenset(f["index"] for f in excused),
                           agreement_on_all=True)
    report.update(probe_skipped=False, unstable_slices=[], probed_slices=[], off_tolerance_slices=excused,
                  off_tolerance_allowed=allowed, off_tolerance_candidates=len(excusable))
    report["judged_reference"] = _judged_reference(judged, expected)
    return report


def candidate_runner(model: str | Path) -> Runner:
    """The runner of the graph under test: a TensorRT engine (``.engine``) or an ONNX graph."""
    from ctmask.trt.engine import is_engine_path

    if is_engine_path(model):
        from ctmask.runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(model)
    return OnnxRuntimeRunner(model)


def source_graph(model: str | Path, notes: list[str]) -> Path | None:
    """The ONNX file whose contents parity checks against the declared precision: the model
    itself, or for an engine the graph it was built from, when that file is still there
    unchanged (otherwise a note says the contents were not re-checked)."""
    from ctmask.trt.engine import is_engine_path, read_sidecar

    if not is_engine_path(model):
        return Path(model)
    info = read_sidecar(model)
    onnx_file = Path(info.onnx_file) if info.onnx_file else None
    if onnx_file is not None and onnx_file.is_file() and sha256_file(onnx_file) == info.onnx_sha256:
        return onnx_file
    notes.append(f"the ONNX graph {model} was built from ({info.onnx_file or 'unnamed'}, sha256 "
                 f"{info.onnx_sha256[:12]}...) is not at hand unchanged: its contents were not re-checked against "
                 "its declared precision")
    return None


def check_parity(
    checkpoint: str | Path,
    model: str | Path,
    inputs: list[str | Path],
    max_images: int = 64,
    batch_size: int = 8,
    min_argmax_agreement: float | None = None,
    polygraphy_dir: str | Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    jitter: float = 1e-6,
    max_unstable_fraction: float = 0.05,
    fp32_model: str | Path | None = None,
    labels: str | Path | None = None,
    noise_levels: tuple[float, ...] = NOISE_GRAY_LEVELS,
) -> dict:
    """PyTorch (checkpoint) against onnxruntime (model) on up to ``max_images`` slices.

    Args:
        checkpoint: classifier checkpoint the model was exported from.
        model: ctmask ONNX file.
        inputs: image files or folders.
        max_images: slices used (the first ones, in sorted order).
        batch_size: slices per inference call.
        min_argmax_agreement: fraction of slices whose predicted class must agree (default:
            ctmask's ``PARITY_AGREEMENT`` for the graph's precision: 100% FP32, 99.5% FP16,
            99% INT8).
        polygraphy_dir: if given, also write the inputs and the PyTorch outputs there in
            Polygraphy's JSON formats, for ``polygraphy run --load-inputs/--load-outputs``.
        on_batch: progress callback (slices done in the batch).
        on_start: called once with the number of slices about to be compared.
        jitter: input noise of the stability probe (:func:`probe_stability`); 0 turns
            it off. Unstable slices are reported and judged out, up to
            ``max_unstable_fraction`` of the slices; beyond that the check fails. FP32 only:
            FP16 / INT8 graphs may instead be off tolerance on ``PARITY_OFF_TOLERANCE`` of
            the slices (:func:`judge_parity`).
        fp32_model: the FP32 graph a reduced-precision graph was made from: its class calls
            (and accuracy) are reported beside the graph's.
        labels: a COVIDx-CT split file naming the slices' classes: accuracy of PyTorch, the
            graph (and the FP32 graph) is reported, and the graph's change against FP32.
        noise_levels: the model's noise floor (:mod:`ctmask.core.noise`): PyTorch's own calls
            under seeded input noise of each amplitude (gray levels), reported as
            ``noise_floor`` beside the agreement it puts in proportion; ``()`` skips it.

    Returns:
        the report of :func:`judge_parity` plus ``model``, ``checkpoint``, ``n_images``,
        ``precision``, ``tolerances`` (ctmask's table for it), ``skipped`` (unreadable
        files), ``warnings``, and the runners' descriptions.

    Raises:
        ModelError: the graph and the checkpoint are of different presets, or the graph
            declares a precision ctmask has no tolerances for.
    """
    files, skipped = collect_images(inputs)
    files = files[:max_images]
    notes: list[str] = []
    graph_file = source_graph(model, notes)
    with candidate_runner(model) as candidate, TorchRunner(checkpoint, candidates=CANDIDATES) as reference:
        spec, ref_spec = candidate.spec, reference.spec
        if (spec.preset, spec.image_size, spec.n_rois) != (ref_spec.preset, ref_spec.image_size, ref_spec.n_rois):
            raise ModelError(f"graph is preset {spec.preset!r} ({spec.image_size} px, N={spec.n_rois}) but the "
                             f"checkpoint is preset {ref_spec.preset!r} ({ref_spec.image_size} px, "
                             f"N={ref_spec.n_rois})", model)
        tol = parity_tolerances(spec.precision, model)
        if graph_file is not None:
            proto = load_proto(graph_file)
            reduced = json.loads({p.key: p.value for p in proto.metadata_props}.get("ctmask.reduced_blocks", "null"))
            contradictions = precision_problems(proto, spec, reduced if isinstance(reduced, list) else None)
            del proto
            if contradictions:
                raise ModelError("the graph's contents contradict its metadata: " + "; ".join(contradictions),
                                 graph_file)
        if min_argmax_agreement is None:
            min_argmax_agreement = PARITY_AGREEMENT[spec.precision]
        off_tolerance = PARITY_OFF_TOLERANCE[spec.precision]
        # What the runtime reads from the graph's metadata must be what the model was trained with.
        mismatches = {name: {"graph": getattr(spec, name), "checkpoint": getattr(ref_spec, name)}
                      for name in SERVED_METADATA if getattr(spec, name) != getattr(ref_spec, name)}
        warnings = list(notes)
        declared = spec.declared_tolerances
        if declared is not None and declared != tol:
            warnings.append(f"{model} declares its own parity tolerances; they are ignored: ctmask judges a "
                            f"{spec.precision} graph by its own table")
        ref_sha = sha256_file(checkpoint)
        if spec.checkpoint_sha256 and spec.checkpoint_sha256 != ref_sha:
            warnings.append(f"{model} was exported from a different checkpoint (sha256 {spec.checkpoint_sha256[:12]}"
                            f"..., {checkpoint} is {ref_sha[:12]}...)")
        if spec.weights_sha256 and ref_spec.weights_sha256 and spec.weights_sha256 != ref_spec.weights_sha256:
            warnings.append(f"{model} holds other weights than {checkpoint} (weights digest "
                            f"{spec.weights_sha256[:12]}... against {ref_spec.weights_sha256[:12]}...)")
        loaded = load_batch(files, spec)
        images, ok, bad = loaded.batch, loaded.paths, loaded.failures
        skipped += bad
        if not ok:
            raise ConfigError("no readable slices to compare: " + "; ".join(f"{f.file}: {f.reason}" for f in skipped))
        if on_start:
            on_start(len(ok))
        expected, actual = run_pair(reference, candidate, images, batch_size, on_batch)
        runners = {"reference": reference.describe(), "candidate": candidate.describe()}
        wrong = {k: list(actual[k].shape) if k in actual else "missing"
                 for k, shape in spec.output_shapes(len(ok)).items() if k not in actual or actual[k].shape != shape}
        if wrong:
            raise ModelError(f"graph outputs {wrong} do not have the shapes its metadata declares "
                             f"{ {k: list(v) for k, v in spec.output_shapes(len(ok)).items()} }", model)

        def probe(indices: list[int]) -> dict[int, dict[str, float]]:
            return probe_stability(reference, images, expected, indices, tol, jitter)

        report = judge_parity(actual, expected, tol, reference.classify, min_argmax_agreement,
                              probe if jitter > 0 and off_tolerance == 0 else None, max_unstable_fraction,
                              off_tolerance)
        report["decisions"] = decisions_report(ok, expected, actual, spec, model, fp32_model, labels, images,
                                               batch_size)
        if noise_levels:
            report["noise_floor"] = reference_noise_floor(reference, images, expected, batch_size, noise_levels)
    judged_reference = report.pop("judged_reference")
    report["metadata_mismatches"] = mismatches
    if mismatches:
        report["failures"].append("metadata")
        report["passed"] = False
    for item in report["failing_slices"] + report["probed_slices"]:
        item["file"] = str(ok[item["index"]])
    if polygraphy_dir is not None:
        save_for_polygraphy(polygraphy_dir, images, judged_reference, batch_size)
    return {
        "model": str(model),
        "checkpoint": str(checkpoint),
        "preset": spec.preset,
        "precision": spec.precision,
        "tolerances": {k: t.to_dict() for k, t in tol.items()},
        "reference_candidates": int(expected["candidates"].shape[1] - spec.n_rois),
        "n_images": len(ok),
        "batch_size": batch_size,
        "skipped": [f.to_dict() for f in skipped if isinstance(f, Failure)],
        "warnings": warnings,
        "runners": runners,
        "head": ref_spec.head,
        **report,
    }


def reference_noise_floor(reference: TorchRunner, images: np.ndarray, expected: dict[str, np.ndarray],
                          batch_size: int, levels: tuple[float, ...]) -> dict:
    """PyTorch's own class calls under seeded input noise (:class:`ctmask.core.noise.NoiseFloor`)."""
    floor = NoiseFloor(levels)
    for b in _batches(len(images), batch_size):
        floor.measure(lambda x: reference.infer({INPUT: x})["logits"], images[b], expected["logits"][b])
    return floor.to_dict()


def slice_labels(files: list[Path], split: str | Path) -> np.ndarray:
    """Class of each file from a COVIDx-CT split (by resolved path, else by file name); -1 if absent."""
    from ctmask.data.covidx import read_split

    entries = read_split(split, check_exists=False)
    by_path = {e.path.resolve(): e.label for e in entries}
    by_name = {e.path.name: e.label for e in entries}
    return np.array([by_path.get(Path(f).resolve(), by_name.get(Path(f).name, -1)) for f in files])


def decisions_report(files: list[Path], expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                     spec: GraphSpec, model: str | Path, fp32_model: str | Path | None,
                     labels: str | Path | None, images: np.ndarray, batch_size: int) -> dict:
    """Class calls of the graph against PyTorch FP32 (and the FP32 graph), accuracy with labels."""
    calls = {"pytorch_fp32": expected["logits"].argmax(-1), spec.precision: actual["logits"].argmax(-1)}
    out: dict = {"precision": spec.precision,
                 "agreement_vs_pytorch_fp32": float(np.mean(calls[spec.precision] == calls["pytorch_fp32"])),
                 "changed_vs_pytorch_fp32": int(np.sum(calls[spec.precision] != calls["pytorch_fp32"]))}
    if fp32_model is not None:
        with OnnxRuntimeRunner(fp32_model) as fp32:
            if fp32.spec.precision != "fp32" or fp32.spec.preset != spec.preset:
                raise ModelError(f"--fp32 must be the FP32 graph of the same preset; it is {fp32.spec.precision}, "
                                 f"preset {fp32.spec.preset}", fp32_model)
            if spec.precision != "fp32" and content_sha256(load_proto(fp32_model)) != spec.source_sha256:
                raise ModelError(f"{model} was not made from this FP32 graph (its source's content sha256 is "
                                 f"{spec.source_sha256[:12] or 'missing'}...)", fp32_model)
            logits = np.concatenate([fp32.infer({INPUT: np.ascontiguousarray(images[b])})["logits"]
                                     for b in _batches(len(images), batch_size)])
        calls["fp32_graph"] = logits.argmax(-1)
        out["agreement_vs_fp32_graph"] = float(np.mean(calls[spec.precision] == calls["fp32_graph"]))
        out["changed_vs_fp32_graph"] = int(np.sum(calls[spec.precision] != calls["fp32_graph"]))
    if labels is not None:
        y = slice_labels(files, labels)
        known = y >= 0
        out["labelled"] = int(known.sum())
        if known.any():
            acc = {k: float(np.mean(v[known] == y[known])) for k, v in calls.items()}
            out["accuracy"] = acc
            base = acc.get("fp32_graph", acc["pytorch_fp32"])
            out["accuracy_change_vs_fp32"] = acc[spec.precision] - base
    return out


def save_for_polygraphy(out_dir: str | Path, images: np.ndarray, expected: dict[str, np.ndarray],
                        batch_size: int) -> dict[str, Path]:
    """Write ``inputs.json`` and ``reference_outputs.json`` (runner "pytorch") for Polygraphy.

    ``expected`` should be the judged reference (PyTorch's rows, and the logits each
    slice was judged against); Polygraphy compares elementwise, so judge ``rois`` there
    with a robust statistic (median).

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
