"""dfk8s report for a Kubernetes run (staged images on S3): submit --wait --report, and report afterwards.

Against the real control plane (tests/cluster/conftest.py); the pods run on the real kubelet.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from dfk8s.cli import cli
from tests.cluster.conftest import CREDENTIALS
from tests.cluster.sandbox import NODE_IP
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST
from tests.report_browser import cards, chromium, images, open_page


def submit_args(output, pipeline, run_id, fake_api, *extra):
    return [
        "submit",
        "--pipeline",
        pipeline,
        "--input",
        str(VQA_MANIFEST),
        "--image-root",
        str(DATAFLOW_ROOT),
        "--output",
        output,
        *CREDENTIALS,
        "--run-id",
        run_id,
        "--api-url",
        fake_api.url + "/v1",
        "--model",
        "gpt-5-nano",
        "--wait",
        "--poll-seconds",
        "0.5",
        "--no-progress",
        *extra,
    ]


def test_submit_wait_report_then_report_from_the_s3_output(
    kube_env, s3_bucket, fake_api, api_key, tmp_path, monkeypatch, run_id
):
    monkeypatch.chdir(tmp_path)
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(
        cli, submit_args(output, "caption", run_id, fake_api, "--shards", "2", "--report")
    )
    assert result.exit_code == 0, result.output + kube_env.pod_logs("batch")
    out = result.stdout.splitlines()
    assert (
        out[0] == run_id
        and f"{output}/{run_id}/report.html" in out
        and out[-1].startswith(f"http://{NODE_IP}:")  # presigned, on the S3 endpoint
    )
    local = tmp_path / f"report-{run_id}" / "report.html"
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
    again = CliRunner().invoke(cli, ["report", run_id, "--output", output, "--presign", "--rows", "3"])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0] == f"{output}/{run_id}/report.html"
    assert "report: 3 of 8 rows (1 failed)" in again.stderr
    assert Path(local).exists()  # --presign leaves the local copy alone


def test_submit_wait_prints_the_report_command(kube_env, s3_bucket, fake_api, api_key, run_id):
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(cli, submit_args(output, "vqa", run_id, fake_api))
    assert result.exit_code == 0, result.output + kube_env.pod_logs("batch")
    assert f"report: dfk8s report {run_id} --output {output}" in result.stderr
    assert "report.html" not in result.stdout
