"""Render a report as GitHub-flavoured markdown (``report.md``)."""

from __future__ import annotations

import math
import numbers
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_qsec.report.section import ReportSection, Table

__all__ = ["format_cell", "format_interval", "render_markdown", "render_table"]

REPORT_TITLE = "Quantization security report"


def _escape(text: str) -> str:
    """Make ``text`` safe inside a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def format_cell(value: Any) -> str:
    """Format one value for markdown.

    Floats get 4 significant digits (``0.98765 -> 0.9877``, ``12345.6 -> 1.235e+04``);
    integers are shown in full; ``None`` becomes an empty cell. Values are shown as
    given: fractions are not turned into percentages.

    Args:
        value: a table cell or metadata value.

    Returns:
        The cell text (not yet escaped).
    """
    if value is None:
        return ""
    if isinstance(value, (str, bool)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return f"{number:.4g}"
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return format_cell(item())
    return str(value)


def format_interval(entry: Mapping[str, Any] | None, digits: int = 4) -> str:
    """``"0.8123 [0.8011, 0.8240]"`` for ``{"value", "ci_low", "ci_high"}``; ``"-"`` for ``None``.

    The interval is left out when it is missing or not finite; a non-finite value reads ``nan``.
    """
    if entry is None:
        return "-"
    point, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")  # None: NaN read back from JSON
    value = f"{point:.{digits}f}" if point is not None and math.isfinite(point) else "nan"
    if any(bound is None or not math.isfinite(bound) for bound in (low, high)):
        return value
    undefined = entry.get("undefined_resamples") or 0
    caveat = f" ({undefined} undefined)" if undefined else ""
    return f"{value} [{low:.{digits}f}, {high:.{digits}f}]{caveat}"


def _inline(text: str) -> str:
    """``text`` on one line, so a newline cannot end a heading, list item or image title."""
    return " ".join(str(text).splitlines())


def _settings(value: Any) -> str:
    """One setting, or ``a=1, b=[2, 3]`` for a callback's settings, on one line (shown as code, so
    globs stay literal)."""
    if isinstance(value, Mapping) and value:
        text = ", ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = "{}" if isinstance(value, Mapping) else "None" if value is None else format_cell(value)
    return _inline(text).replace("`", "'")


def render_table(table: Table) -> str:
    """Render one :class:`Table` as a titled GitHub markdown table.

    Args:
        table: the table.

    Returns:
        Markdown text ending with a newline.
    """
    lines = [f"### {_inline(table.title)}", ""]
    columns = [_escape(str(column)) for column in table.columns]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_escape(format_cell(cell)) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(report: Mapping[str, Any], sections: Sequence[ReportSection]) -> str:
    """Render the whole report.

    Args:
        report: the document from :func:`~lightning_qsec.report.schema.build_report`
            (its version, creation time and metadata are shown).
        sections: the sections, in order; their titles, notes, tables and plots
            (as image links to the PNG files next to ``report.md``) are rendered.

    Returns:
        The markdown text.
    """
    lines: list[str] = [f"# {REPORT_TITLE}", ""]
    lines.append(f"- **lightning-qsec**: {report.get('lightning_qsec_version', 'unknown')}")
    lines.append(f"- **schema version**: {report.get('schema_version', '')}")
    lines.append(f"- **created**: {report.get('created', '')}")
    for key, value in (report.get("metadata") or {}).items():
        if isinstance(value, Mapping):  # quantization settings; one sub-item per hardening callback
            lines.append(f"- **{key}**:")
            lines.extend(f"  - {_inline(name)}: `{_settings(setting)}`" for name, setting in value.items())
        else:
            lines.append(f"- **{key}**: {format_cell(value)}")
    lines.append("")
    if not sections:
        lines.extend(["_No evaluation hook reported any results._", ""])
    for section in sections:
        lines.extend([f"## {_inline(section.title)}", ""])
        if section.notes:
            lines.extend(f"- {_inline(note)}" for note in section.notes)
            lines.append("")
        for table in section.tables:
            lines.append(render_table(table))
        for plot in section.plots:
            # percent-encoded: a space, '#' or '(' in a valid file name would break the link
            alt = _inline(plot.title).replace("[", "(").replace("]", ")")
            lines.extend([f"![{alt}]({urllib.parse.quote(plot.filename)})", ""])
        lines.extend([f"Raw results: `sections.{section.name}` in `report.json`.", ""])
    return "\n".join(lines).rstrip("\n") + "\n"
