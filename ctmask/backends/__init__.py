"""The backend registry (:mod:`ctmask.backends.registry`): the one place that makes a runner
for a model, used by infer, bench, Ray, Serve and parity (:mod:`ctmask.backends.parity`).

Floor: above the runtime, calibration, training and the exporter (it makes their runners),
below ``scale`` and ``cli``.
"""
