"""What a file is: the one sniffer of ctmask, and the suffixes each reader takes.

:func:`magic` reads what a file's first bytes say for sure (the DICOM Part 10 marker, the PNG
and JPEG signatures; ``ctmask serve`` names an upload by it); :func:`sniff` tells which reader
takes a file on disk (the ``DICM`` marker, else its suffix); :func:`is_raster` asks Pillow,
header only, whether a file without a telling suffix is a raster image.
"""

from __future__ import annotations

from pathlib import Path

from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from ctmask.scans.capture import captured

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Suffixes read with Pillow."""

DICOM_SUFFIXES = (".dcm", ".dicom")
"""Suffixes read with pydicom (so are files with the ``DICM`` marker, and PACS files without a suffix)."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
"""Suffixes read with nibabel."""

IMAGE_SUFFIXES = (*RASTER_SUFFIXES, *DICOM_SUFFIXES)
"""Suffixes of single-slice files (raster images and DICOM)."""

RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB")
"""Pillow formats tried on a raster image (no other decoder sees untrusted bytes)."""
_PLUGINS = (BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin)  # registers them

NOT_AN_IMAGE = "not an image (" + " ".join(RASTER_SUFFIXES) + "), DICOM or NIfTI file"
"""The reason a file no reader takes is refused."""

HEAD_BYTES = 132
"""What :func:`magic` needs of a file: the DICOM preamble (128 bytes) and its ``DICM`` marker."""


def magic(head: bytes) -> str:
    """What a file's first bytes (``head``, :data:`HEAD_BYTES` of them or fewer) say it is for sure:
    ``dicom`` (the ``DICM`` marker after the preamble), ``png``, ``jpeg``, else ``""`` (weaker
    signatures, TIFF's and BMP's, are left to the decoders, which check them by decoding the
    header)."""
    if len(head) >= HEAD_BYTES and head[128:HEAD_BYTES] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return ""


def sniff(path: Path) -> str:
    """``dicom`` (DICM marker or DICOM suffix), ``nifti``, ``image``, ``maybe-dicom`` (no suffix or
    a numeric one, as PACS exports name files) or ``""``. Raises OSError when unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    if magic(head) == "dicom":
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix == "" or suffix[1:].isdigit():
        return "maybe-dicom"
    return ""


def is_raster(path: Path) -> bool:
    """True when Pillow identifies ``path`` as one of :data:`RASTER_FORMATS` (header only)."""
    try:
        with captured([]), Image.open(path, formats=RASTER_FORMATS):
            return True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return True  # a raster image declaring too many pixels (the warning is an error here): decoding says so
    except Exception:
        return False
