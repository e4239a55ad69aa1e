"""Checkpoints: plain state dicts plus a JSON config, loadable with ``weights_only=True``.

A checkpoint is a ``torch.save`` of a dict holding only tensors, numbers, strings and
containers of them (no pickled objects), format ``ctmask-checkpoint/2``:

``format`` (str), ``kind`` ("segmentation" | "classifier"), ``config`` (JSON string:
preset, training options, pre-processing, metrics), ``model`` (state dict), ``optimizer``
(state dict or absent), ``epoch`` (completed epochs), ``weights_sha256`` (digest of
``model``, see :func:`weights_digest`), ``optimizer_sha256`` (digest of ``optimizer``,
present with it) and ``content_sha256`` (digest of everything else, see
:func:`content_digest`). The same config is written beside it as ``<file>.json`` for
people. Writes are atomic.

The digests are verified on load: ``torch.load`` reads corrupted bytes without a complaint
(the zip entries' CRCs are not checked), so a bit flip in the weights or in the config (an
NMS threshold, the window level) would otherwise train, evaluate and export a wrong model
silently. In format /2 every digest is mandatory: a missing one, or a key the format does
not have (a damaged key name), is corruption. Files of format ``ctmask-checkpoint/1``
(written before the config was covered) still load, their weights checked when they carry a
digest, with a :class:`~ctmask.core.errors.CtmaskWarning` saying they cannot be fully
verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctmask.core.errors import CheckpointError, CtmaskError, CtmaskWarning
from ctmask.core.fileio import atomic_path, write_json_atomic
from ctmask.core.preprocess import Preprocessing
from ctmask.core.presets import Preset, get_preset, preset_from_dict

FORMAT = "ctmask-checkpoint/2"
LEGACY_FORMAT = "ctmask-checkpoint/1"
"""Written before ``content_sha256`` existed (some also before ``weights_sha256``)."""
KINDS = ("segmentation", "classifier")

_KEYS = {"format", "kind", "config", "model", "epoch", "optimizer", "weights_sha256", "optimizer_sha256"}
_KEYS_BY_FORMAT = {FORMAT: _KEYS | {"content_sha256"}, LEGACY_FORMAT: _KEYS}
_CORRUPT_HINT = "the file was damaged after it was written (disk, copy, download); use an intact copy"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        weights_sha256: :func:`weights_digest` of ``model`` (as loaded).
        verified: every digest (weights, optimizer, content) was present and matched;
            False only for ``ctmask-checkpoint/1`` files, which cannot be fully verified.
        preprocessing: the pre-processing the model was trained with.
    """

    path: Path
    kind: str
    preset: Preset
    model: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    optimizer: dict | None = None
    epoch: int = 0
    weights_sha256: str = ""
    verified: bool = False
    preprocessing: Preprocessing = field(default_factory=Preprocessing)


_MAX_NESTING = 32
"""Deepest nesting of containers a state may have (an optimizer state has 4 levels)."""


class _TooDeep(ValueError):
    """A state nests its containers deeper than :data:`_MAX_NESTING`."""


def _leaves(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) pairs of nested dicts / lists / tuples.

    Raises:
        _TooDeep: containers nested past :data:`_MAX_NESTING` (a crafted file; deeper recursion
            would end in a RecursionError).
    """
    if isinstance(obj, (Mapping, list, tuple)) and depth >= _MAX_NESTING:
        raise _TooDeep(f"nests containers more than {_MAX_NESTING} deep")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}.", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.", depth + 1)
    else:
        yield prefix[:-1], obj


def weights_digest(state: Mapping[str, Any]) -> str:
    """Hex sha256 of a state dict's contents, independent of how the file stores them.

    Every entry, names sorted, contributes its name, dtype, shape and raw (native byte
    order, C-contiguous) bytes; nested containers (an optimizer state) are flattened to
    dotted names, and non-tensor leaves (learning rates, step counts) contribute their
    ``repr``.
    """
    h = hashlib.sha256()
    for name, value in sorted(_leaves(state), key=lambda kv: kv[0]):
        h.update(name.encode("utf-8") + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}\0{list(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f"{type(value).__name__}\0{value!r}\0".encode())
    return h.hexdigest()


def content_digest(*, format: str, kind: Any, config: Any, epoch: Any, weights_sha256: str,
                   optimizer_sha256: str | None) -> str:
    """Hex sha256 over everything of a checkpoint but the tensors themselves.

    Covers ``format``, ``kind``, the ``config`` JSON string (byte for byte), ``epoch``,
    and the weights and optimizer digests (which cover the tensors); each field contributes
    its name, type name and ``repr`` in this fixed order, an absent optimizer ``None``.
    """
    h = hashlib.sha256()
    fields = {"format": format, "kind": kind, "config": config, "epoch": epoch,
              "weights_sha256": weights_sha256, "optimizer_sha256": optimizer_sha256}
    for name, value in fields.items():
        h.update(f"{name}\0{type(value).__name__}\0{value!r}\0".encode())
    return h.hexdigest()


def _check_preset_types(preset: Preset) -> None:
    """Raise ValueError when a preset field has another type than the dataclass declares
    (an ``int`` where a ``float`` is declared is fine; a ``bool`` is not a number)."""
    for f in dataclasses.fields(Preset):
        value = getattr(preset, f.name)
        declared = str(f.type).replace(" ", "")
        if declared.startswith("tuple["):
            items = declared[len("tuple["):-1].split(",")
            if not isinstance(value, tuple):
                raise ValueError(f"preset.{f.name} must be a list, got {value!r}")
            if items[-1] == "...":
                items = [items[0]] * len(value)
            elif len(value) != len(items):
                raise ValueError(f"preset.{f.name} must have {len(items)} entries, got {value!r}")
            pairs = list(zip(items, value))
        else:
            pairs = [(declared, value)]
        for typ, v in pairs:
            ok = {"str": isinstance(v, str), "bool": isinstance(v, bool),
                  "int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool)}.get(typ, True)
            if not ok:
                raise ValueError(f"preset.{f.name} must be of type {declared}, got {value!r}")


_PRESET_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "fpn_channels": (1, 4096), "image_size": (32, 8192), "mask_head_channels": (1, 4096), "n_rois": (1, 100_000),
    "classifier_width": (1, 65_536), "box_representation": (1, 65_536), "num_lesion_classes": (2, 1000),
    "num_slice_classes": (2, 1000), "seg_detections": (1, 100_000), "rpn_pre_nms_top_n_train": (1, 1_000_000),
    "rpn_post_nms_top_n_train": (1, 1_000_000), "rpn_pre_nms_top_n_test": (1, 1_000_000),
    "rpn_post_nms_top_n_test": (1, 1_000_000), "rpn_batch_size_per_image": (1, 1_000_000),
    "box_batch_size_per_image": (1, 1_000_000), "mask_head_layers": (1, 64),
}
"""Accepted range of each integer size of a checkpoint's preset (the paper's are far inside)."""


def _check_preset_bounds(preset: Preset) -> None:
    """Raise ValueError naming the first preset field outside what any ctmask model can be: sizes
    in :data:`_PRESET_INT_BOUNDS`, 1-64 blocks per stage, 1-16 finite positive anchor sizes and
    aspect ratios, thresholds and box coder weights finite (a config from elsewhere could
    otherwise have the model built with any size before its weights are compared)."""
    for name, (lo, hi) in _PRESET_INT_BOUNDS.items():
        value = getattr(preset, name)
        if not lo <= value <= hi:
            raise ValueError(f"preset.{name} is {value}, outside [{lo}, {hi}]")
    if not all(1 <= b <= 64 for b in preset.backbone_blocks):
        raise ValueError(f"preset.backbone_blocks {list(preset.backbone_blocks)}: each stage needs 1 to 64 blocks")
    for name in ("anchor_sizes", "aspect_ratios"):
        values = getattr(preset, name)
        if not 1 <= len(values) <= 16 or not all(math.isfinite(v) and 0 < v <= 8192 for v in values):
            raise ValueError(f"preset.{name} {list(values)[:20]}: expected 1 to 16 finite values in (0, 8192]")
    for f in dataclasses.fields(Preset):
        value = getattr(preset, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"preset.{f.name} is {value!r}, not finite")


def expected_shapes(kind: str, preset: Preset) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a ``kind`` checkpoint of ``preset`` holds, from the model
    built on the meta device (shapes only: no memory is allocated)."""
    from ctmask.training.detector import build_detector
    from ctmask.training.model import CovidCTMaskNet

    with torch.device("meta"):
        state = (CovidCTMaskNet(preset).state_dict_for_checkpoint() if kind == "classifier"
                 else build_detector(preset).state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}


def _shape_problems(model: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How the stored tensors differ (names, shapes) from those the preset builds; at most 3 of each kind."""
    missing = [k for k in expected if k not in model]
    unexpected = [k for k in model if k not in expected]
    wrong = [f"{k} is stored {list(model[k].shape)}, the preset builds {list(v)}"
             for k, v in expected.items() if k in model and tuple(model[k].shape) != v]
    problems = wrong[:3] + ([f"... and {len(wrong) - 3} more of other shapes"] if len(wrong) > 3 else [])
    for what, names in (("missing", missing), ("not in the model", unexpected)):
        if names:
            problems.append(f"{len(names)} tensor(s) {what} ({', '.join(map(str, names[:3]))}"
                            f"{', ...' if len(names) > 3 else ''})")
    return problems


def _unpickling_refused(exc: Exception) -> str:
    """What a ``weights_only=True`` refusal means, naming the Python object the file pickles; never
    torch's advice to load it with ``weights_only=False`` (which runs code from the file)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    what = f" (it pickles {found.group(1)})" if found else ""
    return (f"not a ctmask checkpoint: it holds Python objects beyond tensors, numbers and strings{what}, which "
            "ctmask never writes and does not load (unpickling them would run code from the file)")


def preprocessing_of(config: dict) -> Preprocessing:
    """The pre-processing recorded in a checkpoint config.

    ``config["preprocess"]`` when present; older checkpoints recorded only the
    ``train.crop`` training option (the window and resize were fixed then).

    Raises:
        ValueError: the recorded values are malformed.
    """
    if "preprocess" in config:
        return Preprocessing.from_dict(config["preprocess"])
    crop = (config.get("train") or {}).get("crop", False)
    return Preprocessing(crop=bool(crop))


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    preset: Preset,
    model: dict[str, torch.Tensor],
    config: dict | None = None,
    optimizer: dict | None = None,
    epoch: int = 0,
    preprocess: Preprocessing | None = None,
) -> None:
    """Write a checkpoint atomically (and its ``.json`` config beside it).

    Args:
        path: checkpoint file to write.
        kind: "segmentation" or "classifier".
        preset: the model's preset.
        model: state dict.
        config: training options, history ... (JSON-serialisable); ``config["train"]
            ["crop"]`` is the crop choice when ``preprocess`` is not given.
        optimizer: optimizer state dict, for resuming.
        epoch: completed epochs.
        preprocess: the pre-processing the model was trained with (default: from
            ``config``, see :func:`preprocessing_of`); stored as ``config["preprocess"]``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = dict(config or {})
    prep = preprocess if preprocess is not None else preprocessing_of(config)
    cfg = {"kind": kind, "preset": preset.to_dict(), "epoch": epoch, **config, "preprocess": prep.to_dict()}
    weights = {k: v.detach().cpu() for k, v in model.items()}
    blob = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(cfg),
        "model": weights,
        "epoch": int(epoch),
        "weights_sha256": weights_digest(weights),
    }
    if optimizer is not None:
        blob["optimizer"] = optimizer
        blob["optimizer_sha256"] = weights_digest(optimizer)
    blob["content_sha256"] = content_digest(
        format=FORMAT, kind=kind, config=blob["config"], epoch=blob["epoch"],
        weights_sha256=blob["weights_sha256"], optimizer_sha256=blob.get("optimizer_sha256"))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    write_json_atomic(path.with_name(path.name + ".json"), {**cfg, "weights_sha256": blob["weights_sha256"]})


def load_checkpoint(path: str | Path, kind: str | None = None, preset: str | None = None) -> Checkpoint:
    """Load and validate a checkpoint.

    Args:
        path: file written by :func:`save_checkpoint`.
        kind: if given, the required kind.
        preset: if given, the required preset name.

    Raises:
        CheckpointError: missing, unreadable (truncated, garbled), not a ctmask
            checkpoint, corrupt (a digest that does not match, a digest missing, an
            unknown entry), a config that cannot be interpreted, or of another kind /
            preset than required.

    Warns:
        CtmaskWarning: a ``ctmask-checkpoint/1`` file, which cannot be fully verified
            (it is loaded all the same).
    """
    path = Path(path)
    blob = _read_blob(path)
    fmt, model = _check_entries(blob, path)
    legacy = fmt == LEGACY_FORMAT
    digest = _check_digests(blob, fmt, model, path)
    cfg, ckpt_preset, prep = _read_config(blob, path)
    # The stored tensors' shapes against the preset's, before anything builds the model at the
    # preset's sizes (a classifier_width edited to 20000 would allocate gigabytes first).
    shape_problems = _shape_problems(model, expected_shapes(blob["kind"], ckpt_preset))
    if shape_problems:
        raise CheckpointError(f"the preset in the checkpoint config ({ckpt_preset.name!r}) does not fit its stored "
                              "weights: " + "; ".join(shape_problems), path,
                              hint="the config and the weights are of different models (edited or damaged); use the "
                                   "checkpoint as ctmask wrote it")
    if legacy:
        what = ("has no weights digest (written before ctmask recorded one), so its weights and config cannot"
                if "weights_sha256" not in blob else
                f"is of format {LEGACY_FORMAT} (no digest of its config), so its config, kind and epoch cannot")
        warnings.warn(f"{path}: checkpoint {what} be checked for corruption; re-save it to add digests",
                      CtmaskWarning, stacklevel=2)
    _check_wanted(blob["kind"], ckpt_preset, kind, preset, path)
    return Checkpoint(
        path=path,
        kind=blob["kind"],
        preset=ckpt_preset,
        model=model,
        config=cfg,
        optimizer=blob.get("optimizer"),
        epoch=int(blob.get("epoch", 0)),
        weights_sha256=digest,
        verified=not legacy,
        preprocessing=prep,
    )


def _read_blob(path: Path) -> Any:
    """What ``torch.load`` (weights only) finds in ``path``, or a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError("checkpoint file does not exist", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_refused(exc), path,
                              hint="a ctmask checkpoint comes from `ctmask train-seg` / `ctmask train-cls`") from None
    except Exception as exc:  # a damaged file makes torch.load fail in many ways (KeyError among them)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read checkpoint, the file is damaged or not a checkpoint ({exc.__class__.__name__}: {first})",
            path,
            hint="was it written by ctmask and copied completely? Re-copy it or use an earlier checkpoint",
        ) from None


def _check_entries(blob: Any, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The blob's format and state dict, once its entries are those of a ctmask checkpoint
    (known format, no unknown entry, the digests its format requires present)."""
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if isinstance(fmt, str) and fmt.startswith("ctmask-checkpoint/") and fmt not in _KEYS_BY_FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {fmt!r}; this ctmask reads {FORMAT!r} and "
                              f"{LEGACY_FORMAT!r}", path, hint="written by another ctmask version, or damaged")
    if not isinstance(fmt, str) or fmt not in _KEYS_BY_FORMAT:
        raise CheckpointError(f"not a ctmask checkpoint (expected format {FORMAT!r})", path)
    unknown = sorted(map(str, set(blob) - _KEYS_BY_FORMAT[fmt]))
    if unknown:
        raise CheckpointError(f"checkpoint corrupt: unknown entries {unknown} (a damaged key name?)", path,
                              hint=_CORRUPT_HINT)
    model = blob.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError("checkpoint holds no state dict under 'model'", path)
    legacy = fmt == LEGACY_FORMAT
    has_optimizer = blob.get("optimizer") is not None
    required = ["weights_sha256"] + (["optimizer_sha256"] if has_optimizer else [])
    if not legacy:
        required += ["kind", "config", "epoch", "content_sha256"]
    elif "weights_sha256" not in blob and "optimizer_sha256" not in blob:
        required = []  # /1 written before digests existed
    missing = [k for k in required if blob.get(k) is None]
    if missing:
        raise CheckpointError(f"checkpoint corrupt: {', '.join(missing)} missing", path, hint=_CORRUPT_HINT)
    if "optimizer_sha256" in blob and not has_optimizer:
        raise CheckpointError("checkpoint corrupt: optimizer_sha256 without an optimizer state", path,
                              hint=_CORRUPT_HINT)
    return fmt, model


def _check_digests(blob: dict, fmt: str, model: dict[str, torch.Tensor], path: Path) -> str:
    """The weights' digest, once every digest the blob records matches its contents."""
    has_optimizer = blob.get("optimizer") is not None
    digest = weights_digest(model)
    _verify(blob, "weights_sha256", digest, path, "weights damaged")
    try:
        optimizer_digest = weights_digest(blob["optimizer"]) if has_optimizer else None
    except _TooDeep as exc:
        raise CheckpointError(f"checkpoint corrupt: its optimizer state {exc}; ctmask writes 4 levels", path,
                              hint=_CORRUPT_HINT) from None
    if has_optimizer:
        _verify(blob, "optimizer_sha256", optimizer_digest, path, "optimizer state damaged")
    if fmt != LEGACY_FORMAT:
        _verify(blob, "content_sha256", content_digest(
            format=fmt, kind=blob["kind"], config=blob["config"], epoch=blob["epoch"], weights_sha256=digest,
            optimizer_sha256=optimizer_digest), path, "config, kind or epoch damaged")
    return digest


def _read_config(blob: dict, path: Path) -> tuple[dict, Preset, Preprocessing]:
    """The checkpoint's config, preset and pre-processing, each checked (kind, epoch, types, bounds)."""
    try:
        if blob.get("kind") not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {blob.get('kind')!r}")
        if not isinstance(blob.get("epoch", 0), int) or isinstance(blob.get("epoch", 0), bool):
            raise ValueError(f"epoch must be an integer, got {blob.get('epoch')!r}")
        cfg = json.loads(blob["config"])
        if not isinstance(cfg, dict):
            raise ValueError(f"config must be a JSON object, got {type(cfg).__name__}")
        if cfg.get("kind", blob["kind"]) != blob["kind"]:
            raise ValueError(f"config says kind {cfg['kind']!r}, the checkpoint {blob['kind']!r}")
        ckpt_preset = preset_from_dict(cfg["preset"])
        _check_preset_types(ckpt_preset)
        _check_preset_bounds(ckpt_preset)
        prep = preprocessing_of(cfg)
    except Exception as exc:  # anything in a damaged or hand-edited config
        why = exc.message if isinstance(exc, CtmaskError) else f"{exc.__class__.__name__}: {exc}"
        raise CheckpointError(f"checkpoint config is malformed: {why}"[:600], path, hint=_CORRUPT_HINT) from None
    return cfg, ckpt_preset, prep


def _check_wanted(found: str, ckpt_preset: Preset, kind: str | None, preset: str | None, path: Path) -> None:
    """Refuse a checkpoint of another kind or preset than the caller requires."""
    if kind is not None and found != kind:
        raise CheckpointError(f"expected a {kind} checkpoint, found a {found} checkpoint", path)
    if preset is not None and ckpt_preset.name != preset:
        # An unknown name is refused naming the choices; the checkpoint's own name is accepted even
        # when no named preset has it (import-reference spells out an authors' model's).
        get_preset(preset)
        raise CheckpointError(
            f"checkpoint was trained with preset {ckpt_preset.name!r}, but preset {preset!r} was requested",
            path,
            hint=f"use --preset {ckpt_preset.name} or a checkpoint of preset {preset!r}",
        )


def _verify(blob: dict, key: str, digest: str, path: Path, what: str) -> bool:
    """Compare ``blob[key]`` with ``digest``; False when the blob has no such key (callers
    have already rejected a missing key where the format requires it).

    Raises:
        CheckpointError: the recorded digest differs (the file's bytes were damaged).
    """
    recorded = blob.get(key)
    if recorded is None:
        return False
    if not isinstance(recorded, str) or recorded != digest:
        raise CheckpointError(
            f"checkpoint corrupt: {what} (sha256 {digest[:16]}... where {str(recorded)[:16]}... was "
            "recorded when the file was written)",
            path,
            hint=_CORRUPT_HINT,
        )
    return True
