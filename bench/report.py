"""dfk8s report on generated 10k and 1M-row runs: seconds and peak memory (must stay flat).

    python bench/report.py [--sizes 10000 1000000] [--rows 500]

Each run is written straight to disk (no API: tests.helpers.synthetic_run, a text2image run with a
failed row every 997 and one 3000-row shard that never finished). Then ``dfk8s report RUN --output DIR``
runs as a user runs it, in a fresh process; its wall time and peak RSS come from wait4. Prints per size:
seconds, peak RSS, the ratio of the report's time to one plain Python pass over result.jsonl's lines,
then the RSS ratio of the largest size to the smallest (flat memory means ~1).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _measure(argv: list[str]) -> tuple[float, float, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{out}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--rows", type=int, default=500, help="--rows of dfk8s report")
    args = parser.parse_args()
    from tests.helpers.synthetic_run import write_synthetic_run

    rss = {}
    with tempfile.TemporaryDirectory(prefix="dfk8s-bench-report-") as tmp:
        for size in args.sizes:
            root = os.path.join(tmp, str(size))
            run = write_synthetic_run(
                root, size, fail_every=997, lost_shard=(size // 2, min(3000, size // 10))
            )
            result = os.path.join(run.root, "result.jsonl")
            read_s, _, _ = _measure([sys.executable, "-c", f"for _ in open({result!r}, 'rb'): pass"])
            seconds, peak, out = _measure(
                [
                    sys.executable,
                    "-m",
                    "dfk8s",
                    "report",
                    "synthetic",
                    "--output",
                    root,
                    "--rows",
                    str(args.rows),
                ]
            )
            rss[size] = peak
            mb = os.path.getsize(result) / 1e6
            print(
                f"{size:>9,} rows ({mb:,.1f} MB, {len(run.failed_positions):,} failed): "
                f"report {seconds:6.2f}s, "
                f"peak RSS {peak:5.0f} MiB; {seconds / read_s:4.1f} x one plain pass over the lines "
                f"({read_s:.2f}s)"
            )
            print(
                "".join(f"    {line}\n" for line in out.strip().splitlines() if line.startswith("report:")),
                end="",
            )
    if len(rss) > 1:
        small, big = min(rss), max(rss)
        print(f"peak RSS {big:,} rows / {small:,} rows = {rss[big] / rss[small]:.2f} (flat memory: ~1.0)")


if __name__ == "__main__":
    main()
