"""Which rows a report shows: one streaming pass over result.jsonl, at most ``n`` rows kept in memory.

The rule (issue 12): every failed row first, up to half of ``n`` (more when there are too few ok rows to
fill the rest), then ok rows spread evenly over the input. When there are more failed rows than their
share, the share is split fairly between the error types (a type with few rows shows them all; a shard
that never finished, thousands of ``NotProcessed`` rows, does not crowd out the real errors), and each
type's rows are spread evenly over the run.
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


def error_type(error) -> str:
    """A failed row's error type (``Error`` when the record has none)."""
    return str(error.get("type") or "Error") if isinstance(error, dict) else "Error"


def count_rows(lines: Iterable[bytes]) -> tuple[Counts, Counter]:
    """Count ok and failed rows of result.jsonl, and the failed ones by error type."""
    counts, types = Counts(), Counter()
    for line in lines:
        if not line:
            continue
        row = failed_row(line)
        if row is None:
            counts.ok += 1
        else:
            counts.failed += 1
            types[error_type(row["error"])] += 1
    return counts, types


def count_error_types(lines: Iterable[bytes]) -> Counter:
    """Count errors.jsonl's records (``{"id", "pos", "error", "row"}``) by error type."""
    types = Counter()
    for line in lines:
        if line.strip():
            types[error_type(json.loads(line).get("error"))] += 1
    return types


def type_quotas(type_counts: Counter, k: int) -> dict[str, int]:
    """Split ``k`` sampled failed rows fairly between error types (water-filling: small types take all)."""
    quotas: dict[str, int] = {}
    remaining = k
    ascending = sorted(type_counts, key=lambda t: (type_counts[t], t))
    for i, name in enumerate(ascending):
        quotas[name] = min(type_counts[name], remaining // (len(ascending) - i))
        remaining -= quotas[name]
    for name in reversed(ascending):  # integer rounding: the biggest types take what is left
        extra = min(remaining, type_counts[name] - quotas[name])
        quotas[name] += extra
        remaining -= extra
    return quotas


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


def sample_rows(lines: Iterable[bytes], n: int, counts: Counts, type_counts: Counter | None = None) -> Sample:
    """Choose at most ``n`` rows of ``lines`` (result.jsonl) by the rule above, streaming.

    Args:
        lines: result.jsonl's lines, in order (line ``i`` is input position ``i``).
        n: The most rows to keep.
        counts: The ok and failed rows the file holds (from summary.json or :func:`count_rows`).
        type_counts: The failed rows by error type (errors.jsonl or :func:`count_rows`); None: one type.

    Returns:
        The chosen ``(position, row)`` pairs in input order, the counts seen and the error types.
    """
    want_failed, want_ok = shares(n, counts)
    if not type_counts or sum(type_counts.values()) < want_failed:
        type_counts = None
    quotas = type_quotas(type_counts, want_failed) if type_counts else {}
    chosen = {name: set(even_ranks(type_counts[name], quota)) for name, quota in quotas.items()}
    all_failed = set(even_ranks(counts.failed, want_failed))
    ok_ranks = iter(even_ranks(counts.ok, want_ok))
    next_ok = next(ok_ranks, None)
    out = Sample()
    pos, ok_seen = -1, 0
    for line in lines:  # the hot loop of a 1M-row report: most lines are only searched, never parsed
        if not line:
            continue
        pos += 1
        row = failed_row(line) if b'"error"' in line else None
        if row is not None:
            name = error_type(row["error"])
            rank = out.error_types[name]  # this row's rank among its type's rows
            if rank in chosen[name] if name in chosen else not chosen and out.seen.failed in all_failed:
                out.rows.append((pos, row))
            out.error_types[name] += 1
            out.seen.failed += 1
            continue
        if ok_seen == next_ok:
            out.rows.append((pos, json.loads(line)))
            next_ok = next(ok_ranks, None)
        ok_seen += 1
    out.seen.ok = ok_seen
    return out
