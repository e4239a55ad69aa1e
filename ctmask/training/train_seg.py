"""Segmentation training: the five Mask R-CNN losses on CNCB-layout slices."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ctmask.core.errors import ConfigError
from ctmask.core.presets import Preset
from ctmask.core.progress import console, progress
from ctmask.data.cncb import SegSample
from ctmask.training.checkpoint import load_checkpoint, load_state, save_checkpoint
from ctmask.training.datasets import SegmentationDataset, collate_detection
from ctmask.training.detector import build_detector, detector_losses


@dataclass(frozen=True)
class SegTrainOptions:
    """Options of :func:`train_segmentation` (stored in the checkpoint config)."""

    epochs: int = 100
    batch_size: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-3
    hflip: bool = True
    seed: int = 0
    max_images: int | None = None


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
        resume: checkpoint to continue from (its preset must match).

    Returns:
        Summary dict: epochs run, final mean losses, seconds.
    """
    if opts.epochs < 1 or opts.batch_size < 1:
        raise ConfigError(f"epochs and batch size must be >= 1, got {opts.epochs} and {opts.batch_size}")
    torch.manual_seed(opts.seed)
    if opts.max_images:
        samples = samples[: opts.max_images]
    detector = build_detector(preset)
    optimizer = torch.optim.Adam(detector.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    start_epoch, history = 0, []
    if resume is not None:
        ck = load_checkpoint(resume, kind="segmentation", preset=preset.name)
        load_state(detector, ck.model, ck.path)
        if ck.optimizer is not None:
            optimizer.load_state_dict(ck.optimizer)
        start_epoch, history = ck.epoch, list(ck.config.get("history", []))
    data = SegmentationDataset(samples, preset.image_size, hflip=opts.hflip)
    gen = torch.Generator().manual_seed(opts.seed)
    loader = DataLoader(data, batch_size=opts.batch_size, shuffle=True, collate_fn=collate_detection, generator=gen)
    detector.train()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, opts.epochs):
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
            config={"train": asdict(opts), "n_train": len(samples), "history": history},
        )
    return {"epochs": opts.epochs, "history": history, "seconds": time.perf_counter() - t0, "n_train": len(samples)}
