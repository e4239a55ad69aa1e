"""Segmentation training: the five Mask R-CNN losses on CNCB-layout slices."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ctmask.core.presets import Preset
from ctmask.core.progress import console, progress
from ctmask.data.cncb import SegSample
from ctmask.training.checkpoint import load_checkpoint, save_checkpoint
from ctmask.training.datasets import SegmentationDataset, collate_detection
from ctmask.training.detector import build_detector, detector_losses
from ctmask.training.model import load_state
from ctmask.training.options import (
    require_adam,
    require_at_least,
    require_more_epochs,
    set_adam_hyperparameters,
)
from ctmask.training.reproducibility import deterministic, environment, seed_everything, start_epoch


@dataclass(frozen=True)
class SegTrainOptions:
    """Options of :func:`train_segmentation` (stored in the checkpoint config).

    Raises:
        ConfigError: epochs, batch size or max images < 1, lr <= 0, weight decay < 0.
    """

    epochs: int = 100
    batch_size: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-3
    hflip: bool = True
    seed: int = 0
    max_images: int | None = None

    def __post_init__(self) -> None:
        require_at_least("epochs", self.epochs)
        require_at_least("batch size", self.batch_size)
        require_at_least("max images", self.max_images)
        require_adam(self.lr, self.weight_decay)


def train_segmentation(
    preset: Preset,
    samples: list[SegSample],
    out: str | Path,
    opts: SegTrainOptions,
    resume: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Train the detector; write a resumable checkpoint to ``out`` after every epoch.

    Args:
        preset: model preset.
        samples: training slices (CNCB layout).
        out: checkpoint path (``kind="segmentation"``).
        opts: epochs, batch size, Adam settings, augmentation, seed.
        resume: checkpoint to continue from (its preset must match); its weights, optimiser
            state, epoch count and history are restored, and ``opts.lr`` /
            ``opts.weight_decay`` replace the saved learning rate and weight decay.
        show_progress: progress bars and per-epoch lines.

    Returns:
        Summary dict: epochs run, final mean losses, seconds.

    Raises:
        ConfigError: invalid options, or ``resume`` already has ``opts.epochs`` epochs.
        CheckpointError: ``resume`` is unreadable or of another kind / preset.
    """
    with deterministic():
        return _train(preset, samples, out, opts, resume, show_progress)


def _train(
    preset: Preset, samples: list[SegSample], out: str | Path, opts: SegTrainOptions, resume, show_progress: bool
) -> dict:
    """:func:`train_segmentation`'s body (run with deterministic algorithms)."""
    seed_everything(opts.seed)
    if opts.max_images is not None:
        samples = samples[: opts.max_images]
    detector = build_detector(preset)
    optimizer = torch.optim.Adam(detector.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    start_epoch_index, history = 0, []
    if resume is not None:
        ck = load_checkpoint(resume, kind="segmentation", preset=preset.name)
        require_more_epochs(ck.path, ck.epoch, opts.epochs)
        load_state(detector, ck.model, ck.path)
        if ck.optimizer is not None:
            optimizer.load_state_dict(ck.optimizer)
            set_adam_hyperparameters(optimizer, opts.lr, opts.weight_decay)
        start_epoch_index, history = ck.epoch, list(ck.config.get("history", []))
    data = SegmentationDataset(samples, preset.image_size, hflip=opts.hflip, mask_type=preset.mask_type)
    gen = torch.Generator()
    loader = DataLoader(data, batch_size=opts.batch_size, shuffle=True, collate_fn=collate_detection, generator=gen)
    detector.train()
    t0 = time.perf_counter()
    for epoch in range(start_epoch_index, opts.epochs):
        start_epoch(opts.seed, epoch, gen)
        sums: dict[str, float] = {}
        with progress(len(loader), f"train-seg epoch {epoch + 1}/{opts.epochs}", show_progress) as advance:
            for images, targets in loader:
                losses = detector_losses(detector, images, targets)
                total = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                advance(status=f"loss {float(total.detach()):.3f}")
        means = {k: v / len(loader) for k, v in sums.items()}
        history.append({"epoch": epoch + 1, **means})
        if show_progress:
            console.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        save_checkpoint(
            out,
            kind="segmentation",
            preset=preset,
            model=detector.state_dict(),
            optimizer=optimizer.state_dict(),
            epoch=epoch + 1,
            config={
                "train": asdict(opts),
                "resumed_from": None if resume is None else {"checkpoint": str(resume), "epoch": start_epoch_index},
                "n_train": len(samples),
                "history": history,
                "environment": environment(),
            },
        )
    return {"epochs": opts.epochs, "history": history, "seconds": time.perf_counter() - t0, "n_train": len(samples)}
