"""Output comparison maths for parity checks (numpy only).

Every output is judged elementwise, ``|actual - expected| <= atol + rtol * |expected|``,
and the report says how far off it was and which tolerance would have been needed.
Ranked RoIs get a tie-robust comparison: two candidates whose scores differ by less
than the numerical noise may legitimately trade places (or trade the last row), so
score columns are compared as sorted values and delta rows are matched to rows of
(nearly) the same score before their values are compared.
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


@dataclass
class RoIMatch:
    """Result of matching the rows of one ranked-RoI batch to the reference's.

    Attributes:
        actual_rows: int [M], matched row indices into the actual output (flattened B*N).
        expected_rows: int [M], the reference rows they were matched to.
        reordered: matched pairs whose row positions differ (near-tie swaps).
        boundary: reference rows left unmatched only because they tie with the last
            row's score (the candidate set differs at the cut-off, legitimately).
        unmatched: reference rows with no partner within the score window: a defect.
        tie_affected: indices of images with reordered or boundary rows: S saw a
            different row order there, so their logits may legitimately differ.
    """

    actual_rows: np.ndarray
    expected_rows: np.ndarray
    reordered: int
    boundary: int
    unmatched: int
    tie_affected: list[int]


def match_roi_rows(actual: np.ndarray, expected: np.ndarray, window: float,
                   delta_tol: Tolerance | None = None) -> RoIMatch:
    """Match ranked-RoI rows of ``actual`` to ``expected``, tolerating near-tie swaps.

    Within each image, a reference row may be matched to any not-yet-matched actual row
    whose score is within ``window``; among those the one with the closest deltas wins.
    A reference row that ties with the cut-off score (all N rows filled) and has no
    partner with matching deltas is a *boundary* row: the other side kept a different
    candidate of the same score.

    Args:
        actual: float [B, N, 5] rows (score, dx, dy, dw, dh), score-descending.
        expected: float [B, N, 5], the reference.
        window: largest score difference still considered a tie (the score atol).
        delta_tol: what "matching deltas" means at the cut-off (default: exact).
    """
    delta_tol = delta_tol or Tolerance(0.0)
    if actual.shape != expected.shape or actual.ndim != 3 or actual.shape[-1] != 5:
        raise ValueError(f"rois: expected two [B, N, 5] arrays, got {actual.shape} and {expected.shape}")
    b, n, _ = expected.shape
    act_rows, exp_rows = [], []
    reordered = boundary = unmatched = 0
    affected = []
    for i in range(b):
        before = reordered + boundary
        a, e = actual[i].astype(np.float64), expected[i].astype(np.float64)
        free = np.ones(n, dtype=bool)
        # With all N rows filled on both sides, the lowest score is the cut-off: a row
        # that ties with it may be in one output and not the other.
        cut = min(a[:, 0].min(), e[:, 0].min())
        full = cut > 0
        for j in np.argsort(-e[:, 0], kind="stable"):
            at_cut = full and e[j, 0] - cut <= window
            cand = np.flatnonzero(free & (np.abs(a[:, 0] - e[j, 0]) <= window))
            if len(cand):
                err = np.abs(a[cand, 1:] - e[j, 1:]) - delta_tol.rtol * np.abs(e[j, 1:])
                best = cand[np.argmin(err.max(axis=1))]
                if at_cut and err.max(axis=1).min() > delta_tol.atol:
                    cand = []
            if not len(cand):
                boundary += int(at_cut)
                unmatched += int(not at_cut)
                continue
            free[best] = False
            reordered += int(best != j)
            act_rows.append(i * n + best)
            exp_rows.append(i * n + j)
        if reordered + boundary > before:
            affected.append(i)
    return RoIMatch(np.array(act_rows, dtype=np.int64), np.array(exp_rows, dtype=np.int64),
                    reordered, boundary, unmatched, affected)


def compare_rois(
    actual: np.ndarray, expected: np.ndarray, score_tol: Tolerance, delta_tol: Tolerance
) -> tuple[list[OutputComparison], dict]:
    """Tie-robust comparison of ranked RoI batches [B, N, 5].

    Returns:
        ``[rois.score, rois.deltas]`` comparisons and a dict of matching counts
        (``reordered_rows``, ``boundary_rows``, ``unmatched_rows``) and the
        ``tie_affected_images``. Scores are compared
        as per-image sorted values; deltas on matched rows. Unmatched rows fail the
        deltas check.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    match = match_roi_rows(a, e, score_tol.atol, delta_tol)
    scores = compare_arrays("rois.score", -np.sort(-a[..., 0], axis=1), -np.sort(-e[..., 0], axis=1), score_tol)
    flat_a, flat_e = a.reshape(-1, 5), e.reshape(-1, 5)
    deltas = compare_arrays("rois.deltas", flat_a[match.actual_rows, 1:], flat_e[match.expected_rows, 1:], delta_tol)
    if match.unmatched:
        deltas.passed = False
        deltas.n_failing += 4 * match.unmatched
    counts = {
        "rows": int(e.shape[0] * e.shape[1]),
        "reordered_rows": match.reordered,
        "boundary_rows": match.boundary,
        "unmatched_rows": match.unmatched,
        "tie_affected_images": match.tie_affected,
    }
    return [scores, deltas], counts


def argmax_agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis agrees (1.0 for no rows)."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(-1) == e.argmax(-1)).mean())
