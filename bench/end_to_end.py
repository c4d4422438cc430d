"""The whole `dfk8s run` command, timed as a user runs it (start-up included), against the fake API.

    python bench/end_to_end.py                      # every case
    python bench/end_to_end.py --case caption-w1-c256 photos-w4-c64
    python bench/end_to_end.py --dfk8s /work/main/.venv/bin/dfk8s   # another checkout's CLI (before/after)

Each case runs ``dfk8s run`` in a subprocess and prints:

* ``ratio``: rows/s of the whole command (planning, worker start-up and reduce included) divided by the
  limit, ``workers x --max-concurrency / latency``;
* ``client ms/row``: CPU of the command and all its worker processes per row;
* ``fake cores``: CPU of the fake server (its own process) over the run, so one can see it is not the
  bottleneck, and its CPU per request;
* ``fake answer ms``: the fake's mean time from a request's arrival to its answer, beside the nominal
  latency of the case: what the fake itself added to the limit's denominator;
* ``loads/worker``: for the FLUX case, how many times a worker process built its serving (the
  ``loaded serving`` lines in the worker logs), divided by ``--workers``.

Figures from a busy machine say little; compare cases measured in one session.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import FakeApiProcess  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One timed command."""

    name: str
    pipeline: str
    rows: int
    latency: float
    workers: int
    concurrency: int
    images: str = "small"  # small | photo | none
    serving: str = "openai-chat"
    extra: tuple[str, ...] = ()


CASES = [
    Case("caption-w1-c64", "caption", 5000, 0.2, 1, 64),
    Case("caption-w4-c64", "caption", 5000, 0.2, 4, 64),
    Case("caption-w1-c256", "caption", 5000, 0.2, 1, 256),
    Case("caption-w4-c256", "caption", 5000, 0.2, 4, 256),
    Case("photos-w4-c64", "caption", 2000, 1.0, 4, 64, images="photo"),
    Case("flux-4shards-w1", "text2image", 8, 0.0, 1, 1, images="none", serving="diffusers",
         extra=("--shards", "4", "--steps", "2", "--height", "64", "--width", "64", "--dtype", "float32")),
]


def _photo(seed: int) -> bytes:
    """A 1600x1200 JPEG of ~220 KB: smooth colour fields plus sensor-like noise, as a camera makes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200),
                                                                                      Image.BICUBIC)
    noisy = np.asarray(base, dtype=np.float32) + rng.normal(0, 6, (1200, 1600, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _small(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed * 37 % 255, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def write_manifest(folder: Path, case: Case) -> Path:
    """The case's rows; images are shared by many rows (8 distinct files), as real datasets often are not,
    but the worker reads and encodes every row's image anyway."""
    names = []
    if case.images != "none":
        for k in range(8):
            data = _photo(k) if case.images == "photo" else _small(k)
            name = f"img{k}.{'jpg' if case.images == 'photo' else 'png'}"
            (folder / name).write_bytes(data)
            names.append(name)
    with (folder / "manifest.jsonl").open("w") as f:
        for i in range(case.rows):
            row = {"id": i, "conversation": [{"from": "human", "value": f"<image>\ndescribe scene {i}"}]}
            if names:
                row["image"] = names[i % len(names)]
            f.write(json.dumps(row) + "\n")
    return folder / "manifest.jsonl"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(case: Case, dfk8s: str, fake: FakeApiProcess | None, work: Path) -> dict:
    """Run one case's command; return its figures."""
    folder = work / case.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    manifest = write_manifest(folder, case)
    tmp = folder / "tmp"  # worker logs land here (TMPDIR): their "loaded serving" lines are counted
    tmp.mkdir()
    command = [dfk8s, "run", "-p", case.pipeline, "-i", str(manifest), "-o", str(folder / "runs"),
               "--run-id", "bench", "--workers", str(case.workers), "--no-progress", *case.extra]
    if case.serving == "diffusers":
        from dfk8s.testing.tiny_flux import build_tiny_flux

        command += ["--serving", "diffusers", "--model", str(build_tiny_flux(folder / "tiny-flux"))]
    else:
        command += ["--api-url", fake.url, "--max-concurrency", str(case.concurrency), "--max-retries", "0"]
    env = {**os.environ, "TMPDIR": str(tmp), "DF_API_KEY": "bench-key", "DFK8S_LOG_LEVEL": "INFO"}
    server = psutil.Process(fake.proc.pid) if fake else None
    fake_before = fake.stats() if fake else None
    server_cpu = sum(server.cpu_times()[:2]) if server else 0.0
    cpu, wall = _children_cpu(), time.perf_counter()
    # cwd: the case folder, so `python -m dfk8s worker` imports the dfk8s of the command timed, not ./dfk8s
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu if server else 0.0
    answer_ms = fake.answer_ms(fake_before, fake.stats()) if fake else None
    if result.returncode != 0:
        raise SystemExit(f"{case.name}: dfk8s run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads((folder / "runs" / "bench" / "summary.json").read_text())
    logs = result.stderr + "".join(p.read_text(errors="replace") for p in tmp.rglob("*.log"))
    loads = re.findall(r"loaded serving \S+ in [\d.]+s \(pid (\d+)\)", logs)
    spec = json.loads((folder / "runs" / "bench" / "run.json").read_text())
    limit = case.workers * case.concurrency / case.latency if case.latency else None
    rate = case.rows / wall
    return {"case": case.name, "rows": case.rows, "ok": summary["ok"], "shards": spec["shards"],
            "wall_s": round(wall, 2), "rows_per_s": round(rate, 1),
            "limit": round(limit, 1) if limit else None, "ratio": round(rate / limit, 3) if limit else None,
            "client_ms_per_row": round(1000 * cpu / case.rows, 3), "client_cores": round(cpu / wall, 2),
            "fake_cores": round(server_cpu / wall, 2),
            "fake_ms_per_request": round(1000 * server_cpu / max(1, case.rows), 3),
            "fake_answer_ms": answer_ms,
            "loads": len(loads), "load_pids": len(set(loads)),
            "loads_per_worker": round(len(loads) / case.workers, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=[c.name for c in CASES],
                        help="cases to run (default all)")
    parser.add_argument("--dfk8s", default=str(Path(sys.executable).with_name("dfk8s")),
                        help="the dfk8s command to time (default: this venv's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    print(f"dfk8s: {args.dfk8s}; machine: {psutil.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = (f"{'case':<16} {'rows':>5} {'shards':>6} {'wall s':>7} {'rows/s':>7} {'limit':>6} {'ratio':>6} "
              f"{'client ms/row':>13} {'client cores':>12} {'fake cores':>10} {'fake ms/req':>11} "
              f"{'fake answer ms':>14} {'loads/worker':>12}")
    if not args.json:
        print(header)
    with tempfile.TemporaryDirectory(prefix="dfk8s-e2e-") as work:
        servers: dict[float, FakeApiProcess] = {}
        try:
            for case in cases:
                server = None
                if case.serving != "diffusers":
                    if case.latency not in servers:
                        # Header-only image checks: the fake must not be the bottleneck on 220 KB photos.
                        servers[case.latency] = FakeApiProcess("--latency", str(case.latency),
                                                               "--decode-images", "0")
                    server = servers[case.latency]
                r = run_case(case, args.dfk8s, server, Path(work))
                if args.json:
                    print(json.dumps(r), flush=True)
                    continue
                loads = f"{r['loads_per_worker']:g} ({r['loads']} in {r['load_pids']} pids)" \
                    if case.serving == "diffusers" else "-"
                print(f"{r['case']:<16} {r['rows']:>5} {r['shards']:>6} {r['wall_s']:>7} "
                      f"{r['rows_per_s']:>7} {r['limit'] or '-':>6} {r['ratio'] or '-':>6} "
                      f"{r['client_ms_per_row']:>13} {r['client_cores']:>12} {r['fake_cores']:>10} "
                      f"{r['fake_ms_per_request']:>11} {r['fake_answer_ms'] or '-':>14} "
                      f"{loads:>12}" + ("" if r["ok"] == r["rows"] else f"  FAILED {r['rows'] - r['ok']}"),
                      flush=True)
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
