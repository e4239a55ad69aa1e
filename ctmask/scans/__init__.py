"""The readers of scan files: what ``ctmask infer``, training, calibration, parity and Serve read.

Floor 2 of the package (above ``core``, which it alone imports): files and folders are listed
and probed into slices (:mod:`~ctmask.scans.listing`, types in :mod:`~ctmask.scans.types`),
one slice is decoded by the one entry point :func:`ctmask.scans.decode.read_slice` (per file
type: :mod:`~ctmask.scans.dicom`, :mod:`~ctmask.scans.nifti`, :mod:`~ctmask.scans.raster`; what a
file is: :mod:`~ctmask.scans.sniff`), and a batch of model inputs is made by the one batch
loader :func:`ctmask.scans.batch.load_batch`. Untrusted bytes are checked against
:mod:`ctmask.core.limits` before a decoder sees them (:mod:`~ctmask.scans.bounded`).
"""
