"""Output comparison maths and the graph spec (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from tests_helpers import ranked_rows

from ctmask.core.compare import align_rows, argmax_agreement, compare_arrays, reference_in_graph_order
from ctmask.core.errors import ModelError
from ctmask.core.presets import PAPER, SMALL
from ctmask.core.spec import DEFAULT_TOLERANCES, GraphSpec, Tolerance


def test_compare_arrays_reports_needed_tolerance():
    e = np.array([1.0, -2.0, 0.5], np.float32)
    a = e + np.array([1e-5, -3e-4, 0.0], np.float32)
    r = compare_arrays("x", a, e, Tolerance(1e-4))
    assert not r.passed and r.n_failing == 1
    assert r.max_abs == pytest.approx(3e-4, rel=1e-3)
    assert r.required_atol == pytest.approx(3e-4, rel=1e-3)
    assert r.required_rtol == pytest.approx((3e-4 - 1e-4) / 2.0, rel=1e-2)
    ok = compare_arrays("x", a, e, Tolerance(r.required_atol * 1.001))
    assert ok.passed


def test_compare_arrays_nan_and_shape():
    e = np.array([1.0, np.nan])
    assert compare_arrays("x", e.copy(), e, Tolerance(1e-3)).passed
    assert not compare_arrays("x", np.array([1.0, 2.0]), e, Tolerance(1e-3)).passed
    with pytest.raises(ValueError, match="shape"):
        compare_arrays("x", np.zeros(3), np.zeros(4), Tolerance(1.0))


TOL = DEFAULT_TOLERANCES
TAU = TOL["rois.order"].atol


def candidates(n=16, k=8, seed=0):
    """Reference ranking of n + k candidates (well-separated scores) and its first n rows."""
    e = ranked_rows(n_images=1, n=n + k, seed=seed)[0]
    return e, e[:n].copy()


def test_identical_rows_align_in_order():
    e, a = candidates()
    al = align_rows(a, e, 16, TOL)
    assert list(al.ranks) == list(range(16)) and al.bad_rows == 0 and not al.permuted
    assert al.order_gap == 0 and al.rise == 0


def test_near_tie_swap_is_allowed_only_within_the_order_tolerance():
    e, _ = candidates()
    e[5, 0] = e[4, 0] - 0.4 * TAU  # two candidates that tie within the precision
    a = e[:16].copy()
    a[[4, 5], 1:] = e[[5, 4], 1:]  # ... come out in the other order (scores still sorted)
    al = align_rows(a, e, 16, TOL)
    assert al.bad_rows == 0 and al.reordered == 1 and al.permuted and al.order_gap <= TAU
    assert list(al.ranks[:6]) == [0, 1, 2, 3, 5, 4]
    # The same swap between well-separated candidates breaks the order.
    e2, a2 = candidates()
    a2[[4, 5]] = e2[[5, 4]]
    al = align_rows(a2, e2, 16, TOL)
    assert al.bad_rows == 0 and al.order_gap == pytest.approx(e2[4, 0] - e2[5, 0]) and al.order_gap > TAU
    assert al.rise > 0  # and the graph's own scores no longer descend


def test_a_candidate_entering_at_the_cut_is_matched_and_checked():
    e, a = candidates()
    e[16, 0] = e[15, 0] - 0.3 * TAU  # rank 16 nearly ties with the last kept row
    a[15] = e[16]  # the graph kept rank 16 instead of rank 15
    al = align_rows(a, e, 16, TOL)
    assert al.cut_swaps == 1 and al.missing == al.intruders == al.unmatched == 0 and al.ranks[15] == 16
    # Its deltas are compared against rank 16's own: 50% off there is found.
    wrong = a.copy()
    wrong[15, 1:] *= 1.5
    al = align_rows(wrong, e, 16, TOL)
    assert al.ranks[15] == 16
    assert not compare_arrays("d", wrong[15, 1:], e[al.ranks[15], 1:], TOL["rois.deltas"]).passed
    # A candidate from far below the cut is no tie: missing + intruder.
    far = candidates()[1]
    far[15] = e[20]
    al = align_rows(far, e, 16, TOL)
    assert al.missing == 1 and al.intruders == 1 and al.bad_rows == 2


def test_unmatched_rows_and_broken_padding_are_bad_rows():
    e, a = candidates()
    a[3, 0] += 0.01  # a score no reference candidate has
    assert align_rows(a, e, 16, TOL).unmatched == 1
    e_pad = e.copy()
    e_pad[12:] = 0  # the reference keeps 12 real rows
    a = e_pad[:16].copy()
    assert align_rows(a, e_pad, 16, TOL).bad_rows == 0
    a[13, 2] = 0.5  # a padding row with non-zero deltas
    assert align_rows(a, e_pad, 16, TOL).bad_padding == 1
    rev = e_pad[:16][::-1].copy()  # real rows after the padding
    al = align_rows(rev, e_pad, 16, TOL)
    assert al.bad_padding == 12 and al.order_gap > TAU
    short = e_pad[:16].copy()
    short[11] = 0  # one real row dropped
    al = align_rows(short, e_pad, 16, TOL)
    assert al.missing == 1 and al.bad_rows == 1
    with pytest.raises(ValueError):
        align_rows(a[:, :4], e, 16, TOL)


def test_rows_in_graph_order_from_the_reference():
    e, _ = candidates()
    e[5, 0] = e[4, 0] - 1e-6
    a = e[:16].copy()
    a[[4, 5]] = a[[5, 4]]
    a[:, 1:] += 1e-5  # the graph's own values are near, not equal
    rows = reference_in_graph_order(align_rows(a, e, 16, TOL), e)
    np.testing.assert_array_equal(rows, e[[0, 1, 2, 3, 5, 4, *range(6, 16)]])


def test_tolerances_come_from_the_table_not_the_file():
    meta = GraphSpec.for_preset(SMALL).metadata()
    meta["ctmask.tolerances"] = '{"logits": {"atol": 10.0, "rtol": 0}}'
    spec = GraphSpec.from_metadata(meta, "m.onnx")
    assert spec.tolerances["logits"] == Tolerance(1e-3) and spec.declared_tolerances["logits"] == Tolerance(10.0)
    with pytest.raises(ModelError, match="precision 'fp8'"):
        _ = GraphSpec.from_metadata(meta | {"ctmask.precision": "fp8"}, "m.onnx").tolerances


def test_argmax_agreement():
    e = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert argmax_agreement(e, e) == 1.0
    assert argmax_agreement(e[:, ::-1], e) == 0.5


def test_spec_metadata_round_trip():
    spec = GraphSpec.for_preset(PAPER, checkpoint_sha256="ab" * 32, checkpoint_name="cls.pt")
    meta = spec.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert {"ctmask.version", "ctmask.preset", "ctmask.n_rois", "ctmask.input_size", "ctmask.class_names",
            "ctmask.window", "ctmask.checkpoint_sha256"} <= set(meta)
    back = GraphSpec.from_metadata(meta, "m.onnx")
    assert back == spec
    assert back.output_shapes(4) == {"rois": (4, 256, 5), "logits": (4, 3), "probs": (4, 3), "boxes": (4, 256, 4),
                                     "labels": (4, 256)}
    assert GraphSpec.for_preset(SMALL).input_shape() == ("batch", 1, 192, 192)


def test_spec_from_foreign_metadata_is_a_clear_error():
    with pytest.raises(ModelError, match="no ctmask metadata") as exc:
        GraphSpec.from_metadata({"producer": "someone"}, "other.onnx")
    assert "ctmask export" in str(exc.value) and "other.onnx" in str(exc.value)
    meta = GraphSpec.for_preset(SMALL).metadata()
    meta["ctmask.n_rois"] = "many"
    with pytest.raises(ModelError, match="malformed"):
        GraphSpec.from_metadata(meta, "m.onnx")
    meta = GraphSpec.for_preset(SMALL).metadata() | {"ctmask.format": "ctmask-onnx/99"}
    with pytest.raises(ModelError, match="unsupported graph format"):
        GraphSpec.from_metadata(meta, "m.onnx")
