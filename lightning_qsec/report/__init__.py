"""Security report: what evaluation hooks return and how it is written to disk.

Hooks return :class:`ReportSection` objects; :func:`write_report` turns them into
``report.json`` (schema :data:`SCHEMA_VERSION`), ``report.md`` and PNG plots.
"""

from __future__ import annotations

from lightning_qsec.report.atomic import write_bytes_atomic, write_text_atomic
from lightning_qsec.report.schema import SCHEMA_VERSION, build_report
from lightning_qsec.report.section import EvaluationHook, Plot, ReportSection, Table
from lightning_qsec.report.writer import write_report

__all__ = [
    "SCHEMA_VERSION",
    "EvaluationHook",
    "Plot",
    "ReportSection",
    "Table",
    "build_report",
    "write_bytes_atomic",
    "write_report",
    "write_text_atomic",
]
