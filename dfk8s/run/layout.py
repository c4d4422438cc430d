"""Every key name of a run on storage, in one place (see DESIGN.md, "Run layout on storage")."""

from __future__ import annotations

import re

RUN_SPEC_KEY = "run.json"
RESULT_KEY = "result.jsonl"
ERRORS_KEY = "errors.jsonl"
SUMMARY_KEY = "summary.json"
#: Written by a worker whose serving's circuit breaker tripped; workers check it before a shard.
BREAKER_KEY = "breaker.json"
INPUT_PREFIX = "input"
PARTS_PREFIX = "parts"
OUTPUT_PREFIX = "output"
IMAGES_PREFIX = "images"
STAGED_PREFIX = "staged"
PROGRESS_PREFIX = "progress"
LEASE_KEY = "lease.json"
#: The run's price table, estimate and budget (``--max-cost``), written at plan time.
COST_KEY = "cost.json"
#: Each shard's spend so far, rewritten at every checkpoint: what other workers check the budget against.
SPEND_PREFIX = "spend"
#: Batch mode: each shard's provider batch id, written before anything else.
BATCHES_PREFIX = "batches"
#: ``dfk8s report``'s page, and the thumbnails it shows.
REPORT_KEY = "report.html"
THUMBS_PREFIX = "report/thumbs"
#: Image refs that point inside the run (staged uploads) carry this scheme.
RUN_REF_SCHEME = "run:"

_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def shard_input_key(index: int) -> str:
    """Key of shard ``index``'s input rows."""
    return f"{INPUT_PREFIX}/{index:05d}.jsonl"


def part_prefix(index: int) -> str:
    """Prefix under which shard ``index``'s checkpoint parts live."""
    return f"{PARTS_PREFIX}/{index:05d}/"


def part_key(index: int, part: int) -> str:
    """Key of checkpoint part ``part`` of shard ``index``."""
    return f"{PARTS_PREFIX}/{index:05d}/{part:06d}.jsonl"


def shard_output_key(index: int) -> str:
    """Key of shard ``index``'s finished output."""
    return f"{OUTPUT_PREFIX}/{index:05d}.jsonl"


def progress_key(index: int) -> str:
    """Key of shard ``index``'s live counts, rewritten every few seconds while it runs."""
    return f"{PROGRESS_PREFIX}/{index:05d}.json"


def shard_done_key(index: int) -> str:
    """Key of shard ``index``'s stats file, written last: the done marker."""
    return f"{OUTPUT_PREFIX}/{index:05d}.done.json"


def done_index(key: str) -> int | None:
    """Return the shard index of a done-marker key, or None if ``key`` is not one."""
    name = key.rsplit("/", 1)[-1]
    if key.startswith(OUTPUT_PREFIX + "/") and name.endswith(".done.json"):
        return int(name[: -len(".done.json")])
    return None


def safe_row_id(row_id: str) -> str:
    """Make a row id usable as one path segment (ids may hold slashes or spaces)."""
    safe = _SAFE.sub("_", str(row_id)).strip(".")
    return safe or "_"


def image_key(row_id: str, k: int, ext: str = "png") -> str:
    """Key of the ``k``-th generated image of a row; re-runs overwrite, never add."""
    return f"{IMAGES_PREFIX}/{safe_row_id(row_id)}/{k}.{ext}"


def staged_key(sha256: str, ext: str) -> str:
    """Content-addressed key of a staged input image."""
    return f"{STAGED_PREFIX}/{sha256}.{ext}"


def spend_key(index: int) -> str:
    """Key of shard ``index``'s spend so far (``--max-cost``)."""
    return f"{SPEND_PREFIX}/{index:05d}.json"


def batch_key(index: int) -> str:
    """Key of shard ``index``'s provider batch record (``--api-mode batch``)."""
    return f"{BATCHES_PREFIX}/{index:05d}.json"
