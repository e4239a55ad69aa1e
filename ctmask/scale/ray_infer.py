"""``ctmask infer --ray``: the :class:`~ctmask.runtime.pipeline.Engine` that lists and predicts
the slices on a Ray cluster (:mod:`ctmask.scale.ray_batch`) for
:func:`ctmask.runtime.pipeline.run_infer`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

from ctmask.core.errors import ConfigError
from ctmask.core.spec import GraphSpec
from ctmask.runtime.batch_run import PredictOptions
from ctmask.runtime.pipeline import Item
from ctmask.scale.ray_batch import RayOptions, RayStats
from ctmask.scans.types import Failure, SliceRef


class RayEngine:
    """Listing and decoding in Ray tasks, one runner per actor (:func:`~ctmask.scale.ray_batch.predict_sources_ray`);
    a local cluster for the run unless ``options.address``.

    ``open_runner`` makes a runner in this process (``make_runner(model, backend, device,
    threads)``): a bad backend or device is refused before Ray starts.

    Raises:
        ConfigError: bad Ray options (here, before anything runs).
    """

    def __init__(self, model: Path, options: RayOptions, backend: str, device: str, threads: int | None,
                 open_runner: Callable[[], object]):
        options.check()
        self.model, self.options = model, options
        self.backend, self.device, self.threads = backend, device, threads
        self._open_runner = open_runner
        self.ray_stats = RayStats()

    def start(self, stack: ExitStack, inputs: list[Path], force_modality: bool) -> tuple[GraphSpec, list[SliceRef],
                                                                                          list[Failure]]:
        from ctmask.backends.registry import CHECKPOINT_SUFFIXES, model_spec
        from ctmask.scale.ray_batch import collect_sources_ray, ray_cluster

        if self.model.suffix.lower() in CHECKPOINT_SUFFIXES:
            raise ConfigError(f"{self.model}: --ray runs exported graphs (ONNX, TensorRT engine); export the "
                              "checkpoint with `ctmask export` first")
        spec = model_spec(self.model)
        self._open_runner()  # refuses a bad backend / device before Ray starts
        stack.enter_context(ray_cluster(self.options.address, self.ray_stats))
        refs, failures = collect_sources_ray(inputs, force_modality, self.ray_stats)
        return spec, refs, failures

    def predict(self, refs: list[SliceRef], spec: GraphSpec, options: PredictOptions, overlays: Path | None,
                on_batch: Callable[[int], None]) -> Iterator[Item]:
        from ctmask.scale.ray_batch import predict_sources_ray

        return predict_sources_ray(self.model, spec, refs, self.options, self.ray_stats, options.batch_size,
                                   options.top_rois, on_batch=on_batch, boxes=options.boxes,
                                   uncropped=options.uncropped, overlays=overlays, opts=options.read,
                                   backend=self.backend, device=self.device, threads=self.threads)

    def describe(self) -> dict:
        return dict(self.ray_stats.runner or {"backend": self.backend})

    def stats(self) -> dict | None:
        return self.ray_stats.to_dict()
