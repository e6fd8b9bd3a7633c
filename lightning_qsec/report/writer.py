"""Write a security report directory: ``report.json``, ``report.md`` and plot PNGs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_qsec.report.atomic import write_bytes_atomic
from lightning_qsec.report.markdown import render_markdown
from lightning_qsec.report.plots import draw_plot
from lightning_qsec.report.schema import build_report
from lightning_qsec.report.section import ReportSection

__all__ = ["REPORT_JSON", "REPORT_MD", "dumps_report", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def dumps_report(report: Mapping[str, Any]) -> str:
    """Serialise a report document (``indent=2``, strict JSON, trailing newline).

    Args:
        report: the output of :func:`~lightning_qsec.report.schema.build_report`.

    Returns:
        The JSON text.

    Raises:
        ValueError: ``report`` still holds a non-finite float.
        TypeError: ``report`` holds a non-serialisable object.
    """
    return json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def write_report(
    dirpath: str | os.PathLike[str],
    sections: Iterable[ReportSection],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report for ``sections`` into ``dirpath``.

    Everything is validated, serialised, rendered and drawn in memory first, so an
    invalid section raises before any file is touched. Then each plot PNG, then
    ``report.md`` and finally ``report.json`` are written atomically (the directory
    is created if needed). Non-finite floats become ``null`` in ``report.json``.

    Args:
        dirpath: output directory.
        sections: sections in hook order.
        metadata: run information (stage, epoch, global step, model class, ...).

    Returns:
        The path of ``report.json``.

    Raises:
        ValueError: duplicate section names or invalid plot file names / tables
            (the message names the offending value).
        TypeError: section data or metadata that is not JSON-serialisable.
    """
    section_list = list(sections)
    report = build_report(section_list, metadata=metadata)
    json_bytes = dumps_report(report).encode("utf-8")  # encoded here: nothing is written if this fails
    markdown_bytes = render_markdown(report, section_list).encode("utf-8")
    images = {
        plot.filename: draw_plot(plot) for section in section_list for plot in section.plots
    }

    directory = Path(dirpath)
    directory.mkdir(parents=True, exist_ok=True)
    for filename, png in images.items():
        write_bytes_atomic(directory / filename, png)
    write_bytes_atomic(directory / REPORT_MD, markdown_bytes)
    return write_bytes_atomic(directory / REPORT_JSON, json_bytes)
