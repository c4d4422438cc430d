"""Captions through a self-hosted engine: `dfk8s run --serving transformers`, timed as a user runs it.

    python bench/vlm_local.py                         # the tiny random Qwen2-VL, on the CPU
    python bench/vlm_local.py --model DIR --rows 512 --concurrency 32 --max-tokens 64   # a real-size model

Two measurements in one run, same model, rows, concurrency and max tokens:

* ``direct``: `transformers serve` started here, then the same requests sent straight to it with aiohttp
  (no dfk8s): the engine's own rate, the ceiling;
* ``dfk8s``: the whole ``dfk8s run --serving transformers --workers 1`` command (it starts its own
  engine; planning, start-up and reduce included), and its steady rate after the engine was ready
  (``summary.json``'s ``self_hosted.engine_startup_seconds``).

It prints rows/s and images/s of each, the ratio of dfk8s's steady rate to the direct one, the engine's
start-up, and the worker's CPU per row (dfk8s's own processes, the engine excluded), so one can see that
the worker is not what limits the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "fixtures" / "dataflow-mm" / "dataflow" / "example" / "vqa" / "ggbond.png"
PROMPT = "Generate detailed captions based on image content."


def _wait_ready(url: str, timeout: float = 600) -> float:
    import urllib.request

    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - began
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"{url} was not ready in {timeout}s")


async def _direct(url: str, model: str, rows: int, concurrency: int, max_tokens: int) -> float:
    import aiohttp

    data = base64.b64encode(IMAGE.read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}, image]}]}
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def one():
            async with slots, session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                await response.read()

        began = time.monotonic()
        await asyncio.gather(*(one() for _ in range(rows)))
        return time.monotonic() - began


def direct(model: str, rows: int, concurrency: int, max_tokens: int, device: str) -> tuple[float, float]:
    """Seconds to serve ``rows`` requests straight from `transformers serve`, and its start-up."""
    from dfk8s.ports import listen_port

    port = listen_port()
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(os.devnull, "wb") as null:
        engine = subprocess.Popen([str(cli), "serve", model, "--host", "127.0.0.1", "--port", str(port),
                                   "--device", device], stdout=null, stderr=null, env=env,
                                  start_new_session=True)
    try:
        startup = _wait_ready(f"http://127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_direct(url, model, min(rows, concurrency), concurrency, max_tokens))  # warm-up
        return asyncio.run(_direct(url, model, rows, concurrency, max_tokens)), startup
    finally:
        engine.terminate()
        engine.wait(30)


def through_dfk8s(model: str, rows: int, concurrency: int, max_tokens: int, device: str,
                  folder: Path) -> dict:
    """The whole `dfk8s run` command: wall seconds, its summary, and the CPU of its own processes."""
    manifest = folder / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"image": [str(IMAGE)]}) + "\n" for _ in range(rows)))
    command = [sys.executable, "-m", "dfk8s", "run", "--pipeline", "caption", "--serving", "transformers",
               "--model", model, "--input", str(manifest), "--output", str(folder / "out"), "--workers", "1",
               "--max-concurrency", str(concurrency), "--max-tokens", str(max_tokens), "--no-progress",
               "--engine-arg", f"device={device}"]
    began = time.monotonic()
    launcher = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    own: dict[int, float] = {}  # pid -> last CPU seconds seen, dfk8s's processes (engine excluded)
    names: dict[int, str] = {}
    while launcher.poll() is None:
        for proc in [launcher, *launcher.children(recursive=True)]:
            try:
                cmdline = proc.cmdline()
                if proc.pid != launcher.pid and "worker" not in cmdline:
                    continue  # the engine and its helper processes
                times = proc.cpu_times()
                own[proc.pid] = times.user + times.system
                names[proc.pid] = "launcher" if proc.pid == launcher.pid else "worker"
            except psutil.Error:
                pass
        time.sleep(0.2)
    wall = time.monotonic() - began
    err = launcher.stderr.read()
    if launcher.returncode != 0:
        raise SystemExit(f"dfk8s run failed ({launcher.returncode}): {err[-2000:]}")
    summary = json.loads(next((folder / "out").glob("*/summary.json")).read_text())
    by_name = {name: sum(cpu for pid, cpu in own.items() if names[pid] == name)
               for name in set(names.values())}
    return {"wall": wall, "summary": summary, "cpu": sum(own.values()), "by_name": by_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: the tiny random Qwen2-VL, built here)")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="transformers serve --device (cuda:0 on a GPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfk8s-vlm-bench-") as tmp:
        folder = Path(tmp)
        model = args.model
        if model is None:
            from dfk8s.testing.tiny_vlm import build_tiny_vlm

            model = str(build_tiny_vlm(folder / "tiny-qwen2-vl"))
        seconds, direct_startup = direct(model, args.rows, args.concurrency, args.max_tokens, args.device)
        run = through_dfk8s(model, args.rows, args.concurrency, args.max_tokens, args.device, folder)
    engine = run["summary"]["self_hosted"]
    steady = run["wall"] - engine["engine_startup_seconds"]
    print(f"model {model}; {args.rows} rows (1 image each), {args.concurrency} in flight, max_tokens "
          f"{args.max_tokens}, device {args.device}; machine has {os.cpu_count()} cores")
    print(f"direct (transformers serve, aiohttp): {args.rows / seconds:.2f} rows/s = images/s "
          f"(start-up {direct_startup:.1f}s, not counted)")
    print(f"dfk8s run, whole command: {run['wall']:.1f}s = {args.rows / run['wall']:.2f} rows/s; engine "
          f"start-up {engine['engine_startup_seconds']:.1f}s; after it: {args.rows / steady:.2f} rows/s; "
          f"ratio to direct {args.rows / steady / (args.rows / seconds):.2f}")
    print(f"dfk8s's own CPU (launcher + worker, engine excluded): {run['cpu']:.1f}s = "
          f"{1000 * run['cpu'] / args.rows:.1f} ms/row ("
          + ", ".join(f"{name} {cpu:.1f}s" for name, cpu in sorted(run["by_name"].items()))
          + "); tokens in/out "
          f"{run['summary']['usage']['input_tokens']}/{run['summary']['usage']['output_tokens']}")


if __name__ == "__main__":
    main()
