"""Checkpoints: plain state dicts plus a JSON config, loadable with ``weights_only=True``.

A checkpoint is a ``torch.save`` of a dict holding only tensors, numbers, strings and
containers of them (no pickled objects):

``format`` (str), ``kind`` ("segmentation" | "classifier"), ``config`` (JSON string:
preset, training options, metrics), ``model`` (state dict), ``optimizer`` (state dict or
absent), ``epoch`` (completed epochs). The same config is written beside it as
``<file>.json`` for people. Writes are atomic.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctmask.core.errors import CheckpointError
from ctmask.core.fileio import atomic_path, write_json_atomic
from ctmask.core.presets import Preset, get_preset, preset_from_dict

FORMAT = "ctmask-checkpoint/1"
KINDS = ("segmentation", "classifier")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    kind: str
    preset: Preset
    model: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    optimizer: dict | None = None
    epoch: int = 0


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    preset: Preset,
    model: dict[str, torch.Tensor],
    config: dict | None = None,
    optimizer: dict | None = None,
    epoch: int = 0,
) -> None:
    """Write a checkpoint atomically (and its ``.json`` config beside it)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = {"kind": kind, "preset": preset.to_dict(), "epoch": epoch, **(config or {})}
    blob = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(cfg),
        "model": {k: v.detach().cpu() for k, v in model.items()},
        "epoch": int(epoch),
    }
    if optimizer is not None:
        blob["optimizer"] = optimizer
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    write_json_atomic(path.with_name(path.name + ".json"), cfg)


def load_checkpoint(path: str | Path, kind: str | None = None, preset: str | None = None) -> Checkpoint:
    """Load and validate a checkpoint.

    Args:
        path: file written by :func:`save_checkpoint`.
        kind: if given, the required kind.
        preset: if given, the required preset name.

    Raises:
        CheckpointError: missing, unreadable, not a ctmask checkpoint, or of another
            kind / preset than required.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file does not exist", path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})",
            path,
            hint="was it written by ctmask and copied completely?",
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"not a ctmask checkpoint (expected format {FORMAT!r})", path)
    try:
        cfg = json.loads(blob["config"])
        ckpt_preset = preset_from_dict(cfg["preset"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint config is malformed: {exc}", path) from None
    if kind is not None and blob["kind"] != kind:
        raise CheckpointError(f"expected a {kind} checkpoint, found a {blob['kind']} checkpoint", path)
    if preset is not None:
        get_preset(preset)
        if ckpt_preset.name != preset:
            raise CheckpointError(
                f"checkpoint was trained with preset {ckpt_preset.name!r}, but preset {preset!r} was requested",
                path,
                hint=f"use --preset {ckpt_preset.name} or a checkpoint of preset {preset!r}",
            )
    return Checkpoint(
        path=path,
        kind=blob["kind"],
        preset=ckpt_preset,
        model=blob["model"],
        config=cfg,
        optimizer=blob.get("optimizer"),
        epoch=int(blob.get("epoch", 0)),
    )


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` naming ``path``."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:4]
        raise CheckpointError("weights do not fit the model: " + " | ".join(lines)[:600], path) from None
