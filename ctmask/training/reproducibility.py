"""Reproducible training: one seed drives every random stream, kernels are deterministic.

Same seed, same data, same machine (CPU instruction set, torch build, thread count) ->
bit-identical checkpoints. Across machines or thread counts, floating-point sums may
differ in the last bits; the ranked RoIs S is fed contain near-tied scores, so such a
difference can swap rows and move the classifier (see docs/benchmarks.md).
The thread count and library versions are therefore recorded in every checkpoint.

Every epoch draws from its own streams, derived from ``(seed, epoch)``: the data order
and the global torch RNG (flips, RPN / RoI sampling) of epoch ``e`` do not depend on how
many epochs ran in this process, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torchvision


def derived_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from ``seed`` and integer ``keys`` (e.g. the epoch)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, *map(int, keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(derived_seed(seed) % 2**32)
    torch.manual_seed(seed)


def start_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    """Reseed the global torch RNG and the data-order ``generator`` for ``epoch`` (0-based)."""
    s = derived_seed(seed, epoch)
    torch.manual_seed(s)
    generator.manual_seed(s)


@contextmanager
def deterministic() -> Iterator[None]:
    """Run the body with ``torch.use_deterministic_algorithms(True)``, then restore.

    An operation without a deterministic implementation raises instead of silently
    varying between runs (on the CPU, torch's kernels used here all have one).
    """
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed for deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn_before


def environment() -> dict:
    """What bit-identical reruns also depend on: versions, thread count, CPU, platform."""
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": True,
    }
