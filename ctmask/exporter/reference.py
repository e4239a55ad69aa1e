"""The PyTorch reference as a runner: a classifier checkpoint run eagerly, numpy in and out.

It computes exactly what the exported graph computes (:class:`GraphModule`), so parity
checks and benchmarks compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctmask.core.fileio import sha256_file
from ctmask.core.spec import INPUT, OUTPUTS, GraphSpec
from ctmask.exporter.onnx_export import GraphModule
from ctmask.runtime.runner import Runner
from ctmask.training.checkpoint import load_checkpoint
from ctmask.training.evaluate import load_classifier


class TorchRunner(Runner):
    """PyTorch eager backend for a classifier checkpoint.

    Args:
        checkpoint: classifier checkpoint.
        device: "cpu" or "cuda".
        threads: intra-op threads on the CPU (default: torch's own choice).
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", threads: int | None = None):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.threads = threads
        self.name = f"torch-{device}"
        self.module: GraphModule | None = None

    def activate_impl(self) -> GraphSpec:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "cuda" and not torch.cuda.is_available():
            from ctmask.core.errors import ConfigError

            raise ConfigError("torch-cuda requested but torch sees no CUDA device")
        ck = load_checkpoint(self.checkpoint, kind="classifier")
        self.module = GraphModule(load_classifier(ck)).to(self.device).eval()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return GraphSpec.for_preset(ck.preset, checkpoint_sha256=sha256_file(self.checkpoint),
                                    checkpoint_name=str(self.checkpoint.resolve()))

    @torch.inference_mode()
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(feed[INPUT]).to(self.device)
        values = self.module(images)
        return {name: v.float().cpu().numpy() for name, v in zip(OUTPUTS, values)}

    @torch.inference_mode()
    def classify(self, rois: np.ndarray) -> dict[str, np.ndarray]:
        """S alone on given ranked RoIs [b, N, 5] -> {"logits", "probs"} [b, 3]."""
        logits = self.module.model.classifier(torch.from_numpy(rois).to(self.device))
        return {"logits": logits.float().cpu().numpy(), "probs": torch.softmax(logits, -1).float().cpu().numpy()}

    def deactivate_impl(self) -> None:
        self.module = None

    def memory_report(self) -> dict:
        if self.device == "cuda":
            return {"peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
        return {}

    def describe(self) -> dict:
        return {"backend": self.name, "checkpoint": str(self.checkpoint), "threads": torch.get_num_threads(),
                "torch": torch.__version__}
