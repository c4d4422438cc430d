"""A large finished run written straight to disk (no API, no workers), for report tests and benchmarks.

It holds what a reduced text2image run holds (run.json, result.jsonl, errors.jsonl, summary.json,
images/), with failed rows scattered through the input plus one shard that never finished (its rows
``NotProcessed``). The images are a few distinct PNGs shared by many rows, so a million rows need no
million files.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class SyntheticRun:
    """Where the run is and which positions failed."""

    root: Path
    rows: int
    failed_positions: list[int] = field(default_factory=list)

    @property
    def ok(self) -> int:
        """Rows that finished."""
        return self.rows - len(self.failed_positions)


def write_synthetic_run(
    root: str | Path,
    rows: int,
    *,
    fail_every: int = 997,
    lost_shard: tuple[int, int] | None = None,
    distinct_images: int = 64,
    image_px: int = 256,
    run_id: str = "synthetic",
) -> SyntheticRun:
    """Write a reduced text2image run of ``rows`` rows under ``root/run_id``.

    Args:
        root: The ``--output`` folder.
        rows: Rows in result.jsonl.
        fail_every: Every ``fail_every``-th row failed with ``RateLimited`` (0: none).
        lost_shard: ``(first, count)``: positions marked ``NotProcessed`` (a shard that never finished).
        distinct_images: Distinct output PNGs the ok rows point to.
        image_px: Their size.
        run_id: The run's folder name.

    Returns:
        The run's folder and its failed positions.
    """
    run = Path(root) / run_id
    (run / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(distinct_images):
        path = run / "images" / f"shared-{k}.png"
        buf = io.BytesIO()
        Image.new("RGB", (image_px, image_px), ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)).save(
            buf, "PNG"
        )
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    lost_first, lost_count = lost_shard or (-1, 0)
    failed, ok = [], 0
    with (
        (run / "result.jsonl").open("w", encoding="utf-8") as out,
        (run / "errors.jsonl").open("w") as errors,
    ):
        for pos in range(rows):
            row = {
                "uid": f"u{pos}",
                "conversations": [{"role": "user", "content": f"prompt number {pos}: a fox"}],
            }
            if lost_first <= pos < lost_first + lost_count:
                row["error"] = {
                    "type": "NotProcessed",
                    "message": "its shard did not finish",
                    "attempts": 0,
                }
            elif fail_every and pos % fail_every == fail_every - 1:
                row["error"] = {"type": "RateLimited", "message": "429 after 3 attempts", "attempts": 3}
            else:
                row["images"] = [paths[pos % distinct_images]]
                ok += 1
            if "error" in row:
                failed.append(pos)
                entry = {
                    "id": row["uid"],
                    "pos": pos,
                    "error": row["error"],
                    "row": {k: v for k, v in row.items() if k != "error"},
                }
                errors.write(json.dumps(entry, separators=(",", ":")) + "\n")
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
    not_processed = sum(1 for p in failed if lost_first <= p < lost_first + lost_count)
    spec = {
        "run_id": run_id,
        "pipeline": "text2image",
        "serving": "openai-images",
        "options": {"model": "gpt-image-1.5"},
        "input": "synthetic.jsonl",
        "id_key": "uid",
        "rows": rows,
        "shards": max(1, -(-rows // 1000)),
        "rows_per_shard": 1000,
        "created_at": time.time() - 3600,
    }
    (run / "run.json").write_text(json.dumps(spec, indent=2))
    summary = {
        "run_id": run_id,
        "pipeline": "text2image",
        "serving": "openai-images",
        "rows": rows,
        "ok": ok,
        "failed": len(failed) - not_processed,
        "not_processed": not_processed,
        "failed_shards": [3] if lost_count else [],
        "missing_shards": [],
        "worker_seconds": 3500.0,
        "wall_seconds": 3600.0,
        "complete": not lost_count,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return SyntheticRun(run, rows, failed)
