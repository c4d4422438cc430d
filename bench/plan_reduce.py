"""Plan and reduce at 10k and 1M rows: peak memory (must stay flat) and speed against a plain file copy.

    python bench/plan_reduce.py [--sizes 10000 1000000] [--workers 2]
    python bench/plan_reduce.py --parquet [--id-key] [--sizes 10000 1000000]

``--parquet`` plans a LAION-style Parquet file instead (id, url, caption; row groups of 10k rows) as
a caption run with ``--image-key url --prompt``: URLs are checked for syntax and scheme, never
fetched, so only the plan is measured (the rows' images live on hosts this machine cannot reach).

Each phase runs in a fresh process so its peak RSS is its own. Between plan and reduce the shards are
processed by the real worker with the instant echo serving (not measured here; see
worker_overhead.py). Prints, per size: plan and reduce seconds, MB/s, the ratio of their throughput to
``shutil.copyfile`` of the same bytes, peak RSS; then the RSS ratio 1M / 10k (flat memory means ~1).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_seconds, peak_rss_mb, write_prompts  # noqa: E402


def _phase(phase: str, workdir: str, shards: int) -> dict:
    from dfk8s.plan.launch import RunRequest, prepare_run
    from dfk8s.reduce.reducer import reduce_run
    from dfk8s.storage import open_storage

    manifest = os.path.join(workdir, "m.jsonl")
    started = time.perf_counter()
    if phase == "copy":
        shutil.copyfile(manifest, os.path.join(workdir, "copy.jsonl"))
        nbytes = os.path.getsize(manifest)
    elif phase in ("plan-parquet", "plan-parquet-ids"):
        _, spec, _ = prepare_run(RunRequest(pipeline="caption", serving="echo", input=manifest + ".parquet",
                                            output=workdir, run_id="bench", image_key="url",
                                            id_key="key" if phase.endswith("ids") else None,
                                            options={"prompt": "Describe the image."}))
        nbytes = spec.input_bytes
    elif phase == "plan":
        _, spec, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=manifest, output=workdir,
                                            run_id="bench"))
        nbytes = spec.input_bytes
    elif phase == "reduce":
        summary = reduce_run(open_storage(os.path.join(workdir, "bench")))
        assert summary.complete and summary.failed == 0, summary
        nbytes = os.path.getsize(os.path.join(workdir, "bench", "result.jsonl"))
    else:
        raise ValueError(phase)
    return {"seconds": time.perf_counter() - started, "bytes": nbytes, "rss_mb": peak_rss_mb(),
            "cpu": cpu_seconds()}


def write_laion_parquet(path: str, rows: int) -> str:
    """A LAION-style Parquet manifest: key, url, caption, width, height; 10k-row row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 10_000):
            ids = range(start, min(rows, start + 10_000))
            writer.write_table(pa.table({
                "key": [f"{i:09d}" for i in ids],
                "url": [f"https://img{i % 97}.example.com/photos/{i}/full.jpg" for i in ids],
                "caption": [f"a photo of scene number {i}" for i in ids],
                "width": [512] * len(ids), "height": [384] * len(ids)}, schema=schema))
    return path


def _parquet(sizes, id_key: bool):
    results = {}
    phase = "plan-parquet-ids" if id_key else "plan-parquet"
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="dfk8s-bench-") as workdir:
            write_laion_parquet(os.path.join(workdir, "m.jsonl.parquet"), rows)
            plan = _run_phase(phase, workdir)
        results[rows] = plan
        print(f"{rows:>9,} rows ({plan['bytes'] / 1e6:,.1f} MB Parquet) plan{' --id-key' * id_key}: "
              f"{plan['seconds']:7.2f}s {rows / plan['seconds']:9,.0f} rows/s wall, "
              f"{rows / plan['cpu']:9,.0f} rows per CPU second; peak RSS {plan['rss_mb']:.0f} MiB")
    if len(sizes) >= 2:
        small, large = min(sizes), max(sizes)
        ratio = results[large]["rss_mb"] / results[small]["rss_mb"]
        print(f"parquet plan peak RSS {large:,} rows / {small:,} rows = {ratio:.2f} (flat memory: ~1.0)")


def _work(args):
    run_dir, index = args
    from dfk8s.storage import open_storage
    from dfk8s.worker.shard import process_shard

    process_shard(open_storage(run_dir), index)


def _run_phase(phase, workdir):
    out = subprocess.run([sys.executable, __file__, "--phase", phase, "--workdir", workdir],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parquet", action="store_true", help="plan a LAION-style Parquet manifest instead")
    parser.add_argument("--id-key", action="store_true",
                        help="with --parquet: also check ids for duplicates (--id-key key)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_phase(args.phase, args.workdir, 0)))
        return
    if args.parquet:
        _parquet(args.sizes, args.id_key)
        return
    results = {}
    for rows in args.sizes:
        with tempfile.TemporaryDirectory(prefix="dfk8s-bench-") as workdir:
            write_prompts(os.path.join(workdir, "m.jsonl"), rows)
            copy = _run_phase("copy", workdir)
            plan = _run_phase("plan", workdir)
            run_dir = os.path.join(workdir, "bench")
            shards = json.load(open(os.path.join(run_dir, "run.json")))["shards"]
            with ProcessPoolExecutor(args.workers) as pool:
                list(pool.map(_work, [(run_dir, i) for i in range(shards)], chunksize=8))
            reduce = _run_phase("reduce", workdir)
        results[rows] = (copy, plan, reduce)
        mb = plan["bytes"] / 1e6
        copy_rate = copy["bytes"] / 1e6 / copy["seconds"]
        for name, phase in (("plan", plan), ("reduce", reduce)):
            rate = phase["bytes"] / 1e6 / phase["seconds"]
            print(f"{rows:>9,} rows ({mb:,.1f} MB) {name:6s}: {phase['seconds']:7.2f}s {rate:8.1f} MB/s "
                  f"= {rate / copy_rate:.3f} x copy ({copy_rate:,.0f} MB/s); "
                  f"peak RSS {phase['rss_mb']:.0f} MiB")
    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        for i, name in ((1, "plan"), (2, "reduce")):
            ratio = results[large][i]["rss_mb"] / results[small][i]["rss_mb"]
            print(f"{name} peak RSS {large:,} rows / {small:,} rows = {ratio:.2f} (flat memory: ~1.0)")


if __name__ == "__main__":
    main()
