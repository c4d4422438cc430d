"""Caption throughput against the fake API at a fixed latency, as a ratio of the concurrency limit.

    python bench/caption_api.py [--latency 0.2] [--concurrency 16 64 256] [--seconds 8]

For each concurrency C the limit is C / latency rows/s. The worker runs in this process (its CPU is
measured); the fake server runs in another process. Prints rows/s, the ratio to the limit, and the
worker's CPU use in cores.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import FakeApiProcess, timed, write_prompts  # noqa: E402

from dfk8s.log import setup_logging  # noqa: E402
from dfk8s.runs import RunRequest, prepare_run  # noqa: E402
from dfk8s.worker import process_shard  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=8.0, help="Ideal duration of each measurement.")
    args = parser.parse_args()
    setup_logging("WARNING")
    server = FakeApiProcess("--latency", str(args.latency))
    try:
        for conc in args.concurrency:
            limit = conc / args.latency
            rows = int(limit * args.seconds)
            with tempfile.TemporaryDirectory() as tmp:
                manifest = write_prompts(os.path.join(tmp, "m.jsonl"), rows)
                storage, _, _ = prepare_run(RunRequest(
                    pipeline="vqa", input=manifest, output=tmp, run_id="bench", rows_per_shard=rows,
                    options={"api_url": server.url, "max_concurrency": conc, "max_retries": 0}))
                stats, wall, cpu = timed(process_shard, storage, 0)
            assert stats.ok == rows, stats
            rate = rows / wall
            print(f"concurrency {conc:4d}: {rows} rows in {wall:.2f}s = {rate:,.0f} rows/s; limit {limit:,.0f}; "
                  f"ratio {rate / limit:.3f}; worker CPU {cpu / wall:.2f} cores")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
