"""What an evaluation hook hands to :class:`~lightning_qsec.callbacks.SecurityReport`.

An evaluation hook is any callback with a ``report_section() -> ReportSection | None``
method. The report writes ``section.data`` into ``report.json`` under
``sections[section.name]``, renders ``section.tables`` into ``report.md`` and draws
``section.plots`` as PNG files. Hooks never touch matplotlib or the file system.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Table", "Plot", "ReportSection", "EvaluationHook"]


@dataclass(frozen=True)
class Table:
    """A table for ``report.md``.

    Attributes:
        title: heading shown above the table.
        columns: column names.
        rows: one list of cells per row (numbers are formatted by the writer).
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Plot:
    """A plot drawn by the report writer into ``dirpath/filename``.

    Attributes:
        filename: PNG file name, e.g. ``"accuracy_vs_bit_width.png"``.
        title: figure title.
        xlabel: x-axis label.
        ylabel: y-axis label.
        series: series name -> list of ``(x, y)`` points. For ``kind="bar"`` the x
            values are category labels and each series is one bar per category.
        kind: ``"line"`` or ``"bar"``.
        hlines: optional horizontal reference lines, name -> y (e.g. the float accuracy).
    """

    filename: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[Any, float]]]
    kind: Literal["line", "bar"] = "line"
    hlines: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportSection:
    """One hook's part of the security report.

    Attributes:
        name: unique key in ``report.json``'s ``sections`` (e.g. ``"precision_sweep"``).
        title: heading in ``report.md``.
        data: JSON-serialisable results.
        tables: tables for ``report.md``.
        plots: plots to draw.
        notes: free-text lines for ``report.md`` (settings, caveats).
    """

    name: str
    title: str
    data: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class EvaluationHook(Protocol):
    """A callback whose results go into the security report."""

    def report_section(self) -> ReportSection | None:
        """The hook's latest results, or ``None`` if it has measured nothing yet."""
        ...
