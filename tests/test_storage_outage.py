"""Storage blips are waited out: SeaweedFS killed and restarted mid-run, the run ends with every row once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from dfk8s.errors import StorageError
from dfk8s.executors.local.pipe import LOG_DIR_ENV
from dfk8s.storage import open_storage
from tests.helpers.seaweed import start_seaweed

pytestmark = pytest.mark.slow


@pytest.fixture
def own_seaweed():
    """A SeaweedFS of this test's own: it is killed and restarted, which the shared one must not be."""
    server = start_seaweed()
    server.create_bucket("outage")
    yield server
    server.stop()


def _wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_seaweedfs_killed_and_restarted_mid_run_the_run_finishes_with_every_row_once(
        tmp_path, fake_api, own_seaweed, monkeypatch):
    for name, value in own_seaweed.env().items():
        monkeypatch.setenv(name, value)
    fake_api.configure(latency=0.1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"prompt {i}"}]})
                                + "\n" for i in range(300)))
    output = "s3://outage/runs"
    env = {**own_seaweed.env(), "DF_API_KEY": "test-key-not-secret", "PATH": "/usr/bin:/bin",
           LOG_DIR_ENV: str(tmp_path / "logs")}
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "-i", str(manifest), "-o", output, "--run-id",
             "blip", "--api-url", fake_api.url + "/v1", "--model", "m", "--workers", "2", "--rows-per-shard",
             "50", "--max-concurrency", "4", "--save-interval", "10", "--no-progress"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(lambda: fake_api.stats()["by_status"].get("200", 0) >= 40, what="40 answered requests")
            own_seaweed.kill()
            time.sleep(8)  # the outage of the issue: 8 s without any S3
            own_seaweed.restart()
            code = launcher.wait(300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    text = (tmp_path / "launcher.log").read_text()
    assert code == 0, text
    assert "300 rows: 300 ok, 0 failed" in text and "Traceback" not in text
    body = own_seaweed.client().get_object(Bucket="outage", Key="runs/blip/result.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert [r["conversations"][0]["content"] for r in rows] == [f"prompt {i}" for i in range(300)]
    assert fake_api.stats()["requests_total"] == 300  # nothing lost in the outage, nothing paid twice


def test_an_outage_longer_than_the_patience_fails_in_one_line(own_seaweed, monkeypatch):
    monkeypatch.setenv("DFK8S_STORAGE_PATIENCE", "3")
    storage = open_storage("s3://outage/x", endpoint_url=own_seaweed.endpoint)
    for name, value in own_seaweed.env().items():
        monkeypatch.setenv(name, value)
    storage.write_bytes("a.txt", b"a")
    own_seaweed.kill()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"storage unavailable for \d+s \(--storage-patience 3\)"):
        storage.read_bytes("a.txt")
    assert 2.5 <= time.monotonic() - started < 60
