"""The ``report.json`` document: schema version, metadata and one entry per section.

Layout (``SCHEMA_VERSION = 1``)::

    {
      "schema_version": 1,
      "lightning_qsec_version": "0.1.0",
      "created": "2024-01-01T12:00:00+00:00",     # UTC, ISO-8601
      "metadata": {"stage": "fit", "epochs_completed": 1, "global_step": 10, "model": "Net",
                   "quantization": {"weight_bit_width": 4, ...}},
      "sections": {"<section.name>": <section.data>, ...}
    }

Everything returned by :func:`build_report` is plain JSON data: tuples become lists,
numpy/torch values are converted with ``tolist()``, and non-finite floats
(NaN, +-inf) become ``None`` (``null``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from typing import Any

from lightning_qsec.report.section import ReportSection

__all__ = [
    "SCHEMA_VERSION",
    "build_report",
    "merge_section",
    "package_version",
    "to_jsonable",
    "validate_sections",
]

SCHEMA_VERSION = 1
"""Version of the ``report.json`` layout; bumped on incompatible changes."""

_PLOT_KINDS = ("line", "bar")


def package_version() -> str:
    """The installed ``lightning-qsec`` version, or ``"unknown"`` if not installed."""
    try:
        return importlib_metadata.version("lightning-qsec")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _json_key(key: Any, where: str) -> str:
    """Convert a mapping key the way :func:`json.dumps` would, or raise."""
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, numbers.Integral):
        return str(int(key))
    if isinstance(key, numbers.Real):
        return repr(float(key))
    raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a valid JSON key")


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Convert ``obj`` into plain JSON data.

    Args:
        obj: nested mappings / sequences of scalars, numpy or torch values.
        where: location used in error messages, e.g. ``"sections['sweep']"``.

    Returns:
        A structure of ``dict``/``list``/``str``/``int``/``float``/``bool``/``None``
        with non-finite floats replaced by ``None``.

    Raises:
        TypeError: ``obj`` contains a value that has no JSON representation; the
            message names its location and type.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {
            _json_key(key, where): to_jsonable(value, f"{where}[{key!r}]")
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(item, f"{where}[{index}]") for index, item in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):  # numpy arrays / scalars, torch tensors
        return to_jsonable(tolist(), where)
    raise TypeError(
        f"{where}: object {obj!r} of type {type(obj).__name__} is not JSON-serialisable"
    )


def _check_plot_filename(filename: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``filename`` is a bare ``*.png`` file name."""
    if not isinstance(filename, str):
        raise ValueError(f"{where}: plot filename {filename!r} must be a string")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in filename for sep in separators):
        raise ValueError(f"{where}: plot filename {filename!r} must not contain a path separator")
    if not filename.endswith(".png") or filename == ".png":
        raise ValueError(f"{where}: plot filename {filename!r} must end with '.png'")
    if "\x00" in filename:
        raise ValueError(f"{where}: plot filename {filename!r} must not contain NUL")


def validate_sections(sections: Sequence[ReportSection]) -> None:
    """Minimal schema checks before anything is written.

    Checks that every item is a :class:`ReportSection` with a non-empty, unique
    name and a mapping as ``data``; that every table row has one cell per column;
    and that plot file names are unique bare ``*.png`` names with a known ``kind``.

    Args:
        sections: the sections of one report, in hook order.

    Raises:
        TypeError: an item is not a ``ReportSection`` or its ``data`` is not a mapping.
        ValueError: a name, table or plot is invalid; the message names it.
    """
    names: set[str] = set()
    filenames: dict[str, str] = {}
    for index, section in enumerate(sections):
        if not isinstance(section, ReportSection):
            raise TypeError(
                f"sections[{index}]: expected ReportSection, got {type(section).__name__}"
            )
        name = section.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"sections[{index}]: section name {name!r} must be a non-empty string")
        if name in names:
            raise ValueError(f"duplicate section name {name!r}")
        names.add(name)
        where = f"section {name!r}"
        if not isinstance(section.data, Mapping):
            raise TypeError(f"{where}: data must be a mapping, got {type(section.data).__name__}")
        for table in section.tables:
            for row_index, row in enumerate(table.rows):
                if len(row) != len(table.columns):
                    raise ValueError(
                        f"{where}, table {table.title!r}: row {row_index} has {len(row)} cells "
                        f"but there are {len(table.columns)} columns"
                    )
        for plot in section.plots:
            _check_plot_filename(plot.filename, where)
            if plot.filename in filenames:
                raise ValueError(
                    f"{where}: plot filename {plot.filename!r} already used by "
                    f"section {filenames[plot.filename]!r}"
                )
            filenames[plot.filename] = name
            if plot.kind not in _PLOT_KINDS:
                raise ValueError(
                    f"{where}: plot {plot.filename!r} has kind {plot.kind!r}, "
                    f"expected one of {_PLOT_KINDS}"
                )


def merge_section(sections: dict[str, Any], section: ReportSection) -> None:
    """Add ``section.data`` (as JSON data) to a report's ``sections`` mapping in place.

    Later hooks add sections after earlier ones; a name is never overwritten.

    Args:
        sections: the report's ``sections`` mapping.
        section: the section to add.

    Raises:
        ValueError: ``sections`` already holds ``section.name``.
        TypeError: ``section.data`` is not JSON-serialisable.
    """
    if section.name in sections:
        raise ValueError(f"duplicate section name {section.name!r}")
    sections[section.name] = to_jsonable(section.data, f"sections[{section.name!r}]")


def build_report(
    sections: Iterable[ReportSection], *, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Build the ``report.json`` document.

    Args:
        sections: sections in hook order (validated with :func:`validate_sections`).
        metadata: run information such as stage, epoch, global step, model class.

    Returns:
        A JSON-ready dict with keys ``schema_version``, ``lightning_qsec_version``,
        ``created``, ``metadata`` and ``sections``.

    Raises:
        ValueError: invalid or duplicate sections.
        TypeError: data or metadata that is not JSON-serialisable.
    """
    section_list = list(sections)
    validate_sections(section_list)
    merged: dict[str, Any] = {}
    for section in section_list:
        merge_section(merged, section)
    return {
        "schema_version": SCHEMA_VERSION,
        "lightning_qsec_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": to_jsonable(dict(metadata or {}), "metadata"),
        "sections": merged,
    }
