"""``dfk8s report``: an HTML page of a run's images, prompts, captions and errors, that works offline.

Public: :func:`write_report` and :class:`ReportResult`. See ``_build`` for where the files go.
"""

from __future__ import annotations

from dfk8s.report._build import (
    DEFAULT_EXPIRES,
    DEFAULT_ROWS,
    REPORT_KEY,
    THUMBS_PREFIX,
    ReportResult,
    write_report,
)
from dfk8s.report._sample import Counts, count_rows, sample_rows, shares

__all__ = [
    "DEFAULT_EXPIRES",
    "DEFAULT_ROWS",
    "REPORT_KEY",
    "THUMBS_PREFIX",
    "ReportResult",
    "write_report",
    "Counts",
    "count_rows",
    "sample_rows",
    "shares",
]
