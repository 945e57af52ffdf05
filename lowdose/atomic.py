"""Atomic output: write to a temporary file beside the target, then rename it into place.

Used for every file lowdose writes, so that a reader never sees half a file and outputs get the
permissions a plain ``open()`` would give them (``tempfile`` alone would leave them 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import CTOutputError


def default_mode(directory: bool = False) -> int:
    """The permissions ``open()`` (0o666) or ``mkdir()`` (0o777) would give less the umask; mkstemp and
    mkdtemp give 0o600 and 0o700."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


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
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise CTOutputError(path, f"could not be written ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # SimpleITK reports write failures as RuntimeError
        remove_quietly(tmp)
        raise CTOutputError(path, f"could not be written ({str(exc).strip().splitlines()[0]})") from None
    except BaseException:
        remove_quietly(tmp)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomically(path, text.encode())
