"""Shard sizing: how many rows a shard gets, from the work's size and the serving's estimated rate."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from dfk8s.inputs.manifest import count_rows

#: Rows per shard when the work cannot be sized (no row count): the old fixed default.
DEFAULT_ROWS_PER_SHARD = 1000
#: Shards each worker (or pod) should get, so a slow or lost one holds up little and resume is fine-grained.
SHARDS_PER_WORKER = 4
#: Least work in a shard, in seconds, per executor: a local worker pays a checkpoint and a ramp-down per
#: shard; a pod pays its scheduling and start-up (image pull, imports, a model load), so it should run
#: for minutes.
MIN_SHARD_SECONDS = {"local": 10.0, "kubernetes": 300.0}
#: Most rows in a shard (a worker holds its shard's rows in memory).
MAX_ROWS_PER_SHARD = 50_000


@dataclass(frozen=True)
class ShardSize:
    """How a run is split by default, and why.

    Attributes:
        rows_per_shard: The size chosen.
        shards: The resulting shard count.
        seconds_per_shard: Expected time of one shard at the serving's estimated rate.
        rows_per_second: The rate one worker (or pod) is expected to keep.
        rule: The rule, in words, for --help-like messages and the dry-run plan.
    """

    rows_per_shard: int
    shards: int
    seconds_per_shard: float
    rows_per_second: float
    rule: str


def default_shard_size(rows: int, serving: str, options: dict, workers: int,
                       executor: str = "local") -> ShardSize:
    """Size shards for the work: about SHARDS_PER_WORKER per worker, none shorter than the executor's floor.

    A worker's rate is ``concurrency / latency`` rows/s (the serving's registered latency estimate and
    ``--max-concurrency``; one row per ``latency`` on a GPU), capped by its share of ``--rpm``. The size is
    ``rows / (SHARDS_PER_WORKER x workers)``, raised to at least ``MIN_SHARD_SECONDS[executor]`` of work,
    and at most ``MAX_ROWS_PER_SHARD``. Locally the floor never leaves a started worker without a shard;
    on Kubernetes it does: a small run takes fewer pods rather than pods that live for seconds.
    """
    from dfk8s.servings import serving_info

    info = serving_info(serving)
    workers = max(1, workers)
    merged = {**info.defaults, **{k: v for k, v in options.items() if v is not None}}
    rate = 1.0 / info.latency if info.gpu else info.concurrency(merged) / info.latency
    if merged.get("rpm"):
        rate = min(rate, float(merged["rpm"]) / 60.0 / workers)
    floor = math.ceil(MIN_SHARD_SECONDS.get(executor, MIN_SHARD_SECONDS["local"]) * rate)
    size = max(math.ceil(rows / (SHARDS_PER_WORKER * workers)), floor)
    if executor != "kubernetes":
        size = min(size, math.ceil(rows / workers))
    size = max(1, min(size, rows, MAX_ROWS_PER_SHARD))
    shards = math.ceil(rows / size) if rows else 0
    rule = (f"about {SHARDS_PER_WORKER} shards per {'pod' if executor == 'kubernetes' else 'worker'}, none "
            f"under ~{MIN_SHARD_SECONDS.get(executor, 10.0):g} s of work at ~{rate:,.1f} rows/s each "
            f"({serving}: ~{info.latency:g} s per {'row' if info.gpu else 'request'}"
            + ("" if info.gpu else f", {info.concurrency(merged)} in flight")
            + f"), at most {MAX_ROWS_PER_SHARD:,}")
    return ShardSize(size, shards, size / rate if rate else 0.0, rate, rule)


def estimate_rows(source: str, *, endpoint_url: str | None = None) -> int:
    """The manifest's row count: newlines for a local JSONL file (fast, no parsing), else a counting pass."""
    if "://" not in source and os.path.isfile(source):
        with open(source, "rb") as f:
            head = f.read(1 << 16)
            if not head.lstrip().startswith(b"["):  # JSONL: one row per non-empty line
                count, last = head.count(b"\n"), head[-1:] if head else b""
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
                return count + (last not in (b"", b"\n"))
    return count_rows(source, endpoint_url=endpoint_url)
