"""Atomic file writes: readers see either the old file or the complete new one.

The data goes to a temporary file in the target's directory (same file system),
is flushed and ``fsync``-ed, and then moved over the target with :func:`os.replace`.
If anything fails before the replace, including a chunk iterator that raises
midway through serialisation, the temporary file is removed and the old target
is left untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def _fsync_dir(dirpath: Path) -> None:
    """Best-effort ``fsync`` of a directory so the rename itself is durable."""
    if os.name != "posix":  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        fd = os.open(dirpath, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> Path:
    """Atomically write ``data`` to ``path``.

    Args:
        path: target file; its parent directory must exist.
        data: the whole content, or an iterable of chunks (written in order; if the
            iterable raises, nothing is replaced).

    Returns:
        The target path.

    Raises:
        Exception: whatever writing or the chunk iterable raised; the temporary file
            is removed and an existing file at ``path`` is left intact.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                for chunk in data:
                    handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return target


def write_text_atomic(
    path: str | os.PathLike[str], text: str | Iterable[str], *, encoding: str = "utf-8"
) -> Path:
    """Atomically write ``text`` to ``path``.

    Args:
        path: target file; its parent directory must exist.
        text: the whole text, or an iterable of string chunks (e.g.
            ``json.JSONEncoder().iterencode(obj)``); if it raises midway, nothing is
            replaced.
        encoding: text encoding.

    Returns:
        The target path.

    Raises:
        Exception: whatever writing or the chunk iterable raised; the temporary file
            is removed and an existing file at ``path`` is left intact.
    """
    if isinstance(text, str):
        return write_bytes_atomic(path, text.encode(encoding))
    return write_bytes_atomic(path, (chunk.encode(encoding) for chunk in text))
