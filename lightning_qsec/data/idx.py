"""Reading and writing IDX files (the MNIST / Fashion-MNIST format), gzipped or plain."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from lightning_qsec.report.atomic import write_bytes_atomic

__all__ = ["read_idx", "write_idx"]

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path} is not a valid gzip file: {err}") from err
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or plain (detected from its content).

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        The array, with the file's shape and its element type in native byte order
        (``uint8`` for the MNIST family).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file does not start with a valid IDX magic number
            (two zero bytes, a known type code, a dimension count) or its size
            does not match its header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'}; expected "
            f"00 00, a type code in {[hex(c) for c in _IDX_DTYPES]} and a dimension count"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype.name} ({expected} bytes in all) "
            f"but the file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file.

    Args:
        path: destination file.
        array: array of ``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or ``float64``.
        compress: gzip the file; by default, when ``path`` ends with ``.gz``.

    Returns:
        The path written.

    Raises:
        ValueError: if the array's element type has no IDX type code.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str[1:]: code for code, dt in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in codes:
        raise ValueError(
            f"array has dtype {array.dtype}, which IDX has no type for; allowed: uint8, int8, int16, int32, "
            "float32, float64"
        )
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    payload = gzip.compress(header + body) if compress else header + body
    return write_bytes_atomic(path, payload)
