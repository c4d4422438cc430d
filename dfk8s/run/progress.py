"""Run progress read from storage (done markers and checkpoint parts), the same locally or on a cluster."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

from dfk8s.errors import NotFound
from dfk8s.run import layout


@dataclass
class Progress:
    """Rows finished so far (ok + failed) and shards done."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    shards_done: int = 0
    #: What running shards' servings are doing before their rows flow (compiling FLUX, ...), distinct.
    notes: tuple[str, ...] = ()


class ProgressReader:
    """Polls a run's storage; parts and markers are immutable, so each is read once and cached."""

    def __init__(self, storage):
        self.storage = storage
        self._done: dict[int, tuple[int, int]] = {}
        self._parts: dict[str, tuple[int, int]] = {}

    def poll(self) -> Progress:
        """Return the progress now: done markers, then each running shard's live counts or its parts."""
        for key in self.storage.list(layout.OUTPUT_PREFIX):
            index = layout.done_index(key)
            if index is not None and index not in self._done:
                try:
                    stats = self.storage.read_json(key)
                except NotFound:
                    continue
                self._done[index] = (stats["ok"], stats["failed"])
        in_parts: dict[int, list[int]] = {}
        notes: dict[str, None] = {}
        for key in self.storage.list(layout.PARTS_PREFIX):
            index = int(key.split("/")[1])
            if index in self._done:
                continue
            if key not in self._parts:
                try:
                    records = [json.loads(line) for line in self.storage.open_lines(key) if line.strip()]
                except NotFound:
                    continue  # the shard finished and removed its parts meanwhile
                ok = sum(1 for r in records if r.get("ok"))
                self._parts[key] = (ok, len(records) - ok)
            counts = in_parts.setdefault(index, [0, 0])
            counts[0] += self._parts[key][0]
            counts[1] += self._parts[key][1]
        # Live counts (rewritten every few seconds by the worker) run ahead of the checkpoint parts.
        for key in self.storage.list(layout.PROGRESS_PREFIX):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not name[:-5].isdigit() or int(name[:-5]) in self._done:
                continue
            try:
                live = self.storage.read_json(key)
            except (NotFound, ValueError):
                continue
            index = int(name[:-5])
            if isinstance(live.get("note"), str) and live["note"]:
                notes[live["note"]] = None
            counts = in_parts.setdefault(index, [0, 0])
            if live.get("ok", 0) + live.get("failed", 0) >= counts[0] + counts[1]:
                in_parts[index] = [int(live.get("ok", 0)), int(live.get("failed", 0))]
        ok = sum(v[0] for v in self._done.values()) + sum(v[0] for v in in_parts.values())
        failed = sum(v[1] for v in self._done.values()) + sum(v[1] for v in in_parts.values())
        return Progress(rows=ok + failed, ok=ok, failed=failed, shards_done=len(self._done),
                        notes=tuple(notes))

    def done_shards(self) -> set[int]:
        """Indexes of the shards whose done marker has been seen."""
        return set(self._done)


#: Seconds between two plain progress lines where no bar can be drawn (nohup, CI, a log file, a pod).
PLAIN_LINE_SECONDS = 10.0


def progress_facts(done: int, total: int, ok: int, failed: int, rate: float | None,
                   spent: float | None = None, note: str | None = None) -> dict:
    """What a progress report says: rows done of total, ok, failed, rows/s, the ETA, the spend, a note."""
    left = max(0, total - done)
    eta = left / rate if rate and rate > 0 else None
    facts = {"done": done, "total": total, "ok": ok, "failed": failed,
             "rows_per_s": round(rate, 2) if rate is not None else None,
             "eta_seconds": round(eta, 1) if eta is not None else None}
    if spent is not None:
        facts["spent_usd"] = round(spent, 6)
    if note:
        facts["note"] = note
    return facts


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe_facts(facts: dict) -> str:
    """One plain line: ``1,234/5,000 rows (1,200 ok, 34 failed); 41.2 rows/s; ETA 1m32s; spent $0.12``."""
    from dfk8s.cost.pricing import usd

    line = (f"{facts['done']:,}/{facts['total']:,} rows ({facts['ok']:,} ok, {facts['failed']:,} failed); "
            + (f"{facts['rows_per_s']:,.1f} rows/s; ETA {duration(facts.get('eta_seconds'))}"
               if facts.get("rows_per_s") is not None else "rows/s not known yet"))
    if facts.get("spent_usd") is not None:
        line += f"; spent {usd(facts['spent_usd'])}"
    if facts.get("note"):
        line += f"; {facts['note']}"
    return line


def progress_bar(total: int | None, *, enabled: bool = True, description: str = "rows"):
    """A rich progress bar with rows done / failed and rows/s; off when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    console = Console(stderr=True)
    return RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("[red]{task.fields[failed]} failed"),
                        TextColumn("{task.fields[rate]} rows/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not enabled or not console.is_terminal, transient=False)


class _ConsoleHandler(logging.Handler):
    """Log records printed through a live progress bar's console: above the bar, never through it."""

    def __init__(self, console, formatter: logging.Formatter | None):
        super().__init__()
        self.console = console
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging must never break the run
            self.handleError(record)


@contextlib.contextmanager
def logs_above(bar):
    """While ``bar`` is live on a terminal, route the root logger's stderr lines through its console."""
    console = getattr(bar, "console", None)
    if console is None or getattr(bar, "disable", True) or not console.is_terminal:
        yield
        return
    root = logging.getLogger()
    saved = list(root.handlers)
    formatter = saved[0].formatter if saved else None
    root.handlers[:] = [_ConsoleHandler(console, formatter)]
    try:
        yield
    finally:
        root.handlers[:] = saved

