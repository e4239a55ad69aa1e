"""Retries with exponential backoff for the PACS transfers.

A transfer that fails for a reason that may pass (the PACS unreachable, a refused or aborted
association, an HTTP 5xx / 429 answer, a timeout) is tried again after a wait that doubles each
time (``first`` seconds, at most ``longest``), until ``total`` seconds have passed since the
first try. Anything else (a 4xx answer: bad credentials, a study the PACS refuses) fails at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ctmask.core.errors import PacsError

T = TypeVar("T")

RETRIED_HTTP = frozenset({429, 500, 502, 503, 504})
"""HTTP status codes that mean "try again later"."""


class TransientError(PacsError):
    """A PACS failure that may pass (unreachable, 5xx, association refused): worth a retry."""


@dataclass(frozen=True)
class Backoff:
    """How long to keep trying: waits of ``first``, ``2 * first``, ... seconds (at most
    ``longest``) until ``total`` seconds have passed."""

    first: float = 1.0
    longest: float = 30.0
    total: float = 300.0

    def __post_init__(self) -> None:
        if not (self.first > 0 and self.longest >= self.first and self.total >= 0):  # waits() would never end
            raise ValueError(f"Backoff: want 0 < first <= longest and total >= 0, not {self}")

    def waits(self) -> list[float]:
        """The waits between tries, in order (their sum at most ``total``)."""
        out: list[float] = []
        wait, spent = self.first, 0.0
        while spent + wait <= self.total:
            out.append(wait)
            spent += wait
            wait = min(wait * 2, self.longest)
        return out


def with_retries(call: Callable[[], T], backoff: Backoff, on_retry: Callable[[str, float], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried again after each wait of ``backoff`` while it raises
    :class:`TransientError`; the last one is raised when the time is up. Other errors pass at
    once. ``on_retry(reason, wait)`` is told before each wait."""
    waits = backoff.waits()
    for attempt in range(len(waits) + 1):
        try:
            return call()
        except TransientError as exc:
            if attempt == len(waits):
                raise
            if on_retry is not None:
                on_retry(exc.message, waits[attempt])
            sleep(waits[attempt])
    raise AssertionError("unreachable")
