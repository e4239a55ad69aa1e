"""The authors' released checkpoints (COVID-CT-Mask-Net, AlexTS1980) -> ctmask checkpoints.

The reference saves ``torch.save({...})`` dicts (torch 1.1: the legacy non-zip format) holding
``model_weights`` (a state dict in torchvision 0.3's Mask R-CNN naming, S as ``s2new``),
``anchor_generator`` (a *pickled object* of the reference's own class, whose ``sizes`` and
``aspect_ratios`` its scripts read), and ``epoch`` / ``model_name`` / ``optimizer_state`` /
``lrate``. A segmentation model holds the mask branch and no S; a classifier holds S and no mask
branch (the reference builds it as a Faster R-CNN).

Nothing from the file runs. A zip-format file is read with ``torch.load(weights_only=True)``, whose
unpickler builds tensors and plain containers only. The authors' files are of the legacy format,
and there torch pickles an ``nn.Module`` with a record of its class's source (a ``'module'``
persistent id), which ``weights_only=True`` refuses whatever the allow-list. Those are read by
``torch.load``'s legacy reader with an unpickler whose ``find_class`` resolves nothing but the
same short allow-list (:data:`ALLOWED`: the tensor rebuild function, ``OrderedDict``,
``torch.Size``, ``set``, a stub for torch 1.1's module backend; storage types are resolved by
torch itself) -- the restriction the Python
documentation describes under "Restricting Globals". In both paths the reference's two
anchor-generator classes (:data:`ANCHOR_CLASSES`) resolve to :class:`RecordedAnchors`, which
keeps ``sizes`` and ``aspect_ratios`` and drops the rest of the pickled module; any other Python
object in the file is refused by name, before anything calls it. Nor does a file allocate more than
its size: a legacy file's storage records are checked before torch's reader allocates them
(:class:`_LegacyGuard`), and a zip whose records unpack to more than the file (torch stores them
uncompressed) is refused before it is opened by torch.

What the file tells (:func:`infer_preset`): backbone (block type and blocks per stage),
truncation (the stages present), one-level or four-level FPN, FPN / box-head / mask-head widths,
detector classes (3 = mask type ``both``), N and S width (a classifier's ``s2new`` shapes) and
the anchors. What it cannot: ``ggo`` or ``merge`` for a 2-class file, and N and S width of a
segmentation file (no S yet): options give those (:class:`ImportOptions`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import pickle
import pickletools
import re
import reprlib
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctmask.core.errors import CheckpointError
from ctmask.core.outputs import check_outputs
from ctmask.core.presets import MASK_TYPES, PAPER, PRESETS, RESNET18_T1, RESNET34_T1, Preset
from ctmask.training.checkpoint import save_checkpoint

ANCHOR_CLASSES: tuple[str, ...] = ("models.mask_net.rpn.AnchorGenerator",
                                   "models.mask_net.rpn_segmentation.AnchorGenerator")
"""The reference's anchor generators (``train_classifier.py`` / ``evaluate_classifier.py`` import the
first, ``train_segmentation.py`` the second), as a pickle names them."""

TOP_LEVEL = ("model_weights", "anchor_generator", "epoch", "model_name", "optimizer_state", "lrate")
"""The entries the reference's scripts save (``train_segmentation.py``, ``train_classifier.py``)."""

BACKBONES: dict[str, tuple[bool, tuple[int, int, int, int]]] = {
    "resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)), "resnet50": (True, (3, 4, 6, 3))}
"""The reference's ``--backbone_name`` choices: (Bottleneck?, blocks per stage)."""

FAMILY: dict[str, Preset] = {"resnet18": RESNET18_T1, "resnet34": RESNET34_T1, "resnet50": PAPER}
"""Where the values the file cannot hold come from (N and S width of a segmentation file, the
thresholds the reference takes from its command line)."""

_KEY_RULES: tuple[tuple[str, str], ...] = (
    # torchvision 0.3 plain convolutions became Conv2dNormActivation blocks (one more ``.0``).
    (r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$", r"backbone.fpn.\1_blocks.\2.0.\3"),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", "MASK_FCN"),
    (r"^(backbone\.body\.[\w.]+|rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)"
     r"|roi_heads\.box_head\.fc[67]\.(weight|bias)|roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)"
     r"|roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias))$", r"\1"),
)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""The weights' dtypes imported (as float32); any other (integer, bool, complex) is refused by name
(but ``num_batches_tracked``, int64)."""
_S_LAYERS = {"fc_scores": 0, "fc_scores_2": 2, "fc_scores_img": 4}
"""``s2new`` (the reference's ``S2Predictor``) -> :class:`~ctmask.training.heads.RoIClassifier`'s ``net`` index."""


class RecordedAnchors:
    """Stand-in for the reference's ``AnchorGenerator``: keeps ``sizes`` and ``aspect_ratios`` only.

    The weights-only unpickler creates it with ``__new__`` and hands it the pickled module's
    ``__dict__`` (already built from plain containers and tensors) through :meth:`__setstate__`;
    no method of the reference's class exists here, so none can run.
    """

    sizes: Any = None
    aspect_ratios: Any = None
    dump_patches = False
    """Read by torch's legacy reader when the file's record of the class's source (torch 1.1 saved the
    reference's ``rpn.py`` source with every file) differs from this class's, as it always does:
    without it that reader stops with an AttributeError; True would make it write a patch file into
    the working directory."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.sizes = state.get("sizes")
            self.aspect_ratios = state.get("aspect_ratios")


@dataclass(frozen=True)
class ImportOptions:
    """Values the file may not tell; each given one must agree with what the file does tell.

    Attributes:
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50``.
        truncation: 0, 1 or 2.
        mask_type: ``both``, ``ggo`` or ``merge`` (required for a 2-class file).
        n_rois: N (a segmentation file has no S; default: the family's preset).
        s_width: S width F (as ``n_rois``).
    """

    backbone: str | None = None
    truncation: int | None = None
    mask_type: str | None = None
    n_rois: int | None = None
    s_width: int | None = None


def _no_backend() -> None:
    """Stands for torch < 1.4's ``torch.nn.backends.thnn._get_thnn_function_backend``: every
    ``nn.Module`` of torch 1.1 held ``_backend``, which pickles as a call of that function with no
    arguments (torch keeps a stub returning None for such pickles; so does this)."""
    return None


THNN_BACKEND = "torch.nn.backends.thnn._get_thnn_function_backend"

ALLOWED: dict[str, Any] = {"torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                           "collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size,
                           "builtins.set": set, THNN_BACKEND: _no_backend}
"""What a legacy-format file's pickle may name, besides the anchor classes (a state dict, the
anchor generator's ``__dict__`` with its cached anchors and torch 1.1's ``_backend``, an optimizer
state)."""


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves :data:`ALLOWED` and :data:`ANCHOR_CLASSES` only; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{'builtins' if module == '__builtin__' else module}.{name}"  # protocol 2 names Python 2's
        if full in ANCHOR_CLASSES:
            return RecordedAnchors
        if full in ALLOWED:
            return ALLOWED[full]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 80, 80


def _short(value: Any) -> str:
    """A string as is; anything else as a bounded repr (a file's nested containers are no reason for a
    RecursionError, nor for a message of megabytes)."""
    return value if isinstance(value, str) and len(value) <= 200 else _REPR.repr(value)


class _Refused(Exception):
    """The file declares something a reference checkpoint never holds (raised before torch acts on it)."""


class _TooShort(Exception):
    """The file declares more bytes than it has: truncated (or crafted); raised before torch allocates."""


class _LegacyGuard:
    """Checks a legacy-format file's storage records before torch's legacy reader acts on them.

    That reader allocates each storage at the size its persistent id declares, before reading the
    storage's bytes, and fills only the storages the file's key list names: a few bytes could
    declare terabytes, or a storage the file never fills (uninitialised memory imported as
    weights). A legacy file holds every storage's bytes, so the declared storages may not add up
    to more than the file's size, and each must be in the key list (checked after the load).
    """

    def __init__(self, size: int):
        self.size, self.declared, self.loads = size, {}, []

    def check(self, saved_id: Any) -> None:
        if not isinstance(saved_id, tuple) or not saved_id:
            raise _Refused(f"a persistent id {_short(saved_id)} that is none of torch's")
        typename = saved_id[0].decode("ascii", "replace") if isinstance(saved_id[0], bytes) else saved_id[0]
        if typename == "module":
            if len(saved_id) < 2 or saved_id[1] is not RecordedAnchors:
                raise _Refused("an nn.Module record of a class other than the reference's anchor generator")
            return
        if typename != "storage" or len(saved_id) != 6:
            raise _Refused(f"a persistent id {_short(saved_id)} that is none of torch's")
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        dtype = getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
            raise _Refused(f"a storage record {_short(saved_id[1:])} that is none of torch's")
        if key not in self.declared:
            self.declared[key] = numel * torch._utils._element_size(dtype)
            total = sum(self.declared.values())
            if total > self.size:
                raise _TooShort(f"it declares storages of {total:,} bytes or more in a file of {self.size:,} bytes, "
                                "which a legacy file holds in full; nothing allocated")

    def after(self) -> None:
        """Every declared storage was read from the file (its key list is the last header pickle)."""
        listed = self.loads[-1] if self.loads and isinstance(self.loads[-1], list) else []
        unfilled = sorted(_short(k) for k in self.declared if k not in listed)
        if unfilled:
            raise _Refused(f"storage(s) {unfilled[:3]} that are not in the file's storage list: their contents "
                           "would be uninitialised memory")


def _legacy_pickle_module(guard: _LegacyGuard) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load``'s legacy reader: it subclasses ``Unpickler`` (resolving storage
    types itself, handing other names to :meth:`_AllowListUnpickler.find_class`, setting ``persistent_load``
    before ``load``) and calls ``load`` for the header and the storage key list. ``guard`` sees every
    persistent id before torch's ``persistent_load`` does."""

    class Unpickler(_AllowListUnpickler):
        def load(self) -> Any:
            torch_persistent_load = getattr(self, "persistent_load", None)
            if torch_persistent_load is not None:
                def checked(saved_id: Any) -> Any:
                    guard.check(saved_id)
                    return torch_persistent_load(saved_id)
                self.persistent_load = checked
            return super().load()

    def load(f: Any, **kw: Any) -> Any:
        guard.loads.append(Unpickler(f, **kw).load())
        return guard.loads[-1]

    return types.SimpleNamespace(__name__="ctmask_allow_list_pickle", Unpickler=Unpickler,
                                 UnpicklingError=pickle.UnpicklingError, load=load)


def _torch_load(path: Path) -> Any:
    """``torch.load`` on the CPU, running nothing from the file (see the module docstring) and allocating
    no more than the file's size for its tensors."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            unpacked = sum(i.file_size for i in z.infolist())
        if unpacked > size:  # torch stores its records uncompressed; a compressed one can be a zip bomb
            raise _Refused(f"a zip archive that unpacks to {unpacked:,} bytes from {size:,} (torch stores its "
                           "records uncompressed): not written by torch.save; nothing unpacked")
        targets: list[Any] = [(RecordedAnchors, name) for name in ANCHOR_CLASSES] + [(_no_backend, THNN_BACKEND)]
        with torch.serialization.safe_globals(targets):
            return torch.load(path, map_location="cpu", weights_only=True)
    guard = _LegacyGuard(size)
    with warnings.catch_warnings():
        # The legacy record of the anchor class's source differs from the stand-in's, by design.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        blob = torch.load(path, map_location="cpu", pickle_module=_legacy_pickle_module(guard),  # type: ignore[arg-type]
                          weights_only=False)
    guard.after()
    return blob


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[0][:200]


def _refused_by_unpickler(text: str) -> str | None:
    """What an allow-list refused, from an ``UnpicklingError``'s text; None for a malformed pickle.

    The legacy path's :meth:`_AllowListUnpickler.find_class` says ``Unsupported global: GLOBAL x``;
    torch's weights-only unpickler (zip path) says that, ``Unsupported operand x`` or, wrapped in its
    "Weights only load failed" advice, why else it stopped. Any other ``UnpicklingError`` is Python's
    unpickler on bytes that are no pickle (random bytes, a text file, a truncated pickle).
    """
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:  # the opcode's byte value: name it
        code = int(found.group(1))
        names = [op.name for op in pickletools.opcodes if code < 256 and op.code == chr(code)]
        name = names[0] if names else "?"
        return f"the pickle instruction {name} (opcode {code}, not run by torch's weights-only reader)"
    if "Weights only load failed" in text:
        inner = text.split("WeightsUnpickler error: ", 1)[1] if "WeightsUnpickler error: " in text else \
            text.split("\n\n", 1)[-1]
        return f"something torch's weights-only reader refuses ({_first_line(inner)})"
    return None


def read_reference(path: Path) -> dict:
    """The file's top-level dict, read without running anything from it.

    Raises:
        CheckpointError: missing, unreadable (truncated, not a torch file), a Python object beyond
            tensors, containers and the anchor generator (named), or not a dict with ``model_weights``.
    """
    if path.is_dir():
        raise CheckpointError("is a folder, not a checkpoint file", path,
                              hint="give one of the .pth files the authors' zip unpacks to")
    if not path.is_file():
        raise CheckpointError("file does not exist", path)
    try:
        blob = _torch_load(path)
    except _TooShort as exc:
        raise CheckpointError(f"cannot read the file: damaged, truncated or not a torch checkpoint ({exc})", path,
                              hint="download the authors' zip again and unpack it completely") from None
    except _Refused as exc:
        raise CheckpointError(f"refused: the file declares {exc}", path,
                              hint="the authors' files hold only weights, numbers and the anchor generator: "
                                   "this one is not one of them, or was altered") from None
    except pickle.UnpicklingError as exc:
        what = _refused_by_unpickler(str(exc))
        if what is None:  # Python's unpickler on bytes that are no (whole) pickle: damaged, not refused
            raise CheckpointError(f"cannot read the file: damaged, truncated or not a torch checkpoint "
                                  f"(the pickle is malformed: {_first_line(str(exc))})", path,
                                  hint="download the authors' zip again and unpack it completely") from None
        raise CheckpointError(f"refused: the file pickles {what}, which is neither a tensor nor the reference's "
                              "anchor generator; unpickling it could run code, so it is not read", path,
                              hint="the authors' files hold only weights, numbers and the anchor generator: "
                                   "this one is not one of them, or was altered") from None
    except Exception as exc:  # a truncated or foreign file fails in many ways inside torch.load
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read the file: damaged, truncated or not a torch checkpoint "
                              f"({exc.__class__.__name__}: {first})", path,
                              hint="download the authors' zip again and unpack it completely") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("model_weights"), dict):
        raise CheckpointError("not one of the reference's checkpoints: no 'model_weights' state dict", path)
    weights = blob["model_weights"]
    bad = [_short(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'model_weights' holds entries that are not tensors: {bad[:3]}", path)
    # torch's weights-only reader (a zip-format file) also rebuilds meta, sparse and quantized tensors
    odd = [f"{k} ({v.layout}, {v.device}, {v.dtype})".replace("torch.", "") for k, v in weights.items()
           if v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized]
    if odd:
        raise CheckpointError(f"'model_weights' holds tensors that are not dense ones with data: {odd[:3]}", path)
    return blob


def _stage_blocks(weights: dict[str, torch.Tensor]) -> dict[int, int]:
    """Stage (1-4) -> residual blocks present, from ``backbone.body.layer{s}.{j}.conv1.weight``."""
    blocks: dict[int, set[int]] = {}
    for k in weights:
        m = re.match(r"^backbone\.body\.layer(\d)\.(\d+)\.conv1\.weight$", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {s: len(js) for s, js in sorted(blocks.items())}


def _agree(name: str, found: Any, given: Any, path: Path) -> Any:
    """``found`` when ``given`` is None or equal; otherwise a refusal naming both."""
    if given is not None and given != found:
        raise CheckpointError(f"--{name} {given} contradicts the file, which holds a {name} of {found}", path)
    return found


def _backbone(weights: dict[str, torch.Tensor], opts: ImportOptions, path: Path) -> tuple[str, int]:
    """(backbone name, truncation) from the body's stages."""
    stages = _stage_blocks(weights)
    kept = len(stages)
    if not stages or list(stages) != list(range(1, kept + 1)) or kept < 2:
        raise CheckpointError(f"the body's stages {list(stages)} are not a (truncated) ResNet's layer1..layer4", path)
    bottleneck = "backbone.body.layer1.0.conv3.weight" in weights
    found = [name for name, (bn, blocks) in BACKBONES.items()
             if bn == bottleneck and blocks[:kept] == tuple(stages.values())]
    if not found:
        raise CheckpointError(f"the body ({'Bottleneck' if bottleneck else 'BasicBlock'}, blocks per stage "
                              f"{list(stages.values())}) is none of the reference's backbones {list(BACKBONES)}", path)
    return _agree("backbone", found[0], opts.backbone, path), _agree("truncation", 4 - kept, opts.truncation, path)


def _anchor_size(v: Any) -> int:
    """An anchor size as the reference writes it (a positive int); anything else (2.7, "2", True, 0) a ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0:
        raise ValueError(v)
    return int(v)


def _aspect_ratio(v: Any) -> float:
    """An aspect ratio (a positive finite number); anything else (nan, inf, 0, "1", True) a ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(v)
    return float(v)


def _anchors(blob: dict, levels: int, per_location: int, path: Path) -> tuple[tuple, tuple, str]:
    """(anchor sizes, aspect ratios, where they came from), one set shared by the used FPN levels."""
    anchors = blob.get("anchor_generator")
    if not isinstance(anchors, RecordedAnchors):
        sizes, ratios, source = PAPER.anchor_sizes, PAPER.aspect_ratios, "not in the file: the reference's defaults"
    else:
        try:
            per_level = [(tuple(_anchor_size(v) for v in s), tuple(_aspect_ratio(v) for v in r))
                         for s, r in zip(anchors.sizes, anchors.aspect_ratios)]
        except (TypeError, ValueError):
            raise CheckpointError(f"the anchor generator's sizes / aspect_ratios are not positive whole numbers / "
                                  f"positive finite numbers: {_short(anchors.sizes)} / {_short(anchors.aspect_ratios)}",
                                  path) from None
        used = per_level[:levels]
        if len(used) < levels or len(set(used)) != 1:
            raise CheckpointError(f"the anchor generator has {len(per_level)} level(s) for {levels} FPN level(s), or "
                                  f"different anchors per level ({used[:4]}); ctmask uses one set on every level", path)
        (sizes, ratios), source = used[0], "the file's anchor generator"
    if len(sizes) * len(ratios) != per_location:
        raise CheckpointError(f"{len(sizes)} anchor sizes x {len(ratios)} aspect ratios ({source}) do not fit the "
                              f"RPN head's {per_location} anchors per location", path)
    return sizes, ratios, source


def infer_preset(blob: dict, opts: ImportOptions, path: Path) -> tuple[str, Preset, dict]:
    """(kind, preset, what came from where) of a reference checkpoint.

    Raises:
        CheckpointError: a value the file contradicts, a shape that is none of the reference's, or
            a value the file cannot tell and no option gives (the 2-class mask type).
    """
    w = blob["model_weights"]
    for name, value in (("n-rois", opts.n_rois), ("s-width", opts.s_width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"--{name} {value}: expected a whole number of at least 1", path)

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in w:
            raise CheckpointError(f"missing key {key!r} (every reference checkpoint has it)", path)
        if w[key].dim() != ndim or 0 in w[key].shape:
            raise CheckpointError(f"{key} is {list(w[key].shape)}: the reference's is a {ndim}-dimensional tensor "
                                  "with no empty dimension", path)
        return tuple(w[key].shape)

    kind = "classifier" if any(k.startswith("s2new.") for k in w) else "segmentation"
    backbone, truncation = _backbone(w, opts, path)
    levels = len({k.split(".")[3] for k in w if k.startswith("backbone.fpn.inner_blocks.")})
    n_classes = shape("roi_heads.box_predictor.cls_score.weight", 2)[0]
    if n_classes == 3:
        mask_type = _agree("mask-type", "both", opts.mask_type, path)
    elif n_classes == 2:
        if opts.mask_type not in ("ggo", "merge"):
            raise CheckpointError("the file has 2 detector classes (one lesion class): give --mask-type ggo or "
                                  "--mask-type merge (the file cannot tell; the authors' released 2-class files are "
                                  "merge)" + (f", not {opts.mask_type!r}" if opts.mask_type else ""), path)
        mask_type = opts.mask_type
    else:
        raise CheckpointError(f"the box predictor has {n_classes} classes; the reference has 2 or 3", path)
    family = FAMILY[backbone]
    inferred: dict[str, Any] = {"kind": kind, "backbone": backbone, "truncation": truncation, "fpn_levels": levels,
                                "detector_classes": n_classes}
    given: dict[str, Any] = {"mask_type": opts.mask_type} if n_classes == 2 else {}
    fields: dict[str, Any] = {
        "fpn_channels": shape("backbone.fpn.layer_blocks.0.weight", 4)[0],
        "box_representation": shape("roi_heads.box_head.fc6.weight", 2)[0],
    }
    if kind == "classifier":
        f, n5 = shape("s2new.fc_scores.weight", 2)
        n_rois = _agree("n-rois", n5 // 5, opts.n_rois, path)
        s_width = _agree("s-width", f, opts.s_width, path)
        inferred.update(n_rois=n_rois, s_width=s_width)
        mask_layers, mask_channels = family.mask_head_layers, family.mask_head_channels
    else:
        n_rois = family.n_rois if opts.n_rois is None else opts.n_rois
        s_width = family.classifier_width if opts.s_width is None else opts.s_width
        given.update(n_rois=n_rois if opts.n_rois is not None else f"{n_rois} (default of {family.name})",
                     s_width=s_width if opts.s_width is not None else f"{s_width} (default of {family.name})")
        mask_layers = len([k for k in w if re.match(r"^roi_heads\.mask_head\.mask_fcn\d+\.weight$", k)])
        mask_channels = shape("roi_heads.mask_predictor.conv5_mask.weight", 4)[0]
    sizes, ratios, anchor_source = _anchors(blob, levels, shape("rpn.head.cls_logits.weight", 4)[0], path)
    inferred.update(fields, anchors=anchor_source)
    bottleneck, blocks = BACKBONES[backbone]
    preset = dataclasses.replace(
        family, backbone_blocks=blocks, bottleneck=bottleneck, truncation=truncation, fpn_levels=levels,
        mask_head_layers=mask_layers, mask_head_channels=mask_channels, n_rois=n_rois, classifier_width=s_width,
        mask_type=mask_type, num_lesion_classes=n_classes, anchor_sizes=sizes, aspect_ratios=ratios, head="paper",
        **fields)
    named = [p.name for p in PRESETS.values() if dataclasses.replace(preset, name=p.name) == p]
    preset = dataclasses.replace(preset, name=named[0] if named else
                                 f"{backbone}-t{truncation}-{mask_type}-n{n_rois}-s{s_width}")
    return kind, preset, {"inferred": inferred, "given": given}


def ctmask_key(key: str) -> str | None:
    """ctmask's name of a reference state-dict key (``detector.*`` / ``classifier.*``), None if unknown."""
    m = re.match(r"^s2new\.(\w+)\.(weight|bias)$", key)
    if m:
        return f"classifier.net.{_S_LAYERS[m.group(1)]}.{m.group(2)}" if m.group(1) in _S_LAYERS else None
    for pattern, repl in _KEY_RULES:
        m = re.match(pattern, key)
        if m and repl == "MASK_FCN":
            return f"detector.roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
        if m:
            return "detector." + m.expand(repl)
    return None


def map_weights(weights: dict[str, torch.Tensor], kind: str, preset: Preset, path: Path) -> tuple[dict, list[str]]:
    """The reference state dict in ctmask's names and layout for ``kind`` of ``preset``.

    A classifier file has no mask branch (unused by classification): it is filled with zeros and
    listed in the second return value.

    Raises:
        CheckpointError: unknown keys, missing keys or shapes that differ, weights that are not
            floating point or not finite, each named.
    """
    from ctmask.training.checkpoint import expected_shapes

    expected = {("detector." + k if kind == "segmentation" else k): v
                for k, v in expected_shapes("classifier" if kind == "classifier" else "segmentation", preset).items()}
    mapped, unknown = {}, []
    for k, v in weights.items():
        new = ctmask_key(k)
        if new is None:
            unknown.append(k)
        else:
            mapped[new] = v
    filled = [k for k in expected if k not in mapped and kind == "classifier" and ".roi_heads.mask_" in k]
    missing = [k for k in expected if k not in mapped and k not in filled]
    wrong = [f"{k} is {list(v.shape)}, the inferred model has {list(expected[k])}"
             for k, v in mapped.items() if k in expected and tuple(v.shape) != expected[k]]
    unknown += [k for k in mapped if k not in expected]
    problems = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)})"
                for what, names in (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", wrong))
                if names]
    if problems:
        raise CheckpointError("the weights do not fit the model inferred from them: " + "; ".join(problems), path,
                              hint="a file altered or of another model; the reference's keys are torchvision 0.3 "
                                   "Mask R-CNN names with S as s2new")
    counters = {k for k in mapped if k.endswith(".num_batches_tracked")}  # BatchNorm's step count, int64
    wrong_type = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in mapped.items()
                  if v.dtype not in ((torch.int64,) if k in counters else FLOAT_DTYPES)]
    if wrong_type:
        raise CheckpointError(f"weights of a type the reference never saves: {', '.join(wrong_type[:5])}"
                              f"{' ...' if len(wrong_type) > 5 else ''} ({len(wrong_type)})", path,
                              hint="the reference's weights and BatchNorm statistics are float32, its "
                                   "num_batches_tracked int64")
    # float16 / bfloat16 convert exactly, float64 rounded
    converted = {k: v if k in counters else v.float() for k, v in mapped.items()}
    non_finite = [f"{k} ({int((~v.isfinite()).sum())} of {v.numel()})" for k, v in converted.items()
                  if k not in counters and not bool(v.isfinite().all())]
    if non_finite:
        raise CheckpointError(f"weights that are NaN or infinite (in float32): {', '.join(non_finite[:5])}"
                              f"{' ...' if len(non_finite) > 5 else ''} ({len(non_finite)})", path,
                              hint="a diverged training run or a damaged file: the model's output would be NaN")
    for k in filled:
        converted[k] = torch.zeros(expected[k])
    state = {k[len("detector."):] if kind == "segmentation" else k: v for k, v in converted.items()}
    return state, filled


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_reference(source: str | Path, out: str | Path, opts: ImportOptions | None = None) -> dict:
    """Convert one of the authors' ``.pth`` files into a ctmask checkpoint at ``out``.

    Returns:
        A summary: ``kind``, ``preset`` (dict), ``inferred``, ``given``, ``source_sha256``,
        ``mask_branch`` (what fills a classifier's mask branch), ``ignored`` (top-level entries not
        imported: the optimizer state, learning rate, name) and ``out``.

    Raises:
        CheckpointError: see :func:`read_reference`, :func:`infer_preset` and :func:`map_weights`.
    """
    source, out = Path(source), Path(out)
    # The CLI checks its outputs before any work; a caller from Python gets the same refusal.
    check_outputs({"FILE": source}, {"--out": out, "--out's sidecar": out.with_name(out.name + ".json")})
    blob = read_reference(source)
    kind, preset, record = infer_preset(blob, opts or ImportOptions(), source)
    state, filled = map_weights(blob["model_weights"], kind, preset, source)
    epoch = blob.get("epoch")
    summary = {
        "source": str(source), "source_sha256": file_sha256(source), "kind": kind, "preset": preset.to_dict(),
        **record,
        # the reference saves an int; anything else (a nested list that str() recurses into) is not an epoch
        "source_epoch": str(epoch)[:40] if isinstance(epoch, (int, float, str)) else None,
        "mask_branch": (f"not in the source (a classifier file); {len(filled)} tensors filled with zeros: "
                        "classification never reads them, segmentation output from it is meaningless")
                       if filled else "from the source",
        "ignored": sorted(_short(k) for k in blob if k not in ("model_weights", "anchor_generator")),
        "unknown_entries": sorted(_short(k) for k in blob if k not in TOP_LEVEL),
    }
    save_checkpoint(out, kind=kind, preset=preset, model=state, config={"import_reference": summary})
    return {**summary, "out": str(out), "lesion_classes": list(MASK_TYPES[preset.mask_type])}
