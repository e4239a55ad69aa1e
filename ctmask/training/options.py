"""Checks shared by the training and evaluation entry points (library-level, not only CLI)."""

from __future__ import annotations

from pathlib import Path

from ctmask.core.errors import ConfigError


def require_at_least(name: str, value: int | None, minimum: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``value`` (an integer option) is >= ``minimum``.

    ``None`` means "not given" and passes.
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_adam(lr: float, weight_decay: float) -> None:
    """Raise :class:`ConfigError` unless ``lr`` > 0 and ``weight_decay`` >= 0 (both finite)."""
    if not (0.0 < float(lr) < float("inf")):
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    if not (0.0 <= float(weight_decay) < float("inf")):
        raise ConfigError(f"weight decay must be a finite number >= 0, got {weight_decay!r}")


def require_more_epochs(checkpoint: str | Path, done: int, asked: int) -> None:
    """Raise :class:`ConfigError` when resuming ``checkpoint`` would train no epoch.

    Args:
        checkpoint: the checkpoint being resumed (named in the message).
        done: epochs it has completed.
        asked: total epochs requested (``--epochs``).
    """
    if asked <= done:
        raise ConfigError(
            f"checkpoint has already been trained for {done} epochs and --epochs {asked} asks for "
            f"{asked} in total, so there is nothing to train",
            checkpoint,
            hint=f"--epochs is the total, not the number of extra epochs: pass --epochs {done + 1} or more",
        )


def set_adam_hyperparameters(optimizer, lr: float, weight_decay: float) -> None:
    """Apply ``lr`` / ``weight_decay`` to every parameter group (after loading a saved state).

    ``Optimizer.load_state_dict`` restores the saved groups' settings; a resumed run must
    use the ones it was asked for (and records in its config).
    """
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
        group["weight_decay"] = float(weight_decay)
