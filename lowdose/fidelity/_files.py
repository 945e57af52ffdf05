"""Atomic output: write to a temporary file beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import CTOutputError


def _default_mode() -> int:
    """The permissions a plain ``open()`` would give (0o666 less the umask); mkstemp gives 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` is left as it was; OS errors become
    ``CTOutputError`` naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CTOutputError(path, f"could not be written ({exc.strerror or exc})") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise CTOutputError(path, f"could not be written ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # SimpleITK reports write failures as RuntimeError
        _remove_quietly(tmp)
        raise CTOutputError(path, f"could not be written ({str(exc).strip().splitlines()[0]})") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
