"""Output comparison maths for parity checks (numpy and scipy; no torch).

Every numeric output is judged elementwise, ``|actual - expected| <= atol + rtol * |expected|``,
and the report says how far off it was and which tolerance would have been needed.

Ranked RoIs are judged against a reference that ranked *more* candidates than the graph
keeps (N + K rows from the same module): every real row of the graph is matched
one-to-one to the reference candidate it is (:func:`align_rows`), so a row that entered
at the N cut is checked against its own reference values, not excused. Two rows may come
out in the other order only when their reference scores are within the ``rois.order``
tolerance; a reference row may be missing from the graph only when a candidate ranked
below N by the reference took its place and both scores are within that tolerance of
each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ctmask.core.spec import Tolerance


@dataclass
class OutputComparison:
    """Error statistics of one output against its reference.

    ``required_atol`` is the smallest atol that would pass at the configured rtol;
    ``required_rtol`` the smallest rtol that would pass at the configured atol.
    """

    name: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    required_atol: float
    required_rtol: float
    n_failing: int
    passed: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def compare_arrays(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> OutputComparison:
    """Elementwise error statistics of ``actual`` against ``expected`` (same shape).

    Non-finite values fail unless both sides hold the same one.

    Raises:
        ValueError: the shapes differ.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"{name}: shape {a.shape} does not match the reference shape {e.shape}")
    same_special = (a == e) | (np.isnan(a) & np.isnan(e))
    diff = np.where(same_special, 0.0, np.abs(a - e))
    diff = np.where(np.isnan(diff), np.inf, diff)
    mag = np.abs(np.where(np.isfinite(e), e, 0.0))
    fails = diff > tol.atol + tol.rtol * mag
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / mag)
        need_rtol = np.where(diff <= tol.atol, 0.0, (diff - tol.atol) / mag)
    n = diff.size
    return OutputComparison(
        name=name,
        shape=tuple(a.shape),
        atol=tol.atol,
        rtol=tol.rtol,
        max_abs=float(diff.max()) if n else 0.0,
        mean_abs=float(diff.mean()) if n else 0.0,
        max_rel=float(rel.max()) if n else 0.0,
        mean_rel=float(rel.mean()) if n else 0.0,
        required_atol=float(np.maximum(diff - tol.rtol * mag, 0.0).max()) if n else 0.0,
        required_rtol=float(need_rtol.max()) if n else 0.0,
        n_failing=int(fails.sum()),
        passed=not bool(fails.any()),
    )


PAD = -1
"""Rank code of a padding row (all zeros) in :attr:`RowAlignment.ranks`."""
UNMATCHED = -2
"""Rank code of a real graph row that matches no reference candidate."""
_INFEASIBLE = 1e12


@dataclass
class RowAlignment:
    """How one slice's ranked RoI rows map onto the reference's ranked candidates.

    Attributes:
        ranks: int64 [N], the reference rank each graph row was matched to; :data:`PAD`
            for padding, :data:`UNMATCHED` for a real row with no reference partner.
        unmatched: real graph rows that are no reference candidate (score and deltas).
        missing: reference top-N rows absent from the graph and not explained by a cut swap.
        intruders: graph rows matched to candidates the reference ranked below N, not
            explained by a cut swap.
        cut_swaps: graph rows matched to candidates ranked below N that legitimately took
            the place of as many missing top-N rows whose scores are within the order
            tolerance of theirs.
        reordered: matched rows placed below a row that the reference ranked lower.
        bad_padding: rows breaking the padding rule (a zero-score row with non-zero deltas,
            or a real row after padding).
        order_gap: largest reference-score gap between two rows the graph put in the other
            order (0 when in order); also covers the gap of a cut swap.
        rise: largest increase of the graph's own score from one real row to the next
            (rows must be score-descending).
    """

    ranks: np.ndarray
    unmatched: int = 0
    missing: int = 0
    intruders: int = 0
    cut_swaps: int = 0
    reordered: int = 0
    bad_padding: int = 0
    order_gap: float = 0.0
    rise: float = 0.0

    @property
    def bad_rows(self) -> int:
        """Rows that break the one-to-one correspondence with the reference."""
        return self.unmatched + self.missing + self.intruders + self.bad_padding

    @property
    def permuted(self) -> bool:
        """Whether the graph's rows differ in order or membership from the reference's top N."""
        return self.reordered > 0 or self.cut_swaps > 0


def _limit(values: np.ndarray, tol: Tolerance) -> np.ndarray:
    return tol.atol + tol.rtol * np.abs(values)


def align_rows(actual: np.ndarray, candidates: np.ndarray, n: int, tol: dict[str, Tolerance]) -> RowAlignment:
    """Match one slice's graph rows to the reference's ranked candidates, one to one.

    A graph row may match a reference candidate whose score is within the ``rois.score``
    tolerance; among all such one-to-one assignments the one with the smallest summed
    normalised error (deltas, then score) is taken (Hungarian algorithm), so near-tied
    candidates are told apart by their deltas. Whether the matched deltas are *within*
    tolerance is judged afterwards, on the matched pairs.

    Args:
        actual: float [N, 5] graph rows ``(score, dx, dy, dw, dh)``, zero rows = padding.
        candidates: float [N + K, 5] reference rows, score-descending, zero rows = padding.
        n: N, the rows the graph keeps (the reference's first ``n`` rows are its output).
        tol: parity tolerances (``rois.score``, ``rois.deltas``, ``rois.order``).
    """
    from scipy.optimize import linear_sum_assignment

    a, e = np.asarray(actual, np.float64), np.asarray(candidates, np.float64)
    if a.ndim != 2 or e.ndim != 2 or a.shape[1] != 5 or e.shape[1] != 5 or len(e) < len(a) or len(a) != n:
        raise ValueError(f"rois: expected [N, 5] graph rows and [N + K, 5] reference rows with N = {n}, got "
                         f"{a.shape} and {e.shape}")
    tau = tol["rois.order"].atol
    real = a[:, 0] != 0
    first_pad = int(np.argmin(real)) if not real.all() else len(a)
    bad_padding = int((~real & np.any(a[:, 1:] != 0, axis=1)).sum() + real[first_pad:].sum())
    ranks = np.where(real, UNMATCHED, PAD).astype(np.int64)
    ia, ie = np.flatnonzero(real), np.flatnonzero(e[:, 0] != 0)
    if len(ia) and len(ie):
        s_err = np.abs(a[ia, None, 0] - e[None, ie, 0])
        s_lim = _limit(e[ie, 0], tol["rois.score"])[None]
        d_err = (np.abs(a[ia, None, 1:] - e[None, ie, 1:]) / _limit(e[ie, 1:], tol["rois.deltas"])[None]).max(-1)
        # A non-finite delta still matches by score (and then fails the deltas check).
        d_err = np.where(np.isfinite(d_err), np.minimum(d_err, _INFEASIBLE / 1e3), _INFEASIBLE / 1e3)
        cost = np.where(s_err <= s_lim, d_err + s_err / s_lim, _INFEASIBLE)
        rows, cols = linear_sum_assignment(cost)
        ok = cost[rows, cols] < _INFEASIBLE
        ranks[ia[rows[ok]]] = ie[cols[ok]]
    matched = ranks >= 0
    n_ref = int(min(n, (e[:, 0] != 0).sum()))
    missing = np.setdiff1d(np.arange(n_ref), ranks[matched])
    extra = ranks[matched & (ranks >= n)]
    out = RowAlignment(ranks=ranks, unmatched=int((ranks == UNMATCHED).sum()), bad_padding=bad_padding)
    if len(missing) and len(missing) == len(extra) and e[missing.min(), 0] - e[extra.max(), 0] <= tau:
        out.cut_swaps = len(extra)
        out.order_gap = float(e[missing.min(), 0] - e[extra.max(), 0])
    else:
        out.missing, out.intruders = len(missing), len(extra)
    # Rows in graph order: each must not sit below a row the reference ranked lower,
    # unless their reference scores are within the order tolerance.
    r = ranks[matched]
    if len(r) > 1:
        before = np.maximum.accumulate(r)[:-1]
        inverted = before > r[1:]
        out.reordered = int(inverted.sum())
        if inverted.any():
            gaps = e[r[1:][inverted], 0] - e[before[inverted], 0]
            out.order_gap = max(out.order_gap, float(gaps.max()))
    s = a[:first_pad, 0]
    out.rise = float(max(0.0, np.diff(s).max())) if len(s) > 1 else 0.0
    return out


def reference_in_graph_order(alignment: RowAlignment, candidates: np.ndarray) -> np.ndarray:
    """The reference's own rows in the graph's order and membership: [N, 5].

    Row ``k`` is the reference candidate matched to graph row ``k``; padding stays zero.
    Only meaningful for an alignment without bad rows.
    """
    rows = np.zeros((len(alignment.ranks), 5), candidates.dtype)
    keep = alignment.ranks >= 0
    rows[keep] = candidates[alignment.ranks[keep]]
    return rows


def argmax_agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis agrees (1.0 for no rows)."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(-1) == e.argmax(-1)).mean())
