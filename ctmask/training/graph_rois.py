"""RoI copies from exported graphs: S trained on the ranked RoIs its deployed graphs produce.

An INT8 (or FP16) graph of the detector hands S different ranked RoIs than PyTorch's FP32
detector does on most slices: its scores move by about 0.1 and some candidates change
(docs/precision.md). Those differences depend on the detector, its ranges and the target,
never on the head, so the RoIs of an already exported reduced-precision graph of the same
detector are what S will read once deployed: exactly so on onnxruntime's CPU kernels, which
compute them here; OpenVINO and TensorRT compute INT8 slightly differently (measured in
docs/precision.md). ``train-cls --rois-from GRAPH`` adds
them as copies of the training RoIs (beside the exact ones and any ``--perturb`` copies), and
``--consistency`` penalises the logit change between each slice's exact and graph copy: S
learns to call a slice the same from both.

A graph is used only if its metadata says it was exported from this very detector with these
ranking settings (``ctmask.detector_sha256``), at this input size, N, suppression and crop, and
if its RoIs are not grossly far from the detector's (:func:`check_rows`, a coarse check: the
metadata of an edited graph can lie, and a closely related detector's graph passes it); anything
else is refused naming the graph and the mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ctmask.core.errors import ConfigError, ModelError
from ctmask.core.progress import progress
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.runtime.runner import OnnxRuntimeRunner
from ctmask.training.datasets import ClassificationDataset, collate_classification
from ctmask.training.model import CovidCTMaskNet
from ctmask.training.roi_cache import detector_digest


def check_graph(spec: GraphSpec, path: str | Path, model: CovidCTMaskNet, crop: bool) -> None:
    """Raise :class:`ModelError` naming ``path`` unless its RoIs are those of ``model``'s detector.

    Compared: the detector digest (weights and ranking settings), input size, N, the
    suppression rule and the crop flag.
    """
    p = model.preset
    want = detector_digest(model.state_dict_for_checkpoint(), p)
    if not spec.detector_sha256:
        raise ModelError("the graph does not record which detector made its RoIs (no ctmask.detector_sha256: "
                         "written by an older ctmask)", path,
                         hint="re-export it from a classifier of this detector (`ctmask export`), then make its "
                              "FP16 / INT8 graph again")
    problems = []
    if spec.detector_sha256 != want:
        problems.append(f"its detector (ctmask.detector_sha256 {spec.detector_sha256[:12]!r}...) is not the one "
                        f"being trained on ({want[:12]}...: other weights or ranking settings)")
    if (spec.image_size, spec.n_rois) != (p.image_size, p.n_rois):
        problems.append(f"it takes {spec.image_size} px and ranks N={spec.n_rois}; this model: {p.image_size} px, "
                        f"N={p.n_rois}")
    if spec.suppression != p.roi_suppression:
        problems.append(f"its RoIs use {spec.suppression!r} suppression, this model {p.roi_suppression!r}")
    if spec.crop != crop:
        problems.append(f"it was made for {'cropped' if spec.crop else 'uncropped'} slices, training reads them "
                        f"{'cropped' if crop else 'uncropped'}")
    if problems:
        raise ModelError("--rois-from: the graph's RoIs are not this detector's: " + "; ".join(problems), path,
                         hint="pass FP16 / INT8 graphs exported from a classifier of the same segmentation "
                              "checkpoint, preset and --suppression")


def check_graphs(paths: tuple[str, ...], model: CovidCTMaskNet, crop: bool) -> None:
    """:func:`check_graph` on each of ``paths`` (loading each in onnxruntime), before any work.

    Raises:
        ModelError: a graph that does not load or is not of ``model``'s detector, naming it.
        ConfigError: no graphs.
    """
    if not paths:
        raise ConfigError("--rois-from: no graphs given")
    for path in paths:
        if Path(path).is_dir():
            raise ModelError("--rois-from takes an exported graph (.onnx), not a folder", path)
        with OnnxRuntimeRunner(path) as runner:
            check_graph(runner.spec, path, model, crop)


PROFILE_LIMIT = 0.25
"""Largest median, over the slices, of the largest difference between a graph's and the
detector's sorted row scores that :func:`check_rows` accepts. An INT8 graph of the detector
measured 0.09 (0.2 at the 90th percentile)."""


def check_rows(copies: torch.Tensor, exact: torch.Tensor, paths: tuple[str, ...]) -> None:
    """Raise :class:`ModelError` naming the graph whose RoIs (``copies[:, g]``, [M, N, 5]) are grossly
    far from the detector's exact RoIs [M, N, 5], or not of their shape, or not finite.

    A coarse sanity check on top of the metadata's detector digest (which is what identifies the
    detector): it catches a graph of an unrelated detector whose metadata was edited, not a closely
    related one (an INT8 graph of the same detector before QAT measured within 0.08, as the QAT
    detector's own INT8 graphs do).
    """
    if len(exact) == 0:
        return
    want = exact[..., 0].sort(-1, descending=True).values
    for g, path in enumerate(paths):
        rows = copies[:, g]
        if rows.shape != exact.shape:
            raise ModelError(f"--rois-from: the graph's rois are {list(rows.shape[1:])} per slice, the detector's "
                             f"{list(exact.shape[1:])}, whatever its metadata says", path)
        if not bool(torch.isfinite(rows).all()):
            raise ModelError("--rois-from: the graph's rois hold NaN or infinite values", path)
        got = rows[..., 0].sort(-1, descending=True).values
        gap = float((got - want).abs().amax(-1).median())
        if gap > PROFILE_LIMIT:
            raise ModelError(f"--rois-from: the graph's RoIs are far from this detector's: their sorted scores differ "
                             f"by {gap:.3g} on the median slice (a reduced-precision graph of it: at most "
                             f"{PROFILE_LIMIT}), whatever its metadata says", path,
                             hint="use graphs exported from this detector; a graph of it this far off is badly "
                                  "calibrated (`ctmask calibrate --method`)")


@torch.no_grad()
def graph_rois(paths: tuple[str, ...], model: CovidCTMaskNet, data: ClassificationDataset, batch_size: int,
               show: bool) -> torch.Tensor:
    """Ranked RoIs [M, G, N, 5] of every slice of ``data`` from each of the G graphs ``paths``
    (onnxruntime, CPU), in ``data``'s order. The graphs' metadata is :func:`check_graphs`'s to
    judge, before the detector's pass; this only refuses rows of the wrong shape.

    Raises:
        ModelError: a graph that does not load, or whose ``rois`` are not [M, N, 5], naming it.
        ConfigError: no graphs.
    """
    if not paths:
        raise ConfigError("--rois-from: no graphs given")
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_classification)
    copies = []
    for path in paths:
        with OnnxRuntimeRunner(path) as runner:
            parts = []
            with progress(len(loader), f"ranked RoIs of {Path(path).name}", show) as advance:
                for images, _ in loader:
                    rois = runner.infer({INPUT: np.ascontiguousarray(images.numpy(), dtype=np.float32)})["rois"]
                    parts.append(torch.from_numpy(np.asarray(rois, dtype=np.float32)))
                    advance()
        n = model.preset.n_rois
        rois = torch.cat(parts) if parts else torch.zeros(0, n, 5)
        if tuple(rois.shape) != (len(data), n, 5):
            raise ModelError(f"--rois-from: the graph's rois are {list(rois.shape)}, expected [{len(data)}, {n}, 5] "
                             "for this detector, whatever its metadata says", path)
        copies.append(rois)
    return torch.stack(copies, 1)
