"""The HTTP client helpers ``ctmask serve``'s driver, its load test and the tests share
(stdlib only: nothing here imports Ray)."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

from ctmask.core.errors import ServerError


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """Wait until ``GET url/health`` answers 200.

    Raises:
        ServerError: it did not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        time.sleep(0.2)
    raise ServerError(f"the server at {url} did not answer /health within {timeout_s:g} s (last: {last})")


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer`` with the token ``ctmask serve`` reads (``CTMASK_SERVE_TOKEN``),
    when it is set: a server started with a token answers 401 to requests without it."""
    token = os.environ.get("CTMASK_SERVE_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def get_json(url: str, timeout_s: float = 30.0) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers()), timeout=timeout_s) as r:
        return json.loads(r.read())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (bound once and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
