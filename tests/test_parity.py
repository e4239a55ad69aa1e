"""Parity judging: near-tied RoIs and knife-edge slices are handled, real errors still fail."""

from __future__ import annotations

import numpy as np
from tests_helpers import ranked_rows

from ctmask.core.presets import SMALL
from ctmask.core.spec import GraphSpec
from ctmask.exporter.parity import compare_outputs, judge_out_unstable, resolve_ties, unstable_slices
from ctmask.runtime.runner import Runner


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


class KnifeEdgeRunner(Runner):
    """A reference whose top RoI score jumps when any pixel crosses 0.5 (like a top-k cut)."""

    name = "knife-edge"

    def activate_impl(self):
        return GraphSpec.for_preset(SMALL)

    def infer_impl(self, feed):
        x = feed["images"]
        b = len(x)
        rois = np.zeros((b, SMALL.n_rois, 5), np.float32)
        rois[:, 0, 0] = np.where(x.max(axis=(1, 2, 3)) > 0.5, 0.9, 0.8)
        rois[:, 1, 0] = 0.1
        logits = np.stack([rois[:, 0, 0], np.zeros(b), np.zeros(b)], -1).astype(np.float32)
        return {"rois": rois, "logits": logits, "probs": softmax(logits)}

    def deactivate_impl(self):
        pass


def test_knife_edge_slices_are_judged_out_but_real_errors_are_not():
    s = SMALL.image_size
    images = np.stack([np.full((1, s, s), v, np.float32) for v in [0.5, *np.linspace(0.1, 0.9, 39)]])
    images[1:, 0, 0, 0] += 0.01  # keep the others clear of the edge
    ref = KnifeEdgeRunner().activate()
    spec = ref.spec
    expected = ref.infer({"images": images})
    actual = {k: v.copy() for k, v in expected.items()}
    actual["rois"][0, 0, 0] = 0.9  # the graph landed on the other side of the edge on slice 0
    report = compare_outputs(actual, expected, spec)
    assert [f["index"] for f in report["failing_slices"]] == [0]
    unstable = unstable_slices(ref, images, report["failing_slices"], expected, spec, jitter=1e-6)
    assert list(unstable) == [0] and unstable[0]["rois.score"] > 0.05
    judged = judge_out_unstable(report, unstable, actual, expected, spec, 1.0, 0.05)
    assert judged["passed"] and [u["index"] for u in judged["unstable_slices"]] == [0]
    # The same error on a slice far from the edge is a defect.
    actual["rois"][5, 0, 0] += 0.1
    report = compare_outputs(actual, expected, spec)
    unstable = unstable_slices(ref, images, report["failing_slices"], expected, spec, jitter=1e-6)
    judged = judge_out_unstable(report, unstable, actual, expected, spec, 1.0, 0.05)
    assert not judged["passed"] and [f["index"] for f in judged["failing_slices"]] == [5]
