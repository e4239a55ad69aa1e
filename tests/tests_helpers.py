"""Helpers shared by several test modules."""

from __future__ import annotations

import numpy as np


def ranked_rows(n_images=3, n=16, seed=0, pad=0):
    """Score-descending rows with well-separated scores and random deltas; ``pad`` zero rows."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_images, n, 5), np.float32)
    for i in range(n_images):
        scores = np.sort(rng.uniform(0.05, 0.95, n - pad))[::-1]
        rows[i, : n - pad, 0] = scores
        rows[i, : n - pad, 1:] = rng.normal(0, 1, (n - pad, 4))
    return rows


def write_ct_dicom(path, hu: np.ndarray, slope=1.0, intercept=-1024.0):
    """A minimal single-frame CT DICOM file holding ``hu`` (stored as uint16 + rescale)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "CT"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    stored = np.round((hu - intercept) / slope).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
