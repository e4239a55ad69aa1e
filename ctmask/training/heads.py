"""Classifier heads: the ranked RoIs [B, N, 5] -> slice logits [B, 3].

Two heads read the same input, so the exported graph, its outputs and metadata are the same
whichever is inside (the graph's ``ctmask.head`` names it):

- ``paper``: S of COVID-CT-Mask-Net (:class:`RoIClassifier`), an MLP on the flattened ranked
  list. It reads rows *by position*: when two near-tied candidates swap rows, a candidate
  crosses the N cut or NMS keeps the other of two overlapping near-equal boxes, its input
  moves by whole rows (deltas differ by units) and its call can jump on an input change far
  below anything visible (docs/model.md, "Stable head").
- ``pooled``: :class:`PooledRoIHead`, whose logits are a continuous function of the
  candidates: a per-row network, pooled with weights that fall to zero at the N-th row's
  score, plus score statistics that do not depend on the row order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ctmask.core.presets import check_head

HEADS: dict[str, str] = {
    "paper": "S of the paper: Linear(5N -> F) + ReLU, Linear(F -> F) + ReLU, Linear(F -> 3) on the flattened rows",
    "pooled": "permutation-invariant: per-row MLP (5 -> R -> R), rows pooled with weight max(score - cut, 0), "
              "plus order-free score statistics, then Linear(2R + 9 -> F) + ReLU, Linear(F -> 3)",
}
"""What each of :data:`ctmask.core.presets.HEAD_NAMES` is (``train-cls --head``, the preset's
``head`` field)."""

ROW_WIDTH = 64
"""R: width of the pooled head's per-row embedding."""
POOL_TAU = 0.05
"""Added to the pooled weights' sum before the weighted mean divides by it, so the mean stays
continuous (and bounded) when every weight is near zero."""
DELTA_SCALE = 4.0
"""Encoded deltas enter the per-row network as ``tanh(delta / DELTA_SCALE)``: the box coder's
weights (10, 10, 5, 5) put typical deltas within a few units, and a far outlier saturates
instead of dominating the pool."""
PROFILE_RANKS = (0, 1, 3, 7, 15)
"""Ranks (0-based) of the sorted score profile the pooled head reads, where N allows."""


class RoIClassifier(nn.Module):
    """S: Linear(5N -> F) + ReLU, Linear(F -> F) + ReLU, Linear(F -> 3), Kaiming-normal init.

    The [N, 5] ranked RoI batch is flattened row-major to ``[s1, dx1, dy1, dw1, dh1, s2, ...]``.
    """

    def __init__(self, n_rois: int, width: int, num_classes: int = 3):
        super().__init__()
        self.n_rois = n_rois
        self.net = nn.Sequential(
            nn.Linear(5 * n_rois, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, rois: Tensor) -> Tensor:
        """``rois`` float32 [B, N, 5] -> logits float32 [B, 3]."""
        return self.net(rois.flatten(1))


class PooledRoIHead(nn.Module):
    """A head whose logits move continuously with the detector's candidates.

    For rows ``(s_i, d_i)`` (score, encoded deltas) and ``c = min_i s_i`` (the N-th row's
    score: the ranker sorts them; 0 when the list is padded):

    - weight ``w_i = max(s_i - c, 0)``: a row's influence fades to zero as it reaches the
      cut, so a candidate entering or leaving at the N-th row changes nothing abruptly;
    - per-row embedding ``h_i = MLP([s_i, tanh(d_i / 4)])`` (5 -> R -> R, ReLU);
    - pooled: ``sum_i w_i h_i`` and ``sum_i w_i h_i / (sum_i w_i + tau)``: a sum over rows,
      so swapping two rows changes nothing;
    - statistics: ``log1p(sum w)``, ``sum w^2``, the mean score, the cut ``c`` and the
      sorted scores at ranks 0, 1, 3, 7, 15 (order statistics are continuous in the
      candidates' scores);
    - then Linear(2R + 9 -> F) + ReLU, Linear(F -> 3).

    What stays discontinuous is what the detector itself makes discontinuous: when NMS keeps
    the other of two overlapping near-equal boxes, their scores are near-equal but their
    encoded deltas (relative to different proposals) may differ; that row's weight times
    the change of its embedding is what moves.

    Args:
        n_rois: N (the statistics' ranks beyond N are left out).
        width: F, the hidden width after pooling.
        num_classes: slice classes (3).
        row_width: R.
    """

    def __init__(self, n_rois: int, width: int, num_classes: int = 3, row_width: int = ROW_WIDTH):
        super().__init__()
        self.n_rois = n_rois
        self.ranks = tuple(r for r in PROFILE_RANKS if r < n_rois)
        self.row = nn.Sequential(nn.Linear(5, row_width), nn.ReLU(), nn.Linear(row_width, row_width), nn.ReLU())
        n_in = 2 * row_width + 4 + len(self.ranks)
        self.out = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, num_classes))
        for m in [*self.row, *self.out]:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, rois: Tensor) -> Tensor:
        """``rois`` float32 [B, N, 5] (any row order; zero rows as padding) -> logits [B, 3]."""
        s = rois[..., 0]
        # Sorted by the ranker already; sorting again (a TopK over N) makes the head
        # permutation-invariant whatever order its input comes in.
        profile = s.topk(self.ranks[-1] + 1, dim=1).values
        cut = s.amin(1, keepdim=True)
        w = F.relu(s - cut)
        x = torch.cat([s.unsqueeze(-1), torch.tanh(rois[..., 1:] / DELTA_SCALE)], -1)
        h = self.row(x)
        total = w.sum(1, keepdim=True)
        pooled = (w.unsqueeze(-1) * h).sum(1)
        stats = [torch.log1p(total), (w * w).sum(1, keepdim=True), s.mean(1, keepdim=True), cut]
        stats += [profile[:, r : r + 1] for r in self.ranks]
        return self.out(torch.cat([pooled, pooled / (total + POOL_TAU), *stats], -1))


def build_head(name: str, n_rois: int, width: int, num_classes: int = 3) -> nn.Module:
    """The classifier head called ``name`` (a key of :data:`HEADS`)."""
    if check_head(name) == "paper":
        return RoIClassifier(n_rois, width, num_classes)
    return PooledRoIHead(n_rois, width, num_classes)
