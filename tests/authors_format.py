"""Checkpoint files in the authors' format (COVID-CT-Mask-Net's reference implementation), written
from ctmask models, for the tests of ``import-reference``.

The reference's scripts ``torch.save`` (torch 1.1: the legacy non-zip format) a dict with
``model_weights`` in torchvision 0.3 names and ``anchor_generator``, a pickled ``nn.Module`` of a
class in their module ``models.mask_net.rpn`` (``rpn_segmentation`` for segmentation). The key
renaming below is written from the reference code, independently of ctmask's own mapping; the
anchor class lives in a throwaway module registered under the authors' name only while saving.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from ctmask.training.model import CovidCTMaskNet

_S = {"0": "fc_scores", "2": "fc_scores_2", "4": "fc_scores_img"}


def authors_key(key: str) -> str:
    """ctmask's key -> torchvision 0.3's / the reference's (``S2Predictor`` as ``s2new``)."""
    key = re.sub(r"^detector\.", "", key)
    key = re.sub(r"^classifier\.net\.(\d)\.", lambda m: f"s2new.{_S[m.group(1)]}.", key)
    key = re.sub(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"backbone.fpn.\1_blocks.\2.", key)
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    return re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.",
                  key)


REFERENCE_SOURCE = ["class AnchorGenerator(nn.Module):\n", '    """\n',
                    "    Module that generates anchors for a set of feature maps and\n", "    image sizes.\n"]
"""The start of the reference's ``AnchorGenerator`` source, as the legacy format records it."""


class _Torch11Backend:
    """torch 1.1's ``nn.Module._backend`` (``THNNFunctionBackend``), pickled as torch 1.1 pickles it."""

    def __reduce__(self):
        from torch.nn.backends.thnn import _get_thnn_function_backend

        return _get_thnn_function_backend, ()


def _anchor_module(name: str) -> type:
    """A module registered as ``name`` holding an nn.Module ``AnchorGenerator`` shaped like the reference's."""

    class AnchorGenerator(torch.nn.Module):
        def __init__(self, sizes, aspect_ratios):
            super().__init__()
            self._backend = _Torch11Backend()  # every torch 1.1 nn.Module held it
            self.sizes, self.aspect_ratios = sizes, aspect_ratios
            self.cell_anchors = [torch.tensor([[-1.0, -1.0, 1.0, 1.0]])]  # set after a forward, as in use
            self._cache = {(torch.Size([32, 32]), (16.0, 16.0)): [torch.zeros(3, 4)]}

    mod = types.ModuleType(name)
    AnchorGenerator.__module__ = name
    AnchorGenerator.__qualname__ = "AnchorGenerator"
    mod.AnchorGenerator = AnchorGenerator  # type: ignore[attr-defined]
    return AnchorGenerator


def write_authors_file(path: Path, model: CovidCTMaskNet, kind: str, legacy: bool = True) -> None:
    """``model`` as the reference's ``train_segmentation.py`` / ``train_classifier.py`` save it
    (``legacy=False``: the same in torch's zip format, as a re-save with a newer torch writes it)."""
    state = model.state_dict_for_checkpoint()
    if kind == "segmentation":
        state = {k: v for k, v in state.items() if k.startswith("detector.")}
    else:  # the reference's classifier is a Faster R-CNN: no mask branch
        state = {k: v for k, v in state.items() if ".roi_heads.mask_" not in k}
    weights = {authors_key(k): v.clone() for k, v in state.items()}
    blob = {"epoch": "100", "model_name": None, "model_weights": weights, "lrate": 1e-5,
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}
    save_authors_blob(path, blob, kind, tuple([(2, 4, 8, 16, 32)] * 5), tuple([(0.1, 0.25, 0.5, 1, 1.5, 2)] * 5),
                      legacy)


def save_authors_blob(path: Path, blob: dict, kind: str, sizes: object, aspect_ratios: object,
                      legacy: bool = True) -> None:
    """``blob`` with ``anchor_generator`` an object of the authors' class holding ``sizes`` and
    ``aspect_ratios`` (whatever they are), saved as the reference does."""
    name = "models.mask_net." + ("rpn_segmentation" if kind == "segmentation" else "rpn")
    cls = _anchor_module(name)
    saved = {m: sys.modules.get(m) for m in ("models", "models.mask_net", name)}
    sys.modules.update({"models": types.ModuleType("models"), "models.mask_net": types.ModuleType("models.mask_net"),
                        name: sys.modules.get(name) or types.ModuleType(name)})
    sys.modules[name].AnchorGenerator = cls  # type: ignore[attr-defined]
    source = torch.serialization.get_source_lines_and_file
    # torch 1.1 recorded the class's source with the file (the reference's rpn.py), as torch does for a
    # class whose source it finds; this throwaway class's source is the reference's first lines.
    torch.serialization.get_source_lines_and_file = (  # type: ignore[assignment]
        lambda obj, *a: (REFERENCE_SOURCE, 11, f"/home/authors/COVID-CT-Mask-Net/{name.replace('.', '/')}.py")
        if obj is cls else source(obj, *a))
    try:
        blob = {**blob, "anchor_generator": cls(sizes, aspect_ratios)}
        torch.save(blob, path, _use_new_zipfile_serialization=not legacy)
    finally:
        torch.serialization.get_source_lines_and_file = source
        for m, v in saved.items():  # the import must not find the authors' module
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v


def write_crafted_legacy(path: Path, obj: object, numel: dict[int, int] | None = None,
                         unlisted: tuple[int, ...] = (), module_record: object = None) -> None:
    """``obj`` in torch's legacy format, written here record by record so that a test can lie in it:
    ``numel`` maps a storage's ``data_ptr()`` to the element count its record declares, ``unlisted``
    storages are left out of the storage list (and their bytes out of the file), and
    ``module_record`` (when given) is what every ``nn.Module`` class's record names instead."""
    import io
    import pickle
    import struct

    numel, storages = numel or {}, {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o: object) -> tuple | None:
            if isinstance(o, type) and issubclass(o, torch.nn.Module):
                return ("module", o if module_record is None else module_record, None, None)
            if isinstance(o, torch.storage.TypedStorage):
                key = str(o._untyped_storage._cdata)
                storages.setdefault(key, o)
                return ("storage", getattr(torch, o._pickle_storage_type()), key, "cpu",
                        numel.get(o._untyped_storage.data_ptr(), o._size()), None)
            return None

    out = io.BytesIO()
    for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                   {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, out, protocol=2)
    Pickler(out, protocol=2).dump(obj)
    listed = [k for k, s in storages.items() if s._untyped_storage.data_ptr() not in unlisted]
    pickle.dump(listed, out, protocol=2)
    for k in listed:
        out.write(struct.pack("<q", storages[k]._size()) + bytes(storages[k]._untyped_storage))
    path.write_bytes(out.getvalue())
