"""Worker overhead: rows/s per CPU core through the real worker with an instant (echo) serving.

    python bench/worker_overhead.py [--rows 50000] [--save-interval 100]

Prints rows per wall second, rows per CPU second (the per-core figure), and the ratio to the target
of 5,000 rows/s per core.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timed, write_prompts  # noqa: E402

from dfk8s.plan.launch import RunRequest, prepare_run  # noqa: E402
from dfk8s.worker.shard import process_shard  # noqa: E402

TARGET = 5000.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--save-interval", type=int, default=100)
    parser.add_argument("--pipeline", default="vqa", choices=["vqa", "text2image"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_prompts(os.path.join(tmp, "m.jsonl"), args.rows)
        storage, spec, _ = prepare_run(RunRequest(pipeline=args.pipeline, serving="echo", input=manifest,
                                                  output=tmp, run_id="bench", rows_per_shard=args.rows,
                                                  save_interval=args.save_interval))
        stats, wall, cpu = timed(process_shard, storage, 0)
    assert stats.ok == args.rows
    per_core = args.rows / cpu
    print(f"worker overhead ({args.pipeline}, echo serving, {args.rows} rows, save-interval "
          f"{args.save_interval}): {args.rows / wall:,.0f} rows/s wall, {per_core:,.0f} rows per CPU second; "
          f"ratio to the {TARGET:,.0f} rows/s/core target: {per_core / TARGET:.2f}")


if __name__ == "__main__":
    main()
