"""Image API throughput: rows/s of openai-images and gemini-images against the fake server.

The fake server runs in its own process (so the CPU seconds printed are the worker's alone) with a fixed
latency per request; each run plans a one-shard text2image (or imageedit) run and processes it with
``dfk8s.worker.shard.process_shard`` in this process, exactly as a worker pod would. The ceiling is
``concurrency / latency`` rows/s; the ratio says how close the worker gets to it. The fake server and
the worker share this machine's CPUs, so on a small machine CPU contention (not the concurrency limit)
is what keeps the ratio under 1: compare with ``--latency 0``, which measures that CPU ceiling.

    python bench/image_api.py                       # both servings, concurrency 16 and 64, latency 1 s
    python bench/image_api.py --serving gemini-images --concurrency 128 --rows 1024
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODELS = {"openai-images": "gpt-image-1.5", "gemini-images": "gemini-2.5-flash-image"}
#: gemini-images request path (--client); set from the command line.
CLIENT = "fast"


def start_fake(latency: float) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "dfk8s.testing.fake_api", "--port", "0", "--latency", str(latency)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return proc, match.group(1)


def http(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def write_manifest(folder: Path, rows: int, pipeline: str) -> Path:
    manifest = folder / "manifest.jsonl"
    image = None
    if pipeline == "imageedit":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, "PNG")
        image = folder / "in.png"
        image.write_bytes(buf.getvalue())
    with manifest.open("w") as f:
        for i in range(rows):
            row = {"conversations": [{"role": "user", "content": f"picture number {i}"}]}
            if image is not None:
                row["images"] = [image.name]
            f.write(json.dumps(row) + "\n")
    return manifest


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_one(url: str, serving: str, concurrency: int, rows: int, latency: float, pipeline: str) -> dict:
    from dfk8s.plan.launch import RunRequest, prepare_run
    from dfk8s.worker.shard import process_shard

    http(url + "/_reset", {})
    with tempfile.TemporaryDirectory(prefix="dfk8s-bench-") as tmp:
        folder = Path(tmp)
        manifest = write_manifest(folder, rows, pipeline)
        storage, spec, _ = prepare_run(RunRequest(
            pipeline=pipeline, serving=serving, input=str(manifest), output=str(folder / "out"), shards=1,
            save_interval=max(100, rows // 4),
            options={"api_url": url, "model": MODELS[serving], "max_concurrency": concurrency,
                     **({"client": CLIENT} if serving == "gemini-images" else {})}))
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        stats = process_shard(storage, 0)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        gc.collect()  # drop this run's SDK clients now, while no event loop runs

    server = http(url + "/_stats")
    answer_ms = round(1000 * server["answer_seconds_total"] / server["requests_total"], 1) \
        if server.get("requests_total") else None
    limit = concurrency / latency if latency > 0 else float("inf")
    ratio = round(rows / wall / limit, 3) if latency > 0 else None
    return {"serving": serving, "pipeline": pipeline, "concurrency": concurrency, "rows": rows,
            "ok": stats.ok, "failed": stats.failed, "wall_s": round(wall, 2),
            "rows_per_s": round(rows / wall, 1), "limit_rows_per_s": round(limit, 1), "ratio": ratio,
            "cpu_s": round(cpu, 2),
            "cpu_ms_per_row": round(1000 * cpu / rows, 2), "server_requests": server["requests_total"],
            "server_max_inflight": server["max_inflight"], "server_answer_ms": answer_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--latency", type=float, default=1.0, help="fake server seconds per request")
    parser.add_argument("--rows", type=int, help="rows per run (default: 8 x concurrency)")
    parser.add_argument("--pipeline", choices=["text2image", "imageedit"], default="text2image")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument("--client", choices=["fast", "sdk"], default="fast",
                        help="gemini-images request path")
    args = parser.parse_args(argv)
    global CLIENT
    CLIENT = args.client
    os.environ.setdefault("DF_API_KEY", "bench-key")
    os.environ.setdefault("GEMINI_API_KEY", "bench-key")
    os.environ.pop("DF_BASE_URL", None)
    for serving in args.serving:  # a pod pays the SDK imports once; keep them out of the timings
        importlib.import_module(f"dfk8s.servings.{serving.replace('-', '_')}")
    from dfk8s.worker.session import quiet_gc

    quiet_gc()  # what `dfk8s worker` does once its modules are loaded
    proc, url = start_fake(args.latency)
    try:
        if not args.json:
            print(f"fake server {url}, latency {args.latency:g} s, pipeline {args.pipeline}")
            print(f"{'serving':<14} {'conc':>5} {'rows':>5} {'wall s':>7} {'rows/s':>7} {'limit':>6} "
                  f"{'ratio':>6} {'cpu s':>6} {'cpu ms/row':>10} {'max inflight':>12} {'fake answer ms':>14}")
        for serving in args.serving:
            for concurrency in args.concurrency:
                rows = args.rows or 8 * concurrency
                r = bench_one(url, serving, concurrency, rows, args.latency, args.pipeline)
                if args.json:
                    print(json.dumps(r))
                else:
                    ratio = "-" if r["ratio"] is None else r["ratio"]
                    failed = f"  FAILED {r['failed']}" if r["failed"] else ""
                    print(f"{serving:<14} {concurrency:>5} {r['rows']:>5} {r['wall_s']:>7} "
                          f"{r['rows_per_s']:>7} {r['limit_rows_per_s']:>6} {ratio:>6} {r['cpu_s']:>6} "
                          f"{r['cpu_ms_per_row']:>10} {r['server_max_inflight']:>12} "
                          f"{r['server_answer_ms'] or '-':>14}{failed}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
