"""Running ctmask past one process: batch inference on Ray Data (:mod:`ctmask.scale.ray_batch`),
a served endpoint on Ray Serve (:mod:`ctmask.scale.serve`) and a Triton Inference Server model
repository (:mod:`ctmask.scale.triton_write`, checked by :mod:`ctmask.scale.triton_check`).
Ray and tritonclient are optional: ``pip install 'ctmask[ray]'`` / ``'ctmask[triton]'``."""
