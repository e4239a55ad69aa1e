"""Output comparison maths and the graph spec (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from tests_helpers import ranked_rows

from ctmask.core.compare import argmax_agreement, compare_arrays, compare_rois, match_roi_rows
from ctmask.core.presets import PAPER, SMALL
from ctmask.core.spec import DEFAULT_TOLERANCES, GraphSpec, ModelError, Tolerance

SCORE, DELTA = DEFAULT_TOLERANCES["rois.score"], DEFAULT_TOLERANCES["rois.deltas"]


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


def test_identical_rois_pass_with_no_reordering():
    e = ranked_rows(pad=3)
    (scores, deltas), counts = compare_rois(e.copy(), e, SCORE, DELTA)
    assert scores.passed and deltas.passed
    assert counts == {"rows": 48, "reordered_rows": 0, "boundary_rows": 0, "unmatched_rows": 0,
                      "tie_affected_images": []}


def test_near_tie_swap_is_tolerated():
    e = ranked_rows()
    e[1, 5, 0] = e[1, 4, 0] - 1e-7  # two candidates that tie within float noise
    a = e.copy()
    a[1, [4, 5]] = e[1, [5, 4]]  # ... come out in the other order
    a[1, 4, 0], a[1, 5, 0] = e[1, 4, 0], e[1, 5, 0]  # scores still sorted
    (scores, deltas), counts = compare_rois(a, e, SCORE, DELTA)
    assert scores.passed and deltas.passed
    assert counts["reordered_rows"] == 2 and counts["unmatched_rows"] == 0
    assert counts["tie_affected_images"] == [1]
    # A plain elementwise check would have failed on the deltas.
    assert not compare_arrays("rois", a, e, DELTA).passed


def test_cut_off_tie_is_tolerated_but_a_missing_row_is_not():
    e = ranked_rows(n_images=1)
    a = e.copy()
    a[0, -1, 1:] = [9.0, 9.0, 9.0, 9.0]  # another candidate with the same last score
    a[0, -1, 0] += 5e-8
    (_, deltas), counts = compare_rois(a, e, SCORE, DELTA)
    assert deltas.passed and counts["boundary_rows"] == 1
    b = e.copy()
    b[0, 3:-1] = e[0, 4:]  # row 3 vanished (e.g. a broken NMS) and one row moved up
    b[0, -1] = e[0, -1]
    b[0, -1, 0] -= 1e-9
    (_, deltas), counts = compare_rois(b, e, SCORE, DELTA)
    assert counts["unmatched_rows"] >= 1 and not deltas.passed


def test_real_defects_fail():
    e = ranked_rows()
    bad_delta = e.copy()
    bad_delta[0, 2, 3] += 0.05
    assert not compare_rois(bad_delta, e, SCORE, DELTA)[0][1].passed
    bad_score = e.copy()
    bad_score[2, :, 0] *= 1.001
    assert not compare_rois(bad_score, e, SCORE, DELTA)[0][0].passed
    with pytest.raises(ValueError):
        match_roi_rows(e[:, :, :4], e[:, :, :4], 1e-4)


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
    assert back.output_shapes(4) == {"rois": (4, 256, 5), "logits": (4, 3), "probs": (4, 3)}
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
