"""Cached detector outputs for classifier-head training.

While the detector is frozen (the ``heads`` variant), a head trains on the detector's ranked
RoIs, which depend only on the detector's weights, its post-processing settings and the
slices, never on the head. :func:`cached_rois` keeps them in a folder, keyed by all of that,
so trying another head, seed or epoch count costs the head's training alone, not the
detector's pass over every slice again.

A cache file holds tensors only (``torch.load(weights_only=True)``) and is written atomically;
a file that does not load, or whose recorded key differs from its name, is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

from ctmask import __version__
from ctmask.core.errors import CtmaskWarning
from ctmask.core.fileio import atomic_path
from ctmask.core.presets import Preset
from ctmask.data.covidx import SplitEntry
from ctmask.training.checkpoint import weights_digest

FORMAT = "ctmask-roi-cache/1"

# Preset fields the ranked RoIs do not depend on: the head and its width, training-only
# sampling sizes and the segmentation-inference rule.
_NOT_IN_KEY = {"name", "head", "classifier_width", "num_slice_classes", "mask_head_channels", "mask_head_layers",
               "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
               "rpn_batch_size_per_image", "box_batch_size_per_image", "seg_score_thresh", "seg_nms_thresh",
               "seg_detections"}


def ranking_fields(preset: Preset) -> dict:
    """The preset's fields the ranked RoIs depend on (every field but :data:`_NOT_IN_KEY`'s)."""
    return {k: v for k, v in dataclasses.asdict(preset).items() if k not in _NOT_IN_KEY}


def detector_digest(checkpoint_weights: Mapping[str, torch.Tensor], preset: Preset) -> str:
    """Hex sha256 naming the detector that makes the ranked RoIs: its weights (the ``detector.*``
    entries of a checkpoint's state dict) and the preset fields the ranking reads.

    An exported graph records it (``ctmask.detector_sha256``), so ``train-cls --rois-from`` can
    tell whether a graph's RoIs are those of the detector being trained on.
    """
    detector = {k: v for k, v in checkpoint_weights.items() if k.startswith("detector.")}
    h = hashlib.sha256(weights_digest(detector).encode())
    h.update(json.dumps(ranking_fields(preset), sort_keys=True).encode())
    return h.hexdigest()


def cache_key(detector: torch.nn.Module, preset: Preset, entries: list[SplitEntry], crop: bool,
              scales: tuple[float, ...], seed: int, batch_size: int, extra: dict | None = None) -> str:
    """Hex sha256 naming the ranked RoIs of ``entries`` under this detector and these settings.

    Covers the detector's weights and buffers (its BN statistics), every preset field the
    ranking reads, each slice's bytes, label and crop box in order, the crop flag, the
    perturbation scales and (with scales) the seed, the batch size and torch's thread count
    (float sums depend on both), the torch, torchvision and ctmask versions (the ranking's
    code) and ``extra`` (JSON-able: e.g. the input noise of a noise-floor measurement).
    """
    h = hashlib.sha256()
    h.update(FORMAT.encode() + b"\0")
    h.update(weights_digest(detector.state_dict()).encode())
    ranking = ranking_fields(preset)
    # The seed draws the perturbed copies only: exact RoIs are the same for every seed.
    h.update(json.dumps({"preset": ranking, "crop": crop, "scales": list(scales), "seed": seed if scales else None,
                         "batch_size": batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "ctmask": __version__, "extra": extra or {}},
                        sort_keys=True).encode())
    for e in entries:
        h.update(f"\0{e.label}\0{list(e.box)}\0".encode())
        h.update(hashlib.sha256(Path(e.path).read_bytes()).digest())
    return h.hexdigest()


def _load(path: Path, key: str, n: int | None, n_rois: int | None) -> TensorDataset | None:
    try:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's message suggests weights_only=False: never for a cache file
            raise ValueError(f"not a tensor-only file ({exc.__class__.__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("key") != key:
            raise ValueError("key or format differs")
        rois, labels = blob["rois"], blob["labels"]
        if not (isinstance(rois, torch.Tensor) and isinstance(labels, torch.Tensor)):
            raise ValueError("tensors malformed")
        want = (n if n is not None else len(labels), n_rois if n_rois is not None else rois.shape[-2], 5)
        if rois.dtype != torch.float32 or rois.dim() not in (3, 4) or (rois.shape[0], *rois.shape[-2:]) != want \
                or labels.shape != (want[0],) or labels.dtype != torch.int64:
            raise ValueError(f"holds rois {list(rois.shape)} {rois.dtype}, labels {list(labels.shape)}; expected "
                             f"{want[0]} slices of [{want[1]}, 5] float32 rows")
        return TensorDataset(rois, labels)
    except Exception as exc:  # any unusable cache file is recomputed, never trusted
        import warnings

        warnings.warn(CtmaskWarning(f"RoI cache {path} is unusable ({exc}); recomputing"), stacklevel=2)
        return None


def cached_rois(folder: str | Path | None, key_of: Callable[[], str], compute: Callable[[], TensorDataset],
                n: int | None = None, n_rois: int | None = None) -> TensorDataset:
    """The dataset stored under ``key_of()`` in ``folder``, else ``compute()`` (then stored).

    ``folder`` None: always compute, store nothing (the key, which reads every slice and the
    detector's weights, is not computed then). ``n`` / ``n_rois``: the slices and rows a stored
    file must hold (a file of another shape is recomputed, with a warning).
    """
    if folder is None:
        return compute()
    key = key_of()
    path = Path(folder) / f"rois-{key[:32]}.pt"
    if path.is_file():
        data = _load(path, key, n, n_rois)
        if data is not None:
            return data
    data = compute()
    Path(folder).mkdir(parents=True, exist_ok=True)
    rois, labels = data.tensors
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "key": key, "rois": rois.contiguous(), "labels": labels.contiguous()}, tmp)
    return data
