"""dfk8s report for a Kubernetes run (staged images on S3): submit --wait --report, and report afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.testing.fake_kube import FakeKube
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST
from tests.report_browser import cards, chromium, images, open_page

NS = "batch"


@pytest.fixture
def cluster(tmp_path, monkeypatch, s3_env, fake_api):
    """The fake kube-apiserver running pods as local processes, with the run's Secrets."""
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeKube(run_pods=True, watch_timeout=1.0) as fake:
        monkeypatch.setenv("KUBECONFIG", fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
        fake.create_secret(NS, "api", {"DF_API_KEY": "test-key-not-secret"})
        fake.create_secret(
            NS, "s3", {"AWS_ACCESS_KEY_ID": s3_env.access_key, "AWS_SECRET_ACCESS_KEY": s3_env.secret_key}
        )
        yield fake


def test_submit_wait_report_then_report_from_the_s3_output(
    cluster, s3_bucket, fake_api, api_key, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(
        cli,
        [
            "submit",
            "--pipeline",
            "caption",
            "--input",
            str(VQA_MANIFEST),
            "--image-root",
            str(DATAFLOW_ROOT),
            "--output",
            output,
            "--api-key-secret",
            "api/DF_API_KEY",
            "--s3-secret",
            "s3",
            "--service-account",
            "dfk8s-reducer",
            "--run-id",
            "k1",
            "--shards",
            "2",
            "--api-url",
            fake_api.url + "/v1",
            "--model",
            "gpt-5-nano",
            "--wait",
            "--poll-seconds",
            "0.2",
            "--report",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[0] == "k1" and f"{output}/k1/report.html" in out and out[-1].startswith("http://127.0.0.1:")
    local = tmp_path / "report-k1" / "report.html"
    assert str(local) in out
    with chromium() as browser, open_page(browser, local.as_uri()) as opened:
        shown = cards(opened.page)
        assert [c["pos"] for c in shown] == list(range(8))
        # The inputs were staged to S3 (run:staged/...): their thumbnails came from there.
        assert sum(c["inputs"] for c in shown) == 4 and sum(c["missing"] for c in shown) == 4
        assert all(i["width"] > 0 for i in images(opened.page)) and not opened.blocked
    # Later, from anywhere: the run's S3 output is enough (no Jobs needed), and the command was printed.
    plain = CliRunner().invoke(cli, ["submit", "--help"])
    assert "--report" in plain.stdout
    again = CliRunner().invoke(cli, ["report", "k1", "--output", output, "--presign", "--rows", "3"])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0] == f"{output}/k1/report.html"
    assert "report: 3 of 8 rows (1 failed)" in again.stderr
    assert Path(local).exists()  # --presign leaves the local copy alone


def test_submit_wait_prints_the_report_command(cluster, s3_bucket, fake_api, api_key, tmp_path):
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(
        cli,
        [
            "submit",
            "--pipeline",
            "vqa",
            "--input",
            str(VQA_MANIFEST),
            "--image-root",
            str(DATAFLOW_ROOT),
            "--output",
            output,
            "--api-key-secret",
            "api/DF_API_KEY",
            "--s3-secret",
            "s3",
            "--service-account",
            "dfk8s-reducer",
            "--run-id",
            "k2",
            "--api-url",
            fake_api.url + "/v1",
            "--model",
            "gpt-5-nano",
            "--wait",
            "--poll-seconds",
            "0.2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"report: dfk8s report k2 --output {output}" in result.stderr
    assert "report.html" not in result.stdout
