"""Helpers shared by the benchmarks: synthetic manifests and resource measurements."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import urllib.request


def write_prompts(path: str, rows: int) -> str:
    """A JSONL manifest of ``rows`` one-turn prompts (DataFlow-MM's conversation shape)."""
    with open(path, "w") as f:
        for i in range(rows):
            turn = {"from": "human", "value": f"describe scene {i}"}
            f.write(json.dumps({"id": i, "conversation": [turn]}))
            f.write("\n")
    return path


def cpu_seconds() -> float:
    """CPU seconds used by this process so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FakeApiProcess:
    """The fake API server in its own process, so its CPU is not counted against the worker."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "dfk8s.testing.fake_api", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"fake API did not start: {line!r}")
        self.url = line.split()[-1].replace("0.0.0.0", "127.0.0.1")

    def stats(self) -> dict:
        """The fake's counters (``/_stats``)."""
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as answer:
            return json.load(answer)

    def answer_ms(self, before: dict, after: dict) -> float | None:
        """Mean milliseconds from a request's arrival to its answer between two :meth:`stats` readings.

        Next to the nominal latency: what the fake itself added.
        """
        count = after["requests_total"] - before["requests_total"]
        seconds = after.get("answer_seconds_total", 0.0) - before.get("answer_seconds_total", 0.0)
        return round(1000 * seconds / count, 1) if count else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def timed(func, *args, **kwargs):
    """Run ``func`` and return (result, wall seconds, cpu seconds)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = func(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


os.environ.setdefault("DF_API_KEY", "bench-key")
