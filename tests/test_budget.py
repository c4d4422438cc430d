"""--max-cost is a ceiling, every answer is priced (never as free), and usage is kept without a price."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest

pytestmark = pytest.mark.slow


def _dfk8s(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DF_API_KEY": "test-key-not-secret"}
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def _captions(tmp_path, n: int):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "img.png")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image": "img.png", "conversation": [
        {"from": "human", "value": f"Describe picture number {i}."}]}) + "\n" for i in range(n)))
    return path


def _prices(tmp_path):
    # A dear model: $1 an output token, input free. Its typical answer (what the estimate assumes) is 5
    # tokens; an answer may be up to 20. The fake's captions are ~11 tokens: the estimate is short.
    table = {"table": "test", "date": "2026-12-01", "sources": [], "models": {"dear": {
        "provider": "openai", "input_per_mtok": 0, "output_per_mtok": 1_000_000,
        "image_tokens": {"rule": "fixed", "tokens": 0}, "typical_output_tokens": 5,
        "max_output_tokens": 20}}}
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(table))
    return path


def test_the_budget_is_a_ceiling_with_many_workers_in_flight(tmp_path, fake_api):
    fake_api.configure(latency=1.0)
    manifest = _captions(tmp_path, 40)
    result = _dfk8s(tmp_path, "run", "-p", "caption", "-i", str(manifest), "-o", "o", "--run-id", "b",
                    "--api-url", fake_api.url + "/v1", "--model", "dear", "--prices", str(_prices(tmp_path)),
                    "--max-cost", "250", "--workers", "4", "--max-concurrency", "4",
                    "--rows-per-shard", "10", "--no-progress")
    summary = json.loads((tmp_path / "o/b/summary.json").read_text())
    # The estimate (40 x 5 tokens = $200) was under the budget; the answers cost more (~$11 each). The
    # run stops within its budget, not after it: every request's most ($20) was reserved before it went.
    assert result.returncode == 1, result.stderr  # shards did not finish: resume with a higher budget
    assert "stopped at --max-cost $250.00" in result.stderr
    assert summary["cost_usd"] <= 250, summary
    assert summary["cost_usd"] >= 150, summary  # and it used the budget
    sent = fake_api.stats()["requests_total"]
    assert sent == summary["ok"] + summary["failed"] and summary["not_processed"] == 40 - sent
    # The report shows the money: the spend in dollars, the budget, and that the budget stopped the run.
    report = _dfk8s(tmp_path, "report", "b", "--output", "o")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "o/b/report.html").read_text()
    assert f"${summary['cost_usd']:,.2f}" in page and "--max-cost $250.00" in page
    assert "stopped by the budget" in page and "shards 0, 1, 2, 3 stopped" in page


def test_an_answer_without_usage_is_priced_from_what_was_asked(tmp_path, fake_api, api_key):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"a fox {i}"}]}) + "\n"
                            for i in range(3)))
    summary = run_local(RunRequest(pipeline="text2image", serving="openai-images", input=str(path),
                                   output=str(tmp_path / "o"), run_id="d",
                                   options={"api_url": fake_api.url + "/v1", "model": "dall-e-3",
                                            "size": "1024x1024", "quality": "standard"}), workers=1)
    data = json.loads((tmp_path / "o/d/summary.json").read_text())
    # dall-e answers carry no usage: each image is priced at the table's $0.04, and marked estimated.
    assert summary.ok == 3
    assert data["cost_usd"] == pytest.approx(3 * 0.04)
    assert data["usage"]["estimated"] == 3 and data["usage"]["images"] == 3


def test_usage_is_kept_when_no_price_is_known(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 4)
    run_local(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "o"), run_id="u",
                         options={"api_url": fake_api.url + "/v1", "model": "a-model-with-no-price"}),
              workers=1)
    data = json.loads((tmp_path / "o/u/summary.json").read_text())
    assert data["cost_usd"] is None
    assert data["usage"]["requests"] == 4 and data["usage"]["input_tokens"] > 0
    assert data["usage"]["output_tokens"] > 0
