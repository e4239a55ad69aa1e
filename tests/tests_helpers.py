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


def assert_rois_match(actual, expected, score_atol=1e-4, delta_atol=1e-3, delta_rtol=1e-3):
    """Ranked RoIs [B, N, 5] agree in all five columns (score, dx, dy, dw, dh).

    Rows are compared in order, except that rows whose scores are within ``score_atol``
    of each other may come out in either order: each reference row is matched to a free
    row of the same score (within ``score_atol``) whose deltas are within
    ``delta_atol + delta_rtol * |delta|``. A reference row that ties with the lowest kept
    score of a full output may be missing (the other side kept another candidate of that
    score). Padding rows must be all zeros on both sides, equally many.
    """
    a_all, e_all = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a_all.shape == e_all.shape and a_all.ndim == 3 and a_all.shape[-1] == 5, (a_all.shape, e_all.shape)
    np.testing.assert_allclose(np.sort(a_all[..., 0], 1), np.sort(e_all[..., 0], 1), rtol=0, atol=score_atol)
    for i, (a, e) in enumerate(zip(a_all, e_all)):
        for side in (a, e):
            assert not side[side[:, 0] == 0].any(), f"image {i}: a padding row is not all zeros"
            assert (np.diff(side[:, 0]) <= 0).all(), f"image {i}: rows are not ranked by score"
        free = a[:, 0] > 0
        cut = e[:, 0].min()
        for j in np.flatnonzero(e[:, 0] > 0):
            cand = np.flatnonzero(free & (np.abs(a[:, 0] - e[j, 0]) <= score_atol))
            if len(cand):
                err = (np.abs(a[cand, 1:] - e[j, 1:]) - delta_rtol * np.abs(e[j, 1:])).max(1)
                if err.min() <= delta_atol:
                    free[cand[err.argmin()]] = False
                    continue
            assert cut > 0 and e[j, 0] - cut <= score_atol, (
                f"image {i}, reference row {j} {e[j].tolist()} has no partner in the output "
                f"(nearest score rows: {a[np.argsort(np.abs(a[:, 0] - e[j, 0]))[:3]].tolist()})")


def invoke(*args):
    """Run the ``ctmask`` CLI in-process with ``args`` (paths and numbers as strings)."""
    from typer.testing import CliRunner

    from ctmask.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])
