"""Issue 9's faults and mistakes, measured on a `dfk8s` executable: requests per row, orphans, exit codes.

Run it on two builds to compare (the fake API and SeaweedFS come from this checkout; only the CLI differs):

    .venv/bin/python bench/lifecycle_faults.py --dfk8s /work/main/.venv/bin/dfk8s   # before
    .venv/bin/python bench/lifecycle_faults.py --dfk8s .venv/bin/dfk8s              # after

Every process it starts is stopped before it exits, orphans included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from dfk8s.executors.local.pipe import worker_log_dir
from dfk8s.testing.fake_api import FakeAPI, FakeConfig


def _manifest(folder: Path, n: int, suffix: str = "") -> Path:
    path = folder / f"m{n}{suffix.strip()[:8]}.jsonl"
    rows = ({"conversations": [{"role": "user", "content": f"prompt {i}{suffix}"}]} for i in range(n))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _wait(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return None


class Bench:
    def __init__(self, dfk8s: str, folder: Path):
        self.dfk8s, self.folder = dfk8s, folder
        self.api = FakeAPI(FakeConfig(latency=0.2))
        self.api.start()
        self.env = {**os.environ, "DF_API_KEY": "bench-key"}

    def args(self, manifest, run_id, *extra):
        return [self.dfk8s, "run", "-p", "vqa", "-i", str(manifest), "-o", str(self.folder / "o"), "--run-id",
                run_id, "--api-url", self.api.url + "/v1", "--model", "m", "--no-progress", *extra]

    def ok(self):
        return self.api.stats()["by_status"].get("200", 0)

    def launch(self, args):
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)

    def worker_sigterm(self):
        from dfk8s.plan.launch import RunRequest, prepare_run

        self.api.reset()
        # Planned by this checkout (run.json and shards have the same layout in every build), then the
        # build's own `dfk8s worker` runs the shard, as a pod would: SIGTERM at 150 rows, then a retry.
        storage, _, _ = prepare_run(RunRequest(
            pipeline="vqa", serving="openai-chat", input=str(_manifest(self.folder, 400)),
            output=str(self.folder / "o"), run_id="w-term", rows_per_shard=400, save_interval=100,
            options={"api_url": self.api.url + "/v1", "model": "m", "max_concurrency": 16}))
        worker = [self.dfk8s, "worker", "--run", storage.url(), "--index", "0"]
        process = subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        _wait(lambda: self.ok() >= 150)
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
        stopped_at = self.api.stats()["requests_total"]
        again = subprocess.run(worker, capture_output=True, env=self.env)
        return {"case": "worker SIGTERM at 150 of 400 rows, then a retry", "exit": code,
                "requests_before_retry": stopped_at, "retry_exit": again.returncode,
                "requests": self.api.stats()["requests_total"], "rows": 400}

    def launcher_signal(self, sig):
        self.api.reset()
        run_id = f"l-{sig.name}"
        manifest = _manifest(self.folder, 400)
        launcher = self.launch(self.args(manifest, run_id, "--workers", "2", "--rows-per-shard", "100",
                                         "--max-concurrency", "8"))
        proc = psutil.Process(launcher.pid)
        workers = _wait(lambda: len(proc.children()) >= 2 and proc.children())
        _wait(lambda: self.ok() >= 30)
        if sig == signal.SIGKILL:
            launcher.kill()
        else:
            launcher.send_signal(sig)
        code = launcher.wait(120)
        time.sleep(3 if sig != signal.SIGKILL else 5)
        orphans = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        for w in orphans:  # leave nothing running
            w.kill()
        psutil.wait_procs(orphans, timeout=10)
        if sig == signal.SIGKILL:
            time.sleep(16)  # let the killed launcher's lease go stale
        resume = [self.dfk8s, "run", "-p", "vqa", "--run-id", run_id, "-o", str(self.folder / "o"),
                  "--no-progress"]
        again = subprocess.run(resume, capture_output=True, text=True, env=self.env)
        return {"case": f"launcher {sig.name} mid-run, then resume", "exit": code,
                "orphans_after_3s": len(orphans), "resume_exit": again.returncode,
                "requests": self.api.stats()["requests_total"], "rows": 400}

    def all_failed(self):
        self.api.reset()
        result = subprocess.run(self.args(_manifest(self.folder, 30, " [[refuse]]"), "allfail"),
                                capture_output=True, text=True, env=self.env)
        return {"case": "every row fails (30 refusals)", "exit": result.returncode,
                "requests": self.api.stats()["requests_total"], "last_line": result.stderr.strip()[-160:]}

    def resume_plain(self):
        subprocess.run(self.args(_manifest(self.folder, 5), "plain"), capture_output=True, env=self.env)
        self.api.reset()
        plain = subprocess.run([self.dfk8s, "run", "--run-id", "plain", "-o", str(self.folder / "o"),
                                "--no-progress"], capture_output=True, text=True, env=self.env)
        changed = subprocess.run([self.dfk8s, "run", "-p", "vqa", "--run-id", "plain", "-o",
                                  str(self.folder / "o"), "--model", "other", "--no-progress"],
                                 capture_output=True, text=True, env=self.env)
        retry = subprocess.run([self.dfk8s, "retry", "plain", "-o", str(self.folder / "o")],
                               capture_output=True, text=True, env=self.env)
        return {"case": "resume with only --run-id / with a changed --model / dfk8s retry",
                "plain_exit": plain.returncode, "plain": plain.stderr.strip().splitlines()[-1:],
                "changed_exit": changed.returncode, "changed": changed.stderr.strip().splitlines()[-1:],
                "retry_exit": retry.returncode, "retry": retry.stderr.strip().splitlines()[-1:]}

    def output_is_a_file(self):
        (self.folder / "afile").write_text("x")
        result = subprocess.run([self.dfk8s, "run", "-p", "vqa", "--serving", "echo", "-i",
                                 str(_manifest(self.folder, 2)), "-o", str(self.folder / "afile"),
                                 "--no-progress"], capture_output=True, text=True, env=self.env)
        return {"case": "-o names a file", "exit": result.returncode,
                "traceback": "Traceback" in result.stderr, "lines": len(result.stderr.strip().splitlines())}

    def flux_loads(self):
        from dfk8s.testing.tiny_flux import build_tiny_flux

        model = build_tiny_flux(self.folder / "flux")
        run_id = f"flux-{os.getpid()}-{time.monotonic_ns()}"
        manifest = self.folder / "t2i.jsonl"
        manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"fox {i}"}]})
                                    + "\n" for i in range(8)))
        started = time.monotonic()
        result = subprocess.run([self.dfk8s, "run", "-p", "text2image", "--serving", "diffusers", "--model",
                                 str(model), "--steps", "2", "--height", "64", "--width", "64", "--dtype",
                                 "float32", "-i", str(manifest), "-o", str(self.folder / "o"), "--run-id",
                                 run_id, "--shards", "4", "--workers", "1", "--no-progress"],
                                capture_output=True, text=True, env={**self.env, "HF_HUB_OFFLINE": "1"})
        seconds = time.monotonic() - started
        logs = "".join(p.read_text() for p in worker_log_dir(run_id).glob("*.log"))
        return {"case": "tiny FLUX, 4 shards, --workers 1", "exit": result.returncode,
                "model_loads": logs.count("loaded FluxPipeline"), "seconds": round(seconds, 1)}

    def close(self):
        self.api.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dfk8s", default=str(Path(sys.executable).with_name("dfk8s")))
    parser.add_argument("--cases", default="worker_sigterm,launcher,all_failed,resume_plain,output_is_a_file,"
                                           "flux_loads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfk8s-bench-faults-") as tmp:
        bench = Bench(args.dfk8s, Path(tmp))
        try:
            for case in args.cases.split(","):
                if case == "launcher":
                    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL):
                        print(json.dumps(bench.launcher_signal(sig)), flush=True)
                else:
                    print(json.dumps(getattr(bench, case)()), flush=True)
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
