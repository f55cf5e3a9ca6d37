"""Atomic writes: to a temporary file in the same folder, flushed to disk, then renamed over the
destination, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dfquant.errors import FileFormatError


def replace_atomic(path: Path, write: Callable[[str], object], what: str = "") -> None:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which is
    synced, given the permissions a plain ``open()`` would give (not ``mkstemp``'s 0600) and renamed over
    ``path``; the folder is synced too, so the rename survives a crash. On any failure (disk full included) no
    file, complete or partial, is left behind and ``path`` keeps its old content.

    Args:
        path: the destination; its folder must exist.
        write: writes the whole content to the file name it is given.
        what: a word for messages (``"checkpoint "`` gives "cannot write checkpoint '...'").

    Raises:
        FileFormatError: the folder is missing or the write fails.
    """
    if not path.parent.is_dir():
        raise FileFormatError(f"cannot write {what}'{path}': folder '{path.parent}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise FileFormatError(f"cannot write {what}'{path}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable; not every platform can open a folder
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`replace_atomic`).

    Raises:
        FileFormatError: the folder is missing or the write fails.
    """
    replace_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
