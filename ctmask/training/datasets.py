"""Torch data sets over the on-disk formats, with the same pre-processing as the runtime."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch
from torch.utils.data import Dataset

from ctmask.core.preprocess import resize, resize_mask
from ctmask.data.cncb import SegSample, lesion_label_map, mask_to_instances, read_mask
from ctmask.data.covidx import SplitEntry
from ctmask.scans.batch import load_slice
from ctmask.scans.decode import read_slice

DEFAULT_CACHE_BYTES = 256 * 2**20
"""Default budget of decoded images a :class:`ClassificationDataset` keeps (256 MiB)."""


class TensorCache:
    """Least-recently-used cache of tensors, bounded by their total size in bytes.

    Args:
        max_bytes: budget; 0 disables caching. An item larger than the budget is not kept.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor of ``key`` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Keep ``value`` under ``key``, evicting the least recently used to fit the budget."""
        size = value.element_size() * value.nelement()
        if key in self._items:
            old = self._items.pop(key)
            self.nbytes -= old.element_size() * old.nelement()
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.element_size() * old.nelement()
        self._items[key] = value
        self.nbytes += size


def instance_targets(mask: np.ndarray, size: int) -> dict[str, torch.Tensor]:
    """CNCB mask [H, W] (values 0..3) -> Mask R-CNN targets at ``size`` x ``size``.

    Instances are found at the original resolution (connected components > 100 px), then
    each instance mask is resized with nearest neighbour and its box recomputed from the
    resized mask; instances that vanish in the resize are dropped.

    Returns:
        ``boxes`` float32 [K, 4] (x1, y1, x2, y2 pixels, x2/y2 exclusive), ``labels`` int64
        [K] in {1 GGO, 2 consolidation}, ``masks`` uint8 [K, size, size].
    """
    _, labels, masks = mask_to_instances(mask)
    out_boxes, out_labels, out_masks = [], [], []
    for lab, m in zip(labels, masks):
        r = resize_mask(m, size)
        ys, xs = np.nonzero(r)
        if len(xs) == 0:
            continue
        out_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        out_labels.append(int(lab))
        out_masks.append(r)
    return {
        "boxes": torch.tensor(np.asarray(out_boxes, dtype=np.float32).reshape(-1, 4)),
        "labels": torch.tensor(out_labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.asarray(out_masks, dtype=np.uint8).reshape(-1, size, size)),
    }


def select_mask_type(target: dict[str, torch.Tensor], mask_type: str) -> dict[str, torch.Tensor]:
    """Targets of :func:`instance_targets` (labels 1 GGO, 2 consolidation) for a preset's mask type.

    ``both`` keeps them; ``merge`` relabels consolidation as 1 (one lesion class); ``ggo`` drops the
    consolidation instances (the reference's ``mask_type`` choices).
    """
    if mask_type == "both":
        return target
    if mask_type == "merge":
        return {**target, "labels": torch.ones_like(target["labels"])}
    keep = target["labels"] == 1
    return {k: v[keep] for k, v in target.items()}


def select_mask_type_map(label_map: np.ndarray, mask_type: str) -> np.ndarray:
    """A lesion label map (0 bg, 1 GGO, 2 consolidation) for a preset's mask type, as :func:`select_mask_type`."""
    if mask_type == "both":
        return label_map
    return np.where(label_map == 2, 1 if mask_type == "merge" else 0, label_map).astype(label_map.dtype)


def hflip_targets(target: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Mirror targets left-right in a ``size``-wide image."""
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = size - target["boxes"][:, [2, 0]]
    return {"boxes": boxes, "labels": target["labels"], "masks": target["masks"].flip(-1)}


class SegmentationDataset(Dataset):
    """CNCB-layout slices with instance targets.

    Items: ``(image float32 [1, S, S] in [0, 1], target dict)``; decoded samples are cached
    in memory (a small preset set of a few thousand slices fits easily).

    Args:
        samples: from :func:`ctmask.data.cncb.list_segmentation`.
        size: model input side.
        hflip: mirror each item with probability 0.5 (torch's global RNG).
        mask_type: the preset's mask type (:func:`select_mask_type`).
    """

    def __init__(self, samples: list[SegSample], size: int, hflip: bool = False, mask_type: str = "both"):
        self.samples = samples
        self.mask_type = mask_type
        self.size = size
        self.hflip = hflip
        self._cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._label_maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decoded image [1, S, S] and instance targets of sample ``i`` (cached)."""
        if i not in self._cache:
            s = self.samples[i]
            img = read_slice(s.image).pixels
            mask = read_mask(s.mask, expected_shape=img.shape)
            image = torch.from_numpy(resize(img, self.size))[None]
            self._cache[i] = (image, select_mask_type(instance_targets(mask, self.size), self.mask_type))
            # The full lesion map, small components included (instances drop those).
            self._label_maps[i] = select_mask_type_map(resize_mask(lesion_label_map(mask), self.size), self.mask_type)
        return self._cache[i]

    def label_map(self, i: int) -> np.ndarray:
        """Lesion label map uint8 [S, S] of sample ``i``: 0 bg, 1 GGO, 2 consolidation (as the mask type selects)."""
        self.load(i)
        return self._label_maps[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.load(i)
        if self.hflip and bool(torch.rand(()) < 0.5):
            return image.flip(-1), hflip_targets(target, self.size)
        return image, target


class ClassificationDataset(Dataset):
    """COVIDx-CT split entries -> ``(image float32 [1, S, S], label int)``.

    Decoded images are kept in a least-recently-used cache of at most ``cache_bytes``
    (a real split does not fit in memory: COVIDx CT-2A's training split is ~140 GiB of
    float32 at 512 px). Pass 0 when every image is read once (evaluation, or the
    ``heads`` variant, whose ranked RoIs are cached instead).

    Args:
        entries: from :func:`ctmask.data.covidx.read_split`.
        size: model input side.
        crop: crop each slice to its split-file body box before resizing.
        cache_bytes: budget of the decoded-image cache; 0 disables it.
    """

    def __init__(
        self, entries: list[SplitEntry], size: int, crop: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES
    ):
        self.entries = entries
        self.size = size
        self.crop = crop
        self.cache = TensorCache(cache_bytes)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.cache.get(i)
        if image is None:
            e = self.entries[i]
            image = torch.from_numpy(load_slice(e.path, self.size, e.box if self.crop else None))[None]
            self.cache.put(i, image)
        return image, self.entries[i].label


def collate_detection(batch):
    """Stack images [B, 1, S, S]; keep targets as a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def collate_classification(batch):
    """Stack images [B, 1, S, S] and labels int64 [B]."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)
