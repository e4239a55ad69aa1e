"""Classifier training: S on the ranked RoIs of the (inference-mode) detector.

Variants (paper Table 1): ``heads`` trains S only, ``heads+bn`` also the BatchNorm affine
parameters of the detector, ``full`` everything. Loss: per-class sigmoid binary
cross-entropy on one-hot labels. For ``heads`` the detector is a constant function, so
its ranked RoIs are computed once per image and S trains on them directly.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ctmask.core.errors import ConfigError, CtmaskWarning
from ctmask.core.noise import add_gray_noise
from ctmask.core.presets import Preset, check_head, check_suppression
from ctmask.core.progress import console, progress
from ctmask.data.covidx import SplitEntry
from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
from ctmask.training.datasets import DEFAULT_CACHE_BYTES, ClassificationDataset, collate_classification
from ctmask.training.graph_rois import check_graphs, check_rows, graph_rois
from ctmask.training.model import VARIANTS, CovidCTMaskNet, load_state, load_weights, set_variant
from ctmask.training.options import (
    require_adam,
    require_at_least,
    require_more_epochs,
    set_adam_hyperparameters,
)
from ctmask.training.perturb import check_scales, perturbed
from ctmask.training.reproducibility import deterministic, environment, seed_everything, start_epoch
from ctmask.training.roi_cache import cache_key, cached_rois


@dataclass(frozen=True)
class ClsTrainOptions:
    """Options of :func:`train_classifier` (paper defaults; stored in the checkpoint).

    ``seed`` drives S's initialisation and every epoch's data order (see
    :mod:`ctmask.training.reproducibility`). ``perturb``: relative noise scales of the
    detector (:mod:`ctmask.training.perturb`); S also trains on the RoIs of the detector
    perturbed at each scale (``heads``: one extra copy of the training RoIs per scale; other
    variants: batches cycle through exact and perturbed forward passes). ``consistency``
    (``heads`` with ``perturb``): weight of the squared logit change between each slice's
    perturbed and exact RoIs in the loss. ``head``: the classifier head
    (:mod:`ctmask.training.heads`); None takes the preset's, or the init checkpoint's when it
    is a classifier. ``suppression``: the ranked RoIs' suppression rule
    (``ctmask.core.presets.SUPPRESSIONS``); None takes the preset's, or the init classifier's.
    ``rois_from`` (``heads``): exported graphs of the same detector (an INT8 / FP16 build) whose
    ranked RoIs are added as one more copy each (:mod:`ctmask.training.graph_rois`).

    Raises:
        ConfigError: unknown variant, epochs or batch size < 1, lr <= 0, weight decay < 0.
    """

    variant: str = "heads+bn"
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 1e-3
    crop: bool = False
    seed: int = 0
    perturb: tuple[float, ...] = ()
    consistency: float = 0.0
    head: str | None = None
    suppression: str | None = None
    rois_from: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.head is not None:
            check_head(self.head)
        if self.suppression is not None:
            check_suppression(self.suppression)
        object.__setattr__(self, "rois_from", tuple(str(g) for g in self.rois_from))
        resolved = [str(Path(g).resolve()) for g in self.rois_from]
        repeated = sorted({g for g, r in zip(self.rois_from, resolved) if resolved.count(r) > 1})
        if repeated:
            raise ConfigError(f"--rois-from names {', '.join(repeated)} more than once (its copy would count twice)")
        if self.rois_from and self.variant != "heads":
            raise ConfigError(f"--rois-from applies to the heads variant (cached RoI copies), not {self.variant}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown classifier variant {self.variant!r}; expected one of {list(VARIANTS)}")
        require_at_least("epochs", self.epochs)
        require_at_least("batch size", self.batch_size)
        require_adam(self.lr, self.weight_decay)
        object.__setattr__(self, "perturb", check_scales(tuple(self.perturb)))
        if not 0.0 <= float(self.consistency) < float("inf"):
            raise ConfigError(f"consistency weight must be a finite number >= 0, got {self.consistency!r}")
        if self.consistency and not (self.perturb or self.rois_from):
            raise ConfigError("a consistency weight needs RoI copies: pass --perturb or --rois-from too")
        if self.consistency and self.variant != "heads":
            raise ConfigError(f"--consistency applies to the heads variant (cached RoI copies), not {self.variant}")


def bce_one_hot(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoid BCE of logits [B, C] against one-hot(labels [B])."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype))


@torch.no_grad()
def ranked_rois_of(model: CovidCTMaskNet, data: ClassificationDataset, batch_size: int, show: bool,
                   scales: tuple[float, ...] = (), seed: int = 0, gray_levels: float = 0.0) -> TensorDataset:
    """Ranked RoIs [M, N, 5] and labels [M] of every slice in ``data`` (eval mode).

    With ``scales``, also the RoIs of the detector perturbed at each scale (seeded by
    ``seed``): the RoIs are then [M, 1 + len(scales), N, 5], the exact copy first. With
    ``gray_levels``, the slices get input noise of that amplitude first
    (:func:`ctmask.core.noise.add_gray_noise`, seeded per slice index: the noise floor's).
    Slices are decoded batch by batch and not kept.
    """
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_classification)
    rois, labels, start = [], [], 0
    gen = torch.Generator().manual_seed(seed + 7919)
    label = "ranked RoIs" if not gray_levels else f"ranked RoIs, +-{gray_levels:g} gray level of noise"
    with progress(len(loader) * (1 + len(scales)), label, show) as advance:
        for images, y in loader:
            if gray_levels:
                images = torch.from_numpy(add_gray_noise(images.numpy(), gray_levels, 0, start))
            start += len(images)
            copies = []
            for scale in (0.0, *scales):
                with perturbed(model.ranker, scale, gen):
                    copies.append(model.ranker(images))
                advance()
            rois.append(torch.stack(copies, 1) if scales else copies[0])
            labels.append(y)
    if not rois:
        n = model.preset.n_rois
        return TensorDataset(torch.zeros(0, *((1 + len(scales),) if scales else ()), n, 5),
                             torch.zeros(0, dtype=torch.int64))
    return TensorDataset(torch.cat(rois), torch.cat(labels))


def copies_loss(model: CovidCTMaskNet, x: torch.Tensor, y: torch.Tensor, consistency: float) -> torch.Tensor:
    """Loss on RoI copies [B, C, N, 5] (exact copy first): the mean BCE over the copies, plus
    ``consistency`` times the mean squared logit change of each perturbed copy from the exact one."""
    b, c = x.shape[:2]
    logits = model.classifier(x.flatten(0, 1)).view(b, c, -1)
    loss = bce_one_hot(logits.flatten(0, 1), y.repeat_interleave(c))
    if consistency > 0 and c > 1:
        loss = loss + consistency * (logits[:, 1:] - logits[:, :1]).pow(2).mean()
    return loss


def with_graph_copies(data: TensorDataset, copies: torch.Tensor) -> TensorDataset:
    """``data``'s RoIs ([M, N, 5], or [M, C, N, 5] with perturbed copies) with the graphs'
    copies [M, G, N, 5] appended: [M, C + G, N, 5], the exact copy still first."""
    rois, labels = data.tensors
    rois = rois if rois.dim() == 4 else rois.unsqueeze(1)
    return TensorDataset(torch.cat([rois, copies.to(rois.dtype)], 1), labels)


def logits_of(model: CovidCTMaskNet, x: torch.Tensor, cached: bool) -> torch.Tensor:
    """Logits [B, 3] from images [B, 1, S, S], or from cached ranked RoIs [B, N, 5]."""
    return model.classifier(x) if cached else model(x)[1]


def accuracy(model: CovidCTMaskNet, loader: DataLoader, cached: bool) -> float:
    """Top-1 accuracy of the model on ``loader`` (images or cached RoIs)."""
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((logits_of(model, x, cached).argmax(-1) == y).sum())
            n += len(y)
    return correct / max(n, 1)


@dataclass
class StartPoint:
    """Where classifier training starts: weights, and for a resumed run its state.

    ``resumed`` is the checkpoint a run resumes (same variant), else None.
    """

    model: CovidCTMaskNet
    optimizer: dict | None = None
    epoch: int = 0
    history: list = field(default_factory=list)
    resumed: Path | None = None


def preset_for_init(name: str, init: str | Path) -> Preset:
    """The preset called ``name``: a named one, or else the init checkpoint's own when it carries that
    name (``import-reference`` names an authors' model no named preset equals, e.g.
    ``resnet18-t1-ggo-n128-s512``, and prints that name for ``train-cls --preset``).

    Raises:
        ConfigError: neither a named preset nor the init checkpoint's.
    """
    from ctmask.core.presets import PRESETS, get_preset

    if name in PRESETS:
        return get_preset(name)
    own = load_checkpoint(init).preset
    if own.name != name:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)} or the init checkpoint's "
                          f"{own.name!r}")
    return own


def init_model(preset: Preset, init: str | Path, variant: str, head: str | None = None,
               suppression: str | None = None) -> StartPoint:
    """Build the model from ``init``.

    - a segmentation checkpoint: its detector, a freshly initialised head (``head``, else
      the preset's);
    - a classifier checkpoint of the same variant: resume (weights, optimiser, epochs);
    - a classifier checkpoint of another variant: fine-tune from its weights, from epoch 0
      (e.g. ``heads+bn`` starting from a quickly trained ``heads`` S).

    ``head`` / ``suppression``: the head and the RoI suppression rule of a fresh classifier
    (None: the preset's); a classifier checkpoint keeps its own, and naming another is refused.
    """
    ck = load_checkpoint(init, preset=preset.name)
    if ck.kind == "segmentation":
        chosen = dataclasses.replace(preset, head=head or preset.head,
                                     roi_suppression=suppression or preset.roi_suppression)
        model = CovidCTMaskNet(chosen)
        load_state(model.detector, ck.model, ck.path)
        return StartPoint(model)
    for flag, asked, held, what in (("--head", head, ck.preset.head, "head"),
                                    ("--suppression", suppression, ck.preset.roi_suppression, "suppression")):
        if asked is not None and asked != held:
            raise ConfigError(f"{flag} {asked}: the classifier checkpoint holds the {held!r} {what}, which training "
                              "continues",
                              ck.path, hint=f"start from its segmentation checkpoint for a fresh classifier with "
                                            f"{asked!r}, or drop {flag}")
    model = CovidCTMaskNet(dataclasses.replace(preset, head=ck.preset.head, roi_suppression=ck.preset.roi_suppression,
                                               roi_suppression_sigma=ck.preset.roi_suppression_sigma))
    load_weights(model, ck.model, ck.path)
    if ck.config.get("train", {}).get("variant") != variant:
        return StartPoint(model)
    return StartPoint(model, ck.optimizer, ck.epoch, list(ck.config.get("history", [])), ck.path)


def train_classifier(
    preset: Preset,
    init: str | Path,
    train: list[SplitEntry],
    val: list[SplitEntry] | None,
    out: str | Path,
    opts: ClsTrainOptions,
    show_progress: bool = True,
    roi_cache: str | Path | None = None,
) -> dict:
    """Train S (and, per variant, detector parameters); checkpoint after every epoch.

    Args:
        preset: model preset (must match ``init``).
        init: segmentation checkpoint, or classifier checkpoint (same variant: resume;
            another variant: fine-tune from its weights), see :func:`init_model`.
        train, val: COVIDx-CT split entries; ``val`` may be None.
        out: classifier checkpoint path.
        opts: variant, epochs (the total, resumed epochs included), batch size, Adam
            settings, crop, seed. A resumed run uses ``opts.lr`` / ``opts.weight_decay``,
            not the saved ones.
        show_progress: progress bars and per-epoch lines.
        roi_cache: folder of cached ranked RoIs (:mod:`ctmask.training.roi_cache`) for the
            ``heads`` variant, whose detector is frozen; None computes them every run.

    Returns:
        Summary dict with per-epoch loss / validation accuracy and seconds.

    Raises:
        ConfigError: invalid options, or a resumed checkpoint already has ``opts.epochs``
            epochs.
        CheckpointError: ``init`` is unreadable or of another preset.
    """
    with deterministic():
        return _train(preset, init, train, val, out, opts, show_progress, roi_cache)


def _rois(model: CovidCTMaskNet, data: ClassificationDataset, entries: list[SplitEntry], opts: ClsTrainOptions,
          roi_cache: str | Path | None, show: bool, scales: tuple[float, ...]) -> TensorDataset:
    """:func:`ranked_rois_of` ``data``, through the RoI cache folder when one is given."""
    def key() -> str:
        return cache_key(model.detector, model.preset, entries, opts.crop, scales, opts.seed, opts.batch_size)

    return cached_rois(roi_cache, key, lambda: ranked_rois_of(model, data, opts.batch_size, show, scales, opts.seed),
                       len(entries), model.preset.n_rois)


def _datasets(model: CovidCTMaskNet, train: list[SplitEntry], val: list[SplitEntry] | None, opts: ClsTrainOptions,
              roi_cache: str | Path | None, show: bool) -> tuple[Dataset, Dataset | None]:
    """The training and validation sets: slices, or for ``heads`` their ranked RoIs (cached,
    with the perturbed and ``--rois-from`` graph copies)."""
    cached = opts.variant == "heads"
    if roi_cache is not None and not cached:
        import warnings

        warnings.warn(CtmaskWarning(f"--roi-cache is not used by the {opts.variant} variant: its detector trains, "
                                    "so its RoIs change every step"), stacklevel=3)
    if opts.rois_from:
        check_graphs(opts.rois_from, model, opts.crop)  # before the detector's pass, not after
    # ``heads`` reads every image once (its ranked RoIs are cached), so decoded images are
    # not kept; the other variants re-read them every epoch, within the cache's budget.
    cache_bytes = 0 if cached else DEFAULT_CACHE_BYTES
    size = model.preset.image_size
    train_data = ClassificationDataset(train, size, opts.crop, cache_bytes)
    val_data = ClassificationDataset(val, size, opts.crop, cache_bytes) if val else None
    if not cached:
        return train_data, val_data
    rois = _rois(model, train_data, train, opts, roi_cache, show, opts.perturb)
    if opts.rois_from:
        copies = graph_rois(opts.rois_from, model, train_data, opts.batch_size, show)
        check_rows(copies, rois.tensors[0] if rois.tensors[0].dim() == 3 else rois.tensors[0][:, 0], opts.rois_from)
        rois = with_graph_copies(rois, copies)
    return rois, (_rois(model, val_data, val, opts, roi_cache, show, ()) if val_data else None)


def _train(preset, init, train, val, out, opts: ClsTrainOptions, show_progress: bool,
           roi_cache: str | Path | None = None) -> dict:
    """:func:`train_classifier`'s body (run with deterministic algorithms)."""
    seed_everything(opts.seed)  # S's initialisation
    start = init_model(preset, init, opts.variant, opts.head, opts.suppression)
    if start.resumed is not None:
        require_more_epochs(start.resumed, start.epoch, opts.epochs)
    model, history = start.model, start.history
    preset = model.preset  # with the head the model holds
    params = set_variant(model, opts.variant)
    optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    if start.optimizer is not None:
        optimizer.load_state_dict(start.optimizer)
        set_adam_hyperparameters(optimizer, opts.lr, opts.weight_decay)
    t0 = time.perf_counter()
    cached = opts.variant == "heads"
    train_data, val_data = _datasets(model, train, val, opts, roi_cache, show_progress)
    collate = None if cached else collate_classification
    gen = torch.Generator()
    loader = DataLoader(train_data, batch_size=opts.batch_size, shuffle=True, collate_fn=collate, generator=gen)
    val_loader = DataLoader(val_data, batch_size=opts.batch_size, collate_fn=collate) if val_data else None
    noise = torch.Generator()
    # Uncached variants perturb the detector batch by batch: exact, then each scale in turn.
    cycle = (0.0, *opts.perturb) if not cached else (0.0,)
    for epoch in range(start.epoch, opts.epochs):
        start_epoch(opts.seed, epoch, gen)
        noise.manual_seed(opts.seed * 1000 + epoch)
        model.train()
        total = 0.0
        with progress(len(loader), f"train-cls {opts.variant} epoch {epoch + 1}/{opts.epochs}", show_progress) as adv:
            for step, (x, y) in enumerate(loader):
                if cached and x.dim() == 4:
                    loss = copies_loss(model, x, y, opts.consistency)
                else:
                    with perturbed(model.ranker, cycle[step % len(cycle)], noise):
                        loss = bce_one_hot(logits_of(model, x, cached), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                total += value
                adv(status=f"loss {value:.4f}")
        record = {"epoch": epoch + 1, "loss": total / len(loader)}
        if val_loader is not None:
            record["val_accuracy"] = accuracy(model, val_loader, cached)
        history.append(record)
        if show_progress:
            console.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
        save_checkpoint(
            out,
            kind="classifier",
            preset=preset,
            model=model.state_dict_for_checkpoint(),
            optimizer=optimizer.state_dict(),
            epoch=epoch + 1,
            config={
                "train": asdict(opts),
                "init": str(init),
                "resumed_from": None if start.resumed is None else {"checkpoint": str(init), "epoch": start.epoch},
                "n_train": len(train),
                "history": history,
                "environment": environment(),
            },
        )
    return {"history": history, "seconds": time.perf_counter() - t0, "n_train": len(train)}
