"""RoI boxes on the slice: back to its own pixel frame, and drawn as a PNG overlay (torch-free).

The overlays show the slice's lesion detections (:mod:`ctmask.runtime.detections`), not S's
raw ranked rows.

The graph's ``boxes`` output holds each ranked row's decoded box ``(x1, y1, x2, y2)`` in
model-input pixels, ``[0, S]``. The model input is the slice, optionally cropped to its body
box, resized bilinearly to S x S (:func:`ctmask.scans.batch.load_batch`); that resize maps
the crop's full extent ``[xmin, xmax] x [ymin, ymax]`` (pixel edges) onto ``[0, S]``, so a
box goes back by one scale and one shift per axis. Numpy and Pillow only.

Every overlay carries a PNG text chunk :data:`OVERLAY_TAG`, so that overlays written into a
folder that a later run reads are no CT slices to it (:func:`without_overlays`).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ctmask.core.fileio import atomic_path

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (255, 150, 30), (255, 225, 25), (60, 200, 75), (70, 220, 240),
    (40, 110, 255), (240, 50, 230), (170, 110, 255),
)
"""Box colour of rank 1, 2, ... (cycled beyond its length); none of them gray."""

OVERLAY_TAG = "ctmask-overlay"
"""Keyword of the PNG ``tEXt`` chunk (before the pixels) that marks an overlay ctmask drew."""
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rank_colour(rank: int) -> tuple[int, int, int]:
    """The colour of the RoI of ``rank`` (1 = the highest score)."""
    return PALETTE[(rank - 1) % len(PALETTE)]


def top_boxes(outputs: dict[str, np.ndarray], i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` non-padding rows of batch item ``i``: boxes [k', 4] in model-input pixels
    and their scores [k'] (``k' <= k``; rows in rank order, as in ``rois``).

    Raises:
        ValueError: the outputs have no ``boxes`` (a graph of an older format) or their rows
            do not line up with ``rois``.
    """
    if "boxes" not in outputs:
        raise ValueError("the model's outputs have no 'boxes' (a graph of an older ctmask format: re-export it)")
    rois, boxes = np.asarray(outputs["rois"][i]), np.asarray(outputs["boxes"][i])
    if rois.ndim != 2 or boxes.shape != (len(rois), 4):
        raise ValueError(f"boxes {list(boxes.shape)} do not line up with rois {list(rois.shape)}")
    real = rois[:, 0] > 0  # zero rows are padding (they come last)
    return boxes[real][: max(k, 0)].astype(np.float32), rois[real, 0][: max(k, 0)].astype(np.float32)


def boxes_to_source(boxes: np.ndarray, input_size: int, source_shape: tuple[int, int],
                    crop_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Map boxes from model-input pixels back to the source slice's pixel frame.

    Args:
        boxes: float [N, 4] ``(x1, y1, x2, y2)`` in model-input pixels, ``[0, input_size]``.
        input_size: S, the model's input side.
        source_shape: (H, W) of the decoded slice, before any crop.
        crop_box: the body crop (xmin, ymin, xmax, ymax) the slice was cut to before the
            resize, clipped to the slice as :func:`ctmask.core.preprocess.crop_box` does;
            ``None``: the whole slice was resized.

    Returns:
        float32 [N, 4] in source pixels (continuous: pixel edges at integers), clipped to
        ``[0, W] x [0, H]``.

    Raises:
        ValueError: malformed boxes, size or shape, or an empty crop.
    """
    b = np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {list(b.shape)}")
    if not np.isfinite(b).all():
        raise ValueError("boxes hold values that are not finite numbers")
    if input_size <= 0:
        raise ValueError(f"input size must be positive, got {input_size}")
    h, w = (int(v) for v in source_shape)
    if h <= 0 or w <= 0:
        raise ValueError(f"source shape must be positive, got {tuple(source_shape)}")
    x0, y0, x1, y1 = 0, 0, w, h
    if crop_box is not None:
        cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
        x0, y0, x1, y1 = max(0, cx0), max(0, cy0), min(w, cx1), min(h, cy1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"crop box {tuple(crop_box)} is empty for an image of size {w}x{h}")
    scale = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], np.float64) / float(input_size)
    out = b * scale + np.array([x0, y0, x0, y0], np.float64)
    out = np.clip(out, 0.0, np.array([w, h, w, h], np.float64))
    return out.astype(np.float32)


def _to_rgb(pixels: np.ndarray):
    from PIL import Image

    p = np.asarray(pixels, np.float32)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"pixels must be a non-empty [H, W] image, got {list(p.shape)}")
    gray = np.round(np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _pixel_rect(box: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """The pixels a continuous box covers, as Pillow's inclusive rectangle, inside the image."""
    px0 = int(np.clip(np.floor(box[0]), 0, w - 1))
    py0 = int(np.clip(np.floor(box[1]), 0, h - 1))
    px1 = int(np.clip(np.ceil(box[2]) - 1, px0, w - 1))
    py1 = int(np.clip(np.ceil(box[3]) - 1, py0, h - 1))
    return px0, py0, px1, py1


def draw_overlay(pixels: np.ndarray, boxes_src: np.ndarray, scores: np.ndarray, class_name: str,
                 probs: dict[str, float], out: str | Path, names: list[str] | None = None) -> None:
    """Write the slice with its boxes (lesion detections, or RoI rows) as an RGB PNG of the
    slice's own size, atomically.

    The slice is drawn in gray; each box as a rectangle in its rank's colour
    (:func:`rank_colour`) with ``name score`` (``#rank score`` without ``names``) above it
    (inside it at the top edge), rank 1 drawn last (on top); a
    header line at the top left names the slice's class and its probability. Every mark
    lies inside the image. The PNG carries the :data:`OVERLAY_TAG` text chunk.

    Args:
        pixels: float32 [H, W] in [0, 1], the decoded slice (before any crop).
        boxes_src: [k, 4] boxes in the slice's pixel frame (:func:`boxes_to_source`), rank order.
        scores: [k] their scores.
        names: [k] their lesion classes (GGO, consolidation), or None.
        class_name: the slice's predicted class.
        probs: class name -> probability.
        out: PNG file to write.

    Raises:
        ValueError: malformed pixels, boxes or scores.
        OSError: the file cannot be written (nothing is left behind).
    """
    img = render_overlay(pixels, boxes_src, scores, class_name, probs, names)
    from PIL.PngImagePlugin import PngInfo

    tag = PngInfo()
    tag.add_text(OVERLAY_TAG, "drawn by ctmask infer --overlays: not a CT slice")
    with atomic_path(out) as tmp:  # compress_level 1: 3-4x faster than the default 6 for ~20% more bytes
        img.save(tmp, format="PNG", compress_level=1, pnginfo=tag)


def render_overlay(pixels: np.ndarray, boxes_src: np.ndarray, scores: np.ndarray, class_name: str,
                   probs: dict[str, float], names: list[str] | None = None):
    """The picture :func:`draw_overlay` writes, as an RGB Pillow image (same arguments, no file).

    Raises:
        ValueError: malformed pixels, boxes or scores.
    """
    from PIL import ImageDraw, ImageFont

    img = _to_rgb(pixels)
    w, h = img.size
    b = np.asarray(boxes_src, np.float64).reshape(-1, 4) if np.size(boxes_src) else np.zeros((0, 4))
    s = np.asarray(scores, np.float64).reshape(-1)
    if len(s) != len(b) or (names is not None and len(names) != len(b)):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores" + ("" if names is None else f", {len(names)} names"))
    if not (np.isfinite(b).all() and np.isfinite(s).all()):
        raise ValueError("boxes or scores hold values that are not finite numbers")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for rank in range(len(b), 0, -1):  # rank 1 last, on top
        colour = rank_colour(rank)
        x0, y0, x1, y1 = _pixel_rect(b[rank - 1], w, h)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=1)
        label = f"{names[rank - 1] if names is not None else f'#{rank}'} {s[rank - 1]:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        tx = min(max(x0, 0), max(w - tw - 2, 0))
        ty = y0 - th - 3 if y0 - th - 3 >= 0 else min(y0 + 1, max(h - th - 3, 0))  # above, else inside
        draw.rectangle((tx, ty, min(tx + tw + 1, w - 1), min(ty + th + 2, h - 1)), fill=(0, 0, 0))
        draw.text((tx + 1 - tx0, ty + 1 - ty0), label, fill=colour, font=font)
    p = probs.get(class_name, max(probs.values(), default=float("nan")))
    header = f"{class_name} {p:.1%}"
    hx0, hy0, hx1, hy1 = draw.textbbox((0, 0), header, font=font)
    draw.rectangle((0, 0, min(hx1 - hx0 + 3, w - 1), min(hy1 - hy0 + 3, h - 1)), fill=(0, 0, 0))
    draw.text((2 - hx0, 2 - hy0), header, fill=(255, 255, 255), font=font)
    return img


def is_overlay(path: str | Path) -> bool:
    """True for a PNG that :func:`draw_overlay` wrote: its :data:`OVERLAY_TAG` text chunk, looked
    for among the chunks before the pixels (only their headers are read). Never raises."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return False
            keyword = OVERLAY_TAG.encode("latin-1") + b"\0"
            for _ in range(256):  # chunks before IDAT: a handful in any PNG
                head = fh.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND"):
                    return False
                if kind == b"tEXt" and length >= len(keyword):
                    if fh.read(len(keyword)) == keyword:
                        return True
                    fh.seek(length - len(keyword) + 4, 1)
                else:
                    fh.seek(length + 4, 1)  # the data and its CRC
    except OSError:
        return False
    return False


def without_overlays(refs: list) -> tuple[list, list]:
    """``refs`` (:class:`~ctmask.scans.types.SliceRef`) less the overlays ctmask drew
    (:func:`is_overlay`; only single-slice files without a DICOM UID are looked at): ``(kept,
    overlays)``."""
    kept, overlays = [], []
    for ref in refs:
        (overlays if ref.frame is None and not ref.uid and is_overlay(ref.path) else kept).append(ref)
    return kept, overlays


def shown_detections(pred, top: int) -> list[dict]:
    """The lesion detections a reader is shown for a slice: its ``top`` highest-scored
    (:mod:`ctmask.runtime.detections`; none for a record without them)."""
    return list(pred.detections or [])[: max(top, 0)]


def write_overlay(folder: str | Path, pred, decoded, top: int = 5) -> tuple[str | None, str | None]:
    """Draw one predicted slice's overlay PNG into ``folder`` (named after its label, plus a hash
    of its key so two slices never share a name): its ``top`` lesion detections
    (:func:`shown_detections`), or its top RoI rows for a prediction without detections.

    Returns:
        ``(path, None)``, or ``(None, reason)`` when it could not be written: a failure to draw
        is reported, never fatal (the prediction stands).
    """
    import hashlib
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", (pred.label or pred.key or pred.file))[-80:].strip("_") or "slice"
    key = (pred.key or pred.file).encode("utf-8", errors="surrogateescape")
    out = Path(folder) / f"{stem}.{hashlib.sha1(key).hexdigest()[:8]}.png"
    try:
        if pred.detections is not None:
            shown = shown_detections(pred, top)
            draw_overlay(decoded.pixels, np.asarray([d["box"] for d in shown], np.float32).reshape(-1, 4),
                         np.asarray([d["score"] for d in shown], np.float32), pred.class_name, pred.probs, out,
                         names=[d["lesion"] for d in shown])
        else:
            scores = [row[0] for row in pred.rois]
            draw_overlay(decoded.pixels, np.asarray(pred.boxes or [], np.float32).reshape(-1, 4),
                         np.asarray(scores[: len(pred.boxes or [])], np.float32), pred.class_name, pred.probs, out)
    except (OSError, ValueError) as exc:
        return None, (f"overlay not written ({exc.__class__.__name__}: {exc}); the prediction is in the output")
    return str(out), None
