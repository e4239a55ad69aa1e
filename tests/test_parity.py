"""Parity judging: near-tied RoIs change S's input, so those slices are re-judged."""

from __future__ import annotations

import numpy as np
from tests_helpers import ranked_rows

from ctmask.core.presets import SMALL
from ctmask.core.spec import GraphSpec
from ctmask.exporter.parity import compare_outputs, resolve_ties


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tie_affected_slices_are_judged_against_s_on_their_own_rois():
    spec = GraphSpec.for_preset(SMALL)
    e_rois = ranked_rows(n_images=3)
    e_rois[1, 5, 0] = e_rois[1, 4, 0] - 1e-7
    a_rois = e_rois.copy()
    a_rois[1, [4, 5], 1:] = e_rois[1, [5, 4], 1:]  # near-tie swap in slice 1

    def s(rois):  # a stand-in S that is sensitive to row order
        logits = np.stack([rois[:, 4, 1], rois[:, 5, 1], np.zeros(len(rois))], -1).astype(np.float32)
        return {"logits": logits, "probs": softmax(logits)}

    expected = {"rois": e_rois, **s(e_rois)}
    actual = {"rois": a_rois, **s(a_rois)}
    assert not compare_outputs(actual, expected, spec)["passed"]  # naive: logits of slice 1 differ
    resolved, affected = resolve_ties(actual, expected, spec, s)
    assert affected == [1]
    report = compare_outputs(actual, resolved, spec)
    assert report["passed"], report["failures"]
    np.testing.assert_array_equal(resolved["logits"][[0, 2]], expected["logits"][[0, 2]])
    # A defect in S itself is still caught on a tie-affected slice.
    broken = dict(actual, logits=actual["logits"] + np.array([0, 0, 0.01], np.float32))
    assert "logits" in compare_outputs(broken, resolved, spec)["failures"]
