"""Caption throughput against the fake API at a fixed latency, as a ratio of the concurrency limit.

    python bench/caption_api.py [--latency 0.2] [--concurrency 16 64 256] [--seconds 8] [--client fast|sdk]

For each concurrency C the limit is C / latency rows/s. The worker runs in this process (its CPU is
measured); the fake server runs in another process. Prints rows/s, the ratio to the limit, and the
worker's CPU use in cores, and the fake's real time per answer beside the nominal latency. The process
collects garbage as a worker process does (:func:`dfk8s.worker.session.quiet_gc`).
"""

import argparse
import os
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import FakeApiProcess, timed, write_prompts  # noqa: E402

from dfk8s.cli.log import setup_logging  # noqa: E402
from dfk8s.plan.launch import RunRequest, prepare_run  # noqa: E402
from dfk8s.worker.session import quiet_gc  # noqa: E402
from dfk8s.worker.shard import process_shard  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=8.0, help="Ideal duration of each measurement.")
    parser.add_argument("--client", choices=["fast", "sdk"], default="fast", help="Request path (--client).")
    args = parser.parse_args()
    setup_logging("WARNING")
    started = time.perf_counter()
    import dfk8s.servings.openai_chat  # noqa: F401 - a once-per-process cost, reported apart from throughput

    if args.client == "sdk":
        import dfk8s.servings.openai_common  # noqa: F401

    print(f"importing the openai serving: {time.perf_counter() - started:.2f}s (once per worker process)")
    quiet_gc()  # what `dfk8s worker` does once its modules are loaded (0.83 instead of 0.91 at 256 without)
    server = FakeApiProcess("--latency", str(args.latency))
    server_process = psutil.Process(server.proc.pid)
    try:
        for conc in args.concurrency:
            limit = conc / args.latency
            rows = int(limit * args.seconds)
            with tempfile.TemporaryDirectory() as tmp:
                manifest = write_prompts(os.path.join(tmp, "m.jsonl"), rows)
                storage, _, _ = prepare_run(RunRequest(
                    pipeline="vqa", input=manifest, output=tmp, run_id="bench", rows_per_shard=rows,
                    options={"api_url": server.url, "max_concurrency": conc, "max_retries": 0,
                             "client": args.client}))
                server_cpu, before = sum(server_process.cpu_times()[:2]), server.stats()
                stats, wall, cpu = timed(process_shard, storage, 0)
                server_cpu = sum(server_process.cpu_times()[:2]) - server_cpu
                answer_ms = server.answer_ms(before, server.stats())
            assert stats.ok == rows, stats
            rate = rows / wall
            print(f"concurrency {conc:4d}: {rows} rows in {wall:.2f}s = {rate:,.0f} rows/s; "
                  f"limit {limit:,.0f}; ratio {rate / limit:.3f}; worker CPU {cpu / wall:.2f} cores "
                  f"({cpu / rows * 1000:.2f} ms/row); fake server CPU {server_cpu / wall:.2f} cores, "
                  f"{answer_ms} ms from arrival to answer; "
                  f"machine has {psutil.cpu_count()} cores")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
