"""Parity: run the PyTorch reference and an exported graph on the same tensors and judge
every output against ctmask's own tolerances for the graph's declared precision.

The definition (docs/parity.md states it in one paragraph):

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

Running and judging are separate: :func:`ctmask.backends.parity.run_pair` produces two
output dicts, :func:`judge_parity` (numpy; S passed in as a callable) judges them, and
:func:`ctmask.backends.parity.check_parity` (which makes the runners) reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
from ctmask.core.spec import INPUT, Tolerance
from ctmask.runtime.runner import Runner

COMPARABLE = 0.5
"""A failing slice is judged out as unstable only when PyTorch, under input noise, moves
by at least this fraction of the graph's error on every line the graph failed there."""

CANDIDATES = 64
"""K: the reference ranks N + K candidates, so rows entering at the N cut are matched."""

NUMERIC_LINES = ("rois.score", "rois.deltas", "rois.order", "boxes", "labels", "logits", "probs", "s.logits",
                 "probs.softmax")
"""Judged numeric lines: ``s.logits`` is the graph's logits against PyTorch's S applied to
the graph's own RoIs (S checked on its own, to full precision); ``probs.softmax`` the
graph's probs against the softmax of its own logits (never excusable: PyTorch's own
movement on it is zero); ``labels`` each matched row's lesion class against its partner's,
exactly (:data:`EXACT_LINES`; empty for a graph without ``labels``)."""

EXACT_LINES = {"labels": Tolerance(0.0)}
"""Lines judged exactly whatever the precision: a class id is right or wrong."""

TOLERANCE_OF = {"s.logits": "logits", "probs.softmax": "probs"}
"""Lines judged with another line's tolerance, unless the precision's table names them."""

EXCUSABLE_REDUCED = frozenset({"rois.score", "rois.deltas", "rois.order", "rois.rows", "boxes", "labels", "logits",
                               "probs", "class"})
"""Lines an FP16 / INT8 graph may fail on a few slices (up to the precision's
``PARITY_OFF_TOLERANCE``): reduced precision legitimately moves near-tied rows and
proposals. Its class agreement still counts every slice; ``s.logits`` (S on the graph's
own RoIs), ``probs.softmax`` and the metadata are never excused."""


def line_tolerance(tol: dict[str, Tolerance], name: str) -> Tolerance:
    """The tolerance judging line ``name``: its own entry, else the one it borrows."""
    if name in EXACT_LINES:
        return EXACT_LINES[name]
    return tol[name] if name in tol else tol[TOLERANCE_OF.get(name, name)]


def take_rows(outputs: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The same rows (slices) of every output."""
    return {k: v[index] for k, v in outputs.items()}


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


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
        actual: ``rois`` [B, N, 5], ``logits`` / ``probs`` [B, 3], ``boxes`` [B, N, 4] (and
            ``labels`` [B, N] where the graph has them) of the graph.
        reference: the same from PyTorch plus ``candidates`` [B, N + K, 5], the reference's
            ranking of more candidates than it keeps (its first N rows are ``rois``), their
            decoded boxes ``candidate_boxes`` [B, N + K, 4] and ``candidate_labels`` [B, N + K].
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
        labelled = "labels" in actual and "candidate_labels" in reference
        paired = m & (ranks >= 0)
        pairs = {
            "rois.score": (a[m, 0], e[al.ranks[m], 0]),
            "rois.deltas": (a[m, 1:], e[al.ranks[m], 1:]),
            "rois.order": (np.array([max(al.order_gap, al.rise)]), np.zeros(1)),
            "boxes": (actual["boxes"][i][shown].astype(np.float64), partner[shown].astype(np.float64)),
            "labels": ((actual["labels"][i][paired].astype(np.float64),
                        reference["candidate_labels"][i][ranks[paired]].astype(np.float64))
                       if labelled else (np.zeros(0), np.zeros(0))),
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
        clean = take_rows(expected, slice(i, i + 1))
        for seed in range(seeds):
            noise = np.random.default_rng(seed).uniform(-jitter, jitter, images[i : i + 1].shape)
            run = reference.infer({INPUT: np.clip(images[i : i + 1] + noise, 0, 1).astype(np.float32)})
            for name, v in judge_slices(run, clean, tol, reference.classify)[0].magnitudes(tol).items():
                moved[name] = max(moved.get(name, 0.0), v)
        out[i] = moved
    return out


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


def judge_parity(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: dict[str, Tolerance],
                 classify: Callable[[np.ndarray], dict[str, np.ndarray]], min_argmax_agreement: float = 1.0,
                 probe: Callable[[list[int]], dict[int, dict[str, float]]] | None = None,
                 max_unstable_fraction: float = 0.05, off_tolerance: float = 0.0,
                 judged: list[SliceJudgement] | None = None) -> dict:
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
        judged: the slices already judged by :func:`judge_slices` (None: judged here).

    Returns:
        :func:`summarize`'s report over the slices not judged out, plus ``unstable_slices``
        (judged out) and ``probed_slices`` (every probed slice, with the graph's error and
        PyTorch's own movement per failing line, and whether it was judged out).
    """
    if judged is None:
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
