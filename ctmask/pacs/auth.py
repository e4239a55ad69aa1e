"""PACS credentials and the HTTP session that carries them.

Credentials come from the environment or from a file, never from the command line (``ps`` and
the shell history show those):

* :data:`TOKEN_ENV` (a bearer token), or :data:`USER_ENV` and :data:`PASSWORD_ENV` (HTTP basic);
* ``--credentials FILE``: a JSON object ``{"token": "..."}`` or ``{"username": "...", "password":
  "..."}``; a file that others can read is refused (``chmod 600`` it).

TLS certificates are verified by default (the system's CA store, or ``--ca-bundle FILE`` for a
hospital's own CA); there is no switch to turn verification off.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctmask.core.errors import ConfigError

if TYPE_CHECKING:
    import requests

TOKEN_ENV = "CTMASK_PACS_TOKEN"
USER_ENV = "CTMASK_PACS_USER"
PASSWORD_ENV = "CTMASK_PACS_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (``username`` and ``password``) or bearer (``token``) credentials; all None:
    none."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def kind(self) -> str:
        return "bearer" if self.token else "basic" if self.username else "none"

    def __repr__(self) -> str:  # never print a secret
        return f"Credentials({self.kind}{', user ' + self.username if self.username else ''})"


def read_credentials(env: Mapping[str, str], path: str | Path | None) -> Credentials:
    """The credentials from ``path`` (a JSON file) or else from ``env``; both set: an error.

    Raises:
        ConfigError: credentials in both places, a password without a user (or the reverse), a
            file that is unreadable, not the JSON described above, or readable by others.
    """
    from_env = Credentials(env.get(USER_ENV) or None, env.get(PASSWORD_ENV) or None, env.get(TOKEN_ENV) or None)
    if path is None:
        return _checked(from_env, f"{USER_ENV} / {PASSWORD_ENV} / {TOKEN_ENV}")
    if from_env.kind != "none" or from_env.password:
        raise ConfigError(f"PACS credentials in both the environment ({USER_ENV} / {TOKEN_ENV}) and --credentials "
                          f"{path}: set one of them")
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 10:  # /dev/zero, a FIFO: never read whole
            raise ConfigError("not a credentials file: want a regular file of at most 64 KiB", path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):  # before reading it
            raise ConfigError("the credentials file is readable by other users", path, hint=f"chmod 600 {path}")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file: {exc.strerror or exc}", path) from None
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not set(obj) <= {"username", "password", "token"} or not all(
            isinstance(v, str) for v in obj.values()):
        raise ConfigError('not a credentials file: want a JSON object {"token": "..."} or {"username": "...", '
                          '"password": "..."}', path)
    return _checked(Credentials(obj.get("username") or None, obj.get("password") or None, obj.get("token") or None),
                    str(path))


def _checked(c: Credentials, where: str) -> Credentials:
    if c.token and (c.username or c.password):
        raise ConfigError(f"{where}: a token and a user / password: give one kind of credentials")
    if bool(c.username) != bool(c.password):
        raise ConfigError(f"{where}: a user without a password, or a password without a user")
    return c


def http_session(credentials: Credentials, ca_bundle: str | Path | None = None) -> requests.Session:
    """A ``requests`` session that sends ``credentials`` and verifies TLS certificates (against
    ``ca_bundle`` when given, else the system's CA store)."""
    import requests

    class Session(requests.Session):
        """requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override ``session.verify``:
        the CA bundle given here wins over them (without one they apply, verification on)."""

        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if ca_bundle is not None:
                settings["verify"] = os.fspath(ca_bundle)
            return settings

    session = Session()
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise ConfigError("no such CA bundle file", ca_bundle)
        session.verify = os.fspath(ca_bundle)
    else:
        session.verify = True
    if credentials.token:
        session.headers["Authorization"] = f"Bearer {credentials.token}"
    elif credentials.username and credentials.password:
        session.auth = (credentials.username, credentials.password)
    return session
