"""Detector perturbations for training S to keep its decision under reduced precision.

S reads the detector's ranked RoIs, and a relative change of 1e-3 in any detector layer
(what FP16 storage does; INT8 does about ten times more) reorders near-tied rows and
changes which proposals survive NMS: with an S trained on exact FP32 RoIs, that flipped
1-2% of the class calls (measured, see docs/precision.md). Training S also
on RoIs from a perturbed detector teaches it to rely on what survives such noise.

The perturbation multiplies the output of every convolution and linear layer of the
detector by ``1 + scale * e``, ``e ~ N(0, 1)`` per element, from a seeded generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ctmask.core.errors import ConfigError


def check_scales(scales: tuple[float, ...]) -> tuple[float, ...]:
    """Validate perturbation scales (each finite, 0 < s <= 0.1)."""
    out = tuple(float(s) for s in scales)
    for s in out:
        if not 0.0 < s <= 0.1:
            raise ConfigError(f"perturbation scale must be in (0, 0.1], got {s!r}",
                              hint="relative noise per layer output, e.g. 1e-3 (FP16-like) or 1e-2 (INT8-like)")
    return out


@contextlib.contextmanager
def perturbed(module: nn.Module, scale: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, every Conv2d / Linear output of ``module`` gets relative noise ``scale``.

    Args:
        module: the detector part to perturb (``model.ranker``).
        scale: relative noise standard deviation; 0 leaves the module exact.
        generator: CPU generator the noise is drawn from (seeded by the caller).
    """
    if scale <= 0:
        yield
        return

    def hook(_mod: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)
        return output * (1.0 + scale * noise)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
