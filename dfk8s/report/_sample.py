"""Which rows a report shows: one streaming pass over result.jsonl, at most ``n`` rows kept in memory.

The rule (issue 12): every failed row first, up to half of ``n`` (more when there are too few ok rows to
fill the rest), then ok rows spread evenly over the input. When there are more failed rows than their
share, those shown are spread evenly over the failed rows too, so every part of the run is represented.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Counts:
    """Rows in result.jsonl: ``ok`` finished, ``failed`` carry an error (NotProcessed included)."""

    ok: int = 0
    failed: int = 0

    @property
    def rows(self) -> int:
        """All rows."""
        return self.ok + self.failed


@dataclass
class Sample:
    """The rows chosen, in input order, and what the pass saw on the way."""

    rows: list[tuple[int, dict]] = field(default_factory=list)
    seen: Counts = field(default_factory=Counts)
    error_types: Counter = field(default_factory=Counter)


def failed_row(line: bytes) -> dict | None:
    """Return the parsed row if this result line is a failed row, else None (without parsing most lines).

    A finished row never has a top-level ``error`` key (the worker drops it), and inside a JSON string a
    quote is escaped, so the bytes ``"error"`` appear only as a key or as a whole string value: only such
    lines are parsed.
    """
    if b'"error"' not in line:
        return None
    row = json.loads(line)
    return row if isinstance(row, dict) and "error" in row else None


def count_rows(lines: Iterable[bytes]) -> Counts:
    """Count ok and failed rows (used when summary.json does not say)."""
    counts = Counts()
    for line in lines:
        if not line.strip():
            continue
        if failed_row(line) is None:
            counts.ok += 1
        else:
            counts.failed += 1
    return counts


def shares(n: int, counts: Counts) -> tuple[int, int]:
    """How many failed and ok rows a sample of at most ``n`` rows takes.

    Returns:
        ``(failed, ok)``: failed rows take up to half of ``n``, or more when ok rows cannot fill the rest.
    """
    n = max(0, min(n, counts.rows))
    failed = min(counts.failed, max(n // 2, n - counts.ok))
    return failed, min(counts.ok, n - failed)


def even_ranks(total: int, k: int) -> list[int]:
    """``k`` distinct ranks in ``range(total)`` spread evenly, the first one included."""
    k = min(k, total)
    if k <= 0:
        return []
    return [j * total // k for j in range(k)]


def sample_rows(lines: Iterable[bytes], n: int, counts: Counts) -> Sample:
    """Choose at most ``n`` rows of ``lines`` (result.jsonl) by the rule above, streaming.

    Args:
        lines: result.jsonl's lines, in order (line ``i`` is input position ``i``).
        n: The most rows to keep.
        counts: The ok and failed rows the file holds (from summary.json or :func:`count_rows`).

    Returns:
        The chosen ``(position, row)`` pairs in input order, the counts seen and the error types.
    """
    want_failed, want_ok = shares(n, counts)
    failed_ranks = iter(even_ranks(counts.failed, want_failed))
    ok_ranks = iter(even_ranks(counts.ok, want_ok))
    next_failed, next_ok = next(failed_ranks, None), next(ok_ranks, None)
    out = Sample()
    pos = -1
    for line in lines:
        if not line.strip():
            continue
        pos += 1
        row = failed_row(line)
        if row is not None:
            error = row["error"]
            out.error_types[str(error.get("type") or "Error") if isinstance(error, dict) else "Error"] += 1
            if out.seen.failed == next_failed:
                out.rows.append((pos, row))
                next_failed = next(failed_ranks, None)
            out.seen.failed += 1
        else:
            if out.seen.ok == next_ok:
                out.rows.append((pos, json.loads(line)))
                next_ok = next(ok_ranks, None)
            out.seen.ok += 1
    return out
