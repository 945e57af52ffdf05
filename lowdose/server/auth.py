"""The server's access token: where it comes from, how it is stored, how a request's token is checked.

One shared bearer token guards every route. It comes from ``LOWDOSE_TOKEN``, from ``--token-file``, or,
when neither is given, from a random token the server makes on first start and keeps (mode 0600) in its
state folder. The token itself is never logged or printed, except by ``lowdose serve --show-token``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from ..errors import LowdoseError

TOKEN_ENV = "LOWDOSE_TOKEN"
TOKEN_FILE_ENV = "LOWDOSE_TOKEN_FILE"  # set by `lowdose serve` for the server process it starts
NO_AUTH_ENV = "LOWDOSE_NO_AUTH"
TOKEN_FILE_NAME = "server-token"
MIN_TOKEN_CHARS = 16  # a shorter shared secret can be guessed over a hospital network


@dataclasses.dataclass(frozen=True)
class ServerToken:
    """The token a server requires and where it came from (``source`` is safe to print; ``value`` is not)."""

    value: str
    source: str  # "LOWDOSE_TOKEN", or the token file's path
    created: bool = False  # made just now (first start)

    def __repr__(self) -> str:  # never show the secret in a log or a traceback
        return f"ServerToken(source={self.source!r}, created={self.created})"

    def matches(self, given: str | None) -> bool:
        """Whether ``given`` is the token, in time independent of where they differ (digests compared)."""
        if not given:
            return False
        return hmac.compare_digest(
            hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
            hashlib.sha256(self.value.encode()).digest(),
        )


def state_dir(base: Mapping[str, str] | None = None) -> Path:
    """The server's state folder: ``$XDG_STATE_HOME/lowdose`` (default ``~/.local/state/lowdose``)."""
    env = os.environ if base is None else base
    root = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(root).expanduser() / "lowdose"


def resolve_token(
    token_file: str | os.PathLike | None = None,
    state_folder: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerToken:
    """The token the server will require: ``LOWDOSE_TOKEN``, else ``token_file``, else the state folder's file
    (made with a new random token, mode 0600, when it does not exist)."""
    environ = os.environ if env is None else env
    if environ.get(TOKEN_ENV):
        return ServerToken(_checked(environ[TOKEN_ENV], TOKEN_ENV), TOKEN_ENV)
    if token_file:
        return read_token_file(Path(token_file).expanduser())
    path = Path(state_folder).expanduser() if state_folder else state_dir(environ)
    path = path / TOKEN_FILE_NAME
    if path.exists():
        return read_token_file(path)
    return create_token_file(path)


def read_token_file(path: Path) -> ServerToken:
    """The token in ``path`` (its first line); refused when others than its owner may read it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LowdoseError(f"{path}: cannot read the token file ({exc.strerror or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LowdoseError(
            f"{path}: the token file may be read by other users (mode {stat.S_IMODE(mode):o}); "
            f"make it private with: chmod 600 {path}"
        )
    lines = text.strip().splitlines()
    return ServerToken(_checked(lines[0].strip() if lines else "", str(path)), str(path))


def create_token_file(path: Path) -> ServerToken:
    """Make ``path`` holding a new random token, readable by its owner only (never world-readable, even briefly)."""
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another server made it first: use theirs
        return read_token_file(path)
    except OSError as exc:
        raise LowdoseError(
            f"{path}: cannot create the token file ({exc.strerror or exc}); give one with "
            f"--token-file or {TOKEN_ENV}"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return ServerToken(token, str(path), created=True)


def _checked(token: str, source: str) -> str:
    token = token.strip()
    # Printable ASCII: an HTTP header cannot carry other characters reliably.
    if (
        len(token) < MIN_TOKEN_CHARS
        or not token.isascii()
        or any(c.isspace() for c in token)
        or not token.isprintable()
    ):
        raise LowdoseError(
            f"{source}: the access token must be at least {MIN_TOKEN_CHARS} printable ASCII "
            "characters without spaces (make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def server_token_from_environment() -> ServerToken | None:
    """The token of a running server (None when authentication is off), as `lowdose serve` handed it over."""
    if os.environ.get(NO_AUTH_ENV) == "1":
        return None
    return resolve_token(token_file=os.environ.get(TOKEN_FILE_ENV) or None)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (None for any other form)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None
