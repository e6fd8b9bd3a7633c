"""Atomic file writes: readers see either the old file or the complete new one.

The data goes to a temporary file in the target's directory (same file system),
is flushed and ``fsync``-ed, and then moved over the target with :func:`os.replace`.
If anything fails before the replace, including a chunk iterator that raises
midway through serialisation, the temporary file is removed and the old target
is left untouched.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["replace_atomic", "write_bytes_atomic", "write_text_atomic"]


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


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    umask = os.umask(0o022)  # pragma: no cover - elsewhere only os.umask reads it (briefly set)
    os.umask(umask)  # pragma: no cover
    return umask  # pragma: no cover


def replace_atomic(temporary: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move a complete temporary file over ``path``: fsync it, give it the mode a new file
    would get (``0o666`` less the umask) or the mode of the file it replaces, rename, fsync
    the directory. The temporary file must be in ``path``'s directory."""
    temporary, target = Path(temporary), Path(path)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
    os.chmod(temporary, mode)  # mkstemp creates 0o600, which other users and containers cannot read
    os.replace(temporary, target)
    _fsync_dir(target.parent)
    return target


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
        replace_atomic(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
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
