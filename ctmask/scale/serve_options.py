"""The options of ``ctmask serve`` and what is checked before Ray starts: the bearer token
(:data:`TOKEN_ENV` or ``--token-file``, never a command-line value: ``ps`` shows those), the
exposure warning, the flags (:class:`ServeOptions`) and the model, loaded once in the driver
(:func:`check_model`). Nothing here imports Ray."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ctmask.core.errors import ConfigError

TOKEN_ENV = "CTMASK_SERVE_TOKEN"
"""Environment variable holding the bearer token (``--token-file`` names a file instead)."""
MIN_TOKEN_CHARS = 16
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: sent as is in the header


def check_token(token: str, source: str) -> str:
    """The token as sent in ``Authorization: Bearer TOKEN`` (surrounding white space removed).

    Raises:
        ConfigError: empty, shorter than :data:`MIN_TOKEN_CHARS`, or holding characters a bearer
            token cannot carry; naming ``source`` (never the token).
    """
    token = token.strip()
    make = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if not token:
        raise ConfigError(f"{source} is empty: no token to check requests against", hint=make)
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(f"{source} must hold one token of at least {MIN_TOKEN_CHARS} characters among "
                          "A-Z a-z 0-9 . _ ~ + / = - (no spaces)", hint=make)
    return token


def read_token(env: Mapping[str, str], token_file: str | Path | None) -> str | None:
    """The serve token from the environment (:data:`TOKEN_ENV`) or from ``token_file``; ``None``
    when neither is set.

    Raises:
        ConfigError: both set, the file unreadable, not a regular file (a named pipe would wait for
            a writer forever) or larger than 4096 bytes, or a token :func:`check_token` refuses.
    """
    from_env = env.get(TOKEN_ENV)
    if from_env is not None and token_file is not None:
        raise ConfigError(f"a token in both {TOKEN_ENV} and --token-file: set one of them")
    if token_file is not None:
        path = Path(token_file)
        try:  # non-blocking: opening a named pipe without a writer returns at once, and is refused below
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            with open(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
                    raise ConfigError(f"--token-file {path.name} must be a regular file of at most 4096 bytes; it is "
                                      + ("not a regular file (a named pipe, a device or a folder)"
                                         if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes"), path)
                data = fh.read(4097)
        except OSError as exc:
            raise ConfigError(f"cannot read the token file ({exc.strerror or exc.__class__.__name__})", path) from None
        try:
            text = data.decode("ascii") if len(data) <= 4096 else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            raise ConfigError(f"--token-file {path.name} does not hold one token (ASCII, at most 4096 bytes)")
        return check_token(text, f"--token-file {path.name}")
    if from_env is not None:
        return check_token(from_env, TOKEN_ENV)
    return None


def is_loopback(host: str) -> bool:
    """``host`` is this machine only (127.0.0.0/8, ::1, ``localhost``)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.strip().lower() == "localhost"


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token, else ``None``."""
    if token is not None or is_loopback(host):
        return None
    return (f"--host {host} serves BEYOND THIS MACHINE WITHOUT AUTHENTICATION: anyone who reaches "
            f"{host} can run the model and read /metadata and /stats. Set {TOKEN_ENV} or --token-file, and put a "
            "reverse proxy with TLS in front (docs/scale-out/serve.md: Network exposure, tokens and TLS)")


@dataclass(frozen=True)
class ServeOptions:
    """What one server runs (the ``ctmask serve`` flags)."""

    model: str
    port: int = 8000
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    host: str = "127.0.0.1"
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    max_body_mb: float = 64.0
    top_rois: int = 5
    force_modality: bool = False
    hu_offset: float = 1024.0
    uncropped: bool = False
    read_timeout_s: float = 30.0
    token: str | None = field(default=None, repr=False)
    """Bearer token every endpoint but ``/health`` wants (``None``: no authentication)."""

    def check(self) -> None:
        """Refuse bad values (before anything starts).

        Raises:
            ConfigError: naming the option and the accepted range.
        """
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch must be 1..1024, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"--batch-wait-ms must be 0..10000, got {self.batch_wait_ms:g}")
        if not 0 < self.max_body_mb <= 4096:
            raise ConfigError(f"--max-body-mb must be > 0 and at most 4096, got {self.max_body_mb:g}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.top_rois < 1:
            raise ConfigError(f"--top-rois must be >= 1, got {self.top_rois}")
        if not 0 < self.read_timeout_s <= 3600:
            raise ConfigError(f"--read-timeout-s must be > 0 and at most 3600, got {self.read_timeout_s:g}")
        if self.token is not None:
            check_token(self.token, "the serve token")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned by loading the model once (before Ray starts)."""

    file: str
    sha256: str
    spec_metadata: dict
    runner: dict

    def identity(self) -> dict:
        return {"file": self.file, "sha256": self.sha256,
                "weights_sha256": self.spec_metadata.get("ctmask.weights_sha256", ""),
                "checkpoint_sha256": self.spec_metadata.get("ctmask.checkpoint_sha256", "")}


def check_model(opts: ServeOptions) -> ModelInfo:
    """Load the model once in this process: a missing file, a file that is not a ctmask
    graph, a backend that cannot run it or a cropping model fail here, as a
    :class:`~ctmask.core.errors.CtmaskError`, before Ray starts."""
    from ctmask.backends.registry import make_runner
    from ctmask.core.fileio import sha256_file

    path = Path(opts.model)
    if not path.is_file():
        raise ConfigError(f"{path}: model file does not exist" if not path.exists() else
                          f"{path}: not a model file")
    runner = make_runner(path, opts.backend, opts.device, opts.threads)
    with runner:
        spec = runner.spec
        check_crop(spec.crop, opts.uncropped, path)
        described = runner.describe()
    return ModelInfo(path.name, sha256_file(path), spec.metadata(), described)


def check_crop(crop: bool, uncropped: bool, path: Path) -> None:
    """Refuse a model trained on body-cropped slices unless ``uncropped``: an upload carries no crop box."""
    if crop and not uncropped:
        raise ConfigError(f"{path} was trained on slices cropped to their body box (train-cls --crop): an upload "
                          "carries no crop box", hint="serve a model trained on whole slices, or pass --uncropped "
                                                      "to run it on whole slices anyway (off its training "
                                                      "distribution)")
