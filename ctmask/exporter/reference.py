"""The PyTorch reference as a runner: a classifier checkpoint run eagerly, numpy in and out.

It computes exactly what the exported graph computes (:class:`GraphModule`), so parity
checks and benchmarks compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctmask.core.errors import ConfigError
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
        candidates: K > 0 also returns ``candidates`` [B, N + K, 5], the module's ranking of
            N + K candidates (its first N rows are ``rois``, which S reads), and their decoded
            boxes ``candidate_boxes`` [B, N + K, 4] (the first N are ``boxes``), for parity.
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", threads: int | None = None,
                 candidates: int = 0):
        super().__init__()
        self.candidates = candidates
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.threads = threads
        self.name = f"torch-{device}"
        self.module: GraphModule | None = None

    def activate_impl(self) -> GraphSpec:
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("torch-cuda requested but torch sees no CUDA device")
        ck = load_checkpoint(self.checkpoint, kind="classifier")
        self.module = GraphModule(load_classifier(ck)).to(self.device).eval()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return GraphSpec.for_preset(ck.preset, preprocessing=ck.preprocessing, weights_sha256=ck.weights_sha256,
                                    checkpoint_name=str(self.checkpoint.resolve()))

    @torch.inference_mode()
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(feed[INPUT]).to(self.device)
        if not self.candidates:
            return {name: v.float().cpu().numpy() for name, v in zip(OUTPUTS, self.module(images))}
        model = self.module.model
        ranked, located, labels = model.ranker(images, model.preset.n_rois + self.candidates, with_boxes=True,
                                               with_labels=True)
        rois = ranked[:, : model.preset.n_rois]
        logits = model.classifier(rois)
        values = {"rois": rois, "logits": logits, "probs": torch.softmax(logits, -1),
                  "boxes": located[:, : model.preset.n_rois], "labels": labels[:, : model.preset.n_rois],
                  "candidates": ranked, "candidate_boxes": located, "candidate_labels": labels}
        return {name: v.float().cpu().numpy() for name, v in values.items()}

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


def reference_checkpoint(spec: GraphSpec, checkpoint: Path | None) -> tuple[Path | None, str]:
    """The checkpoint to run as the reference of a graph: ``checkpoint`` if given, else the
    one named in the graph's metadata if it is still there and unchanged (else a reason)."""
    if checkpoint is not None:
        return checkpoint, ""
    named = Path(spec.checkpoint_name) if spec.checkpoint_name else None
    if named is None or not named.is_file():
        return None, "no checkpoint: pass --checkpoint (the one named in the model's metadata is not here)"
    if sha256_file(named) != spec.checkpoint_sha256:
        return None, f"{named} changed since export (sha256 differs): pass --checkpoint"
    return named, ""
