"""Behind a gateway, the same promises: the real LiteLLM proxy (1.81.13, no database) before the fake API.

`make install` puts LiteLLM in a virtual environment of its own (.venv-litellm): its pins would move
packages of the project's own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dfk8s.ports import listen_port
from dfk8s.testing.fake_api import FakeAPI, FakeConfig
from tests.conftest import REPO, SEED_DOCS
from tests.helpers.processes import die_with_parent

pytestmark = pytest.mark.slow

LITELLM = Path(os.environ.get("DFK8S_LITELLM", REPO / ".venv-litellm" / "bin" / "litellm"))
MASTER_KEY = "sk-gateway-master"
ROWS = 40


@pytest.fixture(scope="module")
def upstream():
    api = FakeAPI(FakeConfig(latency=0.02))
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    """A LiteLLM proxy with a master key and no database, routing two models to the fake."""
    assert LITELLM.exists(), f"{LITELLM} is missing: `make install` installs LiteLLM there"
    folder = tmp_path_factory.mktemp("litellm")
    config = folder / "config.yaml"
    config.write_text(json.dumps({
        "model_list": [
            {"model_name": "gpt-4o-mini", "litellm_params": {
                "model": "openai/gpt-4o-mini", "api_base": upstream.url + "/v1", "api_key": "upstream"}},
            {"model_name": "gemini-2.5-flash-image", "litellm_params": {
                "model": "gemini/gemini-2.5-flash-image", "api_base": upstream.url, "api_key": "upstream"}}],
        "general_settings": {"master_key": MASTER_KEY}}))
    port = listen_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
    with open(folder / "litellm.log", "wb") as log:
        proc = subprocess.Popen([str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (folder / "litellm.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url + "/health/liveliness", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, (folder / "litellm.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url
    finally:
        proc.kill()
        proc.wait()


def _manifest(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"question {i}"}]})
                            + "\n" for i in range(ROWS)))
    return path


def _dfk8s(tmp_path, *args, key: str = MASTER_KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "DF_API_KEY": key, "GEMINI_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def _summary(tmp_path, run_id) -> dict:
    return json.loads((tmp_path / "o" / run_id / "summary.json").read_text())


def test_a_wrong_key_stops_early_and_one_retry_with_the_key_finishes(tmp_path, gateway, upstream):
    upstream.reset()
    args = ["-o", "o", "--api-url", gateway + "/v1", "--no-progress"]
    stopped = _dfk8s(tmp_path, "run", "-p", "vqa", "-i", str(_manifest(tmp_path)), "--run-id", "key",
                     "--model", "gpt-4o-mini", "--workers", "2", "--rows-per-shard", "20", *args,
                     key="sk-nope")
    assert stopped.returncode == 42, stopped.stderr
    assert "AuthenticationError" in stopped.stderr and "API key" in stopped.stderr
    assert "dfk8s retry key -o o" in stopped.stderr
    summary = _summary(tmp_path, "key")
    assert summary["ok"] == 0 and summary["failed"] == 0 and summary["not_processed"] == ROWS
    fixed = _dfk8s(tmp_path, "retry", "key", *args)
    assert fixed.returncode == 0, fixed.stderr
    summary = _summary(tmp_path, "key")
    assert (summary["ok"], summary["failed"], summary["not_processed"]) == (ROWS, 0, 0)
    assert upstream.stats()["requests_total"] == ROWS  # each row reached the provider once
    # summary.json, result.jsonl and status say the same.
    rows = (tmp_path / "o" / "key" / "result.jsonl").read_text().splitlines()
    assert sum("answer" in json.loads(line) for line in rows) == ROWS
    status = json.loads(_dfk8s(tmp_path, "status", "key", "-o", "o", "--json").stdout)
    assert status["summary"]["ok"] == status["ok"] == status["done"] == ROWS


def test_a_model_the_gateway_does_not_route_is_named_at_once(tmp_path, gateway, upstream):
    args = ["-o", "o", "--api-url", gateway + "/v1", "--no-progress"]
    stopped = _dfk8s(tmp_path, "run", "-p", "vqa", "-i", str(_manifest(tmp_path)), "--run-id", "model",
                     "--model", "gpt-4o-mni", *args)
    assert stopped.returncode == 42, stopped.stderr
    assert "ModelNotFound" in stopped.stderr and "check --model" in stopped.stderr
    assert "dfk8s retry model -o o --model NAME" in stopped.stderr
    fixed = _dfk8s(tmp_path, "retry", "model", "--model", "gpt-4o-mini", *args)
    assert fixed.returncode == 0, fixed.stderr
    assert _summary(tmp_path, "model")["ok"] == ROWS


def test_batch_mode_the_gateway_is_not_set_up_for_stops_with_its_words(tmp_path, gateway):
    result = _dfk8s(tmp_path, "run", "-p", "vqa", "-i", str(_manifest(tmp_path)), "-o", "o", "--api-url",
                    gateway + "/v1", "--model", "gpt-4o-mini", "--api-mode", "batch", "--no-progress")
    assert result.returncode == 42, result.stderr
    assert "files_settings is not set" in result.stderr and "--api-mode sync" in result.stderr
    assert "retrying" not in result.stderr  # not retried as an outage


def test_gemini_images_at_the_gateways_root_names_the_v1beta_path(tmp_path, gateway):
    result = _dfk8s(tmp_path, "run", "-p", "text2image", "--serving", "gemini-images", "-i",
                    str(SEED_DOCS / "text2image.jsonl"), "-o", "o", "--api-url", gateway, "--no-progress")
    assert result.returncode == 42, result.stderr
    assert "HTTP 405" in result.stderr and "/v1beta" in result.stderr
    fixed = _dfk8s(tmp_path, "run", "-p", "text2image", "--serving", "gemini-images", "-i",
                   str(SEED_DOCS / "text2image.jsonl"), "-o", "o", "--api-url", gateway + "/v1beta",
                   "--no-progress")
    assert fixed.returncode == 0, fixed.stderr
