"""Calibration for INT8: slice sets read like inference input, range collection, ranges files.

- :mod:`~ctmask.calibration.slices`: which slices calibrate (a folder, a COVIDx-CT split
  file or a ``ctmask synth`` folder), class-balanced where labels exist, decoded by the
  runtime's own pre-processing;
- :mod:`~ctmask.calibration.collect`: activation ranges from onnxruntime's calibrators
  (minmax, entropy, percentile);
- :mod:`~ctmask.calibration.ranges`: the ranges file (JSON), tied to the graph it was made
  for by that graph's sha256, and reused by every INT8 flavour.

No torch here: calibration runs the exported FP32 graph in onnxruntime.
"""
