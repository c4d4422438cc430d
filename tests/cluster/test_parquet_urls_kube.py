"""A LAION-style Parquet of image URLs through `dfk8s submit` as through `dfk8s run` (issue 11, done means).

The README's command, ``dfk8s run --pipeline caption --input laion-part-00000.parquet --image-key url
--prompt "Describe the image." --limit 100``, and the same rows submitted to the real control plane
(tests/cluster/conftest.py): the Parquet read here (or from s3://) and planned onto SeaweedFS, the URLs left
as they are (not staged), and the pods (on the real kubelet) fetch them from an image server on the node's
private IP (hence ``--allow-private-image-hosts``). Each row's image has a size of its own, which the
fake's caption echoes, so a row that got another row's image, or a row out of place, shows.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.cluster.conftest import CREDENTIALS, NS
from tests.cluster.sandbox import NODE_IP
from tests.image_server import ImageServer

ROWS, LIMIT = 120, 100
MISSING = {5, 50}  # a 404 at fetch time: ImageFetchError records
NO_URL = 30  # no image at all: an error record at plan time, never fetched


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def images():
    with ImageServer(NODE_IP) as server:
        yield server


def _size(i: int) -> tuple[int, int]:
    return 8 + i % 40, 8 + i // 40


def _url(images, i: int) -> str | None:
    if i == NO_URL:
        return None
    return (
        f"{images.url}/missing.png" if i in MISSING else f"{images.url}/sized/{_size(i)[0]}x{_size(i)[1]}.png"
    )


def _parquet(path, images):
    table = pa.table(
        {
            "key": [f"k{i:03d}" for i in range(ROWS)],
            "url": [_url(images, i) for i in range(ROWS)],
            "TEXT": [f"laion alt text {i}" for i in range(ROWS)],
        }
    )
    pq.write_table(table, path, row_group_size=25)
    return path


def _flags(fake_api):
    return [
        "--pipeline",
        "caption",
        "--image-key",
        "url",
        "--id-key",
        "key",
        "--prompt",
        "Describe the image.",
        "--limit",
        LIMIT,
        "--api-url",
        fake_api.url + "/v1",
        "--model",
        "gpt-5-nano",
        "--allow-private-image-hosts",
        "--no-progress",
    ]


def _hits(images) -> dict[str, int]:
    return {path: len(times) for path, times in images.hits.items()}


def _fetched_since(before: dict[str, int], images) -> dict[str, int]:
    now = _hits(images)
    return {path: n - before.get(path, 0) for path, n in now.items() if n != before.get(path, 0)}


def _expected_fetches(images) -> dict[str, int]:
    """One GET per planned row with a URL (a 404 is not retried); none past --limit."""
    expected: dict[str, int] = {}
    for i in range(LIMIT):
        url = _url(images, i)
        if url:
            path = url.removeprefix(images.url)
            expected[path] = expected.get(path, 0) + 1
    return expected


@pytest.mark.parametrize("source", ["local", "s3"])
def test_a_parquet_of_urls_submitted_gives_what_run_gives(
    kube_env, s3_bucket, fake_api, api_key, images, tmp_path, run_id, source
):
    cluster = kube_env
    manifest = _parquet(tmp_path / "laion-part-00000.parquet", images)

    # The README's local command, the baseline.
    before = _hits(images)
    local = invoke(
        "run", *_flags(fake_api), "--input", manifest, "--output", tmp_path / "runs", "--run-id", "here"
    )
    assert local.exit_code == 0, local.output
    assert f"{LIMIT} rows: {LIMIT - 3} ok, 3 failed" in local.stderr
    assert _fetched_since(before, images) == _expected_fetches(images)
    local_rows = [json.loads(line) for line in (tmp_path / "runs/here/result.jsonl").read_text().splitlines()]
    sent_locally = fake_api.stats()["requests_total"]
    assert sent_locally == LIMIT - 3

    # The same rows through submit: read from this disk, or from S3.
    if source == "s3":
        data = open_storage(f"s3://{s3_bucket}/data")
        data.write_file("laion-part-00000.parquet", str(manifest))
        manifest = data.url("laion-part-00000.parquet")
    output = f"s3://{s3_bucket}/runs"
    before = _hits(images)
    submitted = invoke(
        "submit",
        *_flags(fake_api),
        "--input",
        manifest,
        "--output",
        output,
        "--run-id",
        run_id,
        "--shards",
        "3",
        "--parallelism",
        "3",
        *CREDENTIALS,
        "--wait",
        "--poll-seconds",
        "0.5",
    )
    assert submitted.exit_code == 0, submitted.output + cluster.pod_logs(NS)
    assert f"run {run_id}: planned {LIMIT} rows in 3 shards" in submitted.stderr
    assert f"{LIMIT} rows: {LIMIT - 3} ok, 3 failed" in submitted.stderr
    # Planning fetched nothing and staged nothing: the pods fetched every URL themselves, once.
    storage = open_storage(output).child(run_id)
    assert not list(storage.list(layout.STAGED_PREFIX))
    assert _fetched_since(before, images) == _expected_fetches(images)
    assert fake_api.stats()["requests_total"] - sent_locally == LIMIT - 3
    pods = cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=map")
    assert len(pods) == 3 and all(p["status"]["phase"] == "Succeeded" for p in pods)

    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert rows == local_rows  # same rows, same order, same shapes, every row once
    assert [r["key"] for r in rows] == [f"k{i:03d}" for i in range(LIMIT)]
    for i, row in enumerate(rows):
        if i in MISSING:
            assert row["error"]["type"] == "ImageFetchError" and row["error"]["status"] == 404
        elif i == NO_URL:
            assert "error" in row and "caption" not in row
        else:
            width, height = _size(i)
            assert f"images: 1, {width}x{height} png" in row["caption"], row
            assert row["TEXT"] == f"laion alt text {i}" and row["url"] == _url(images, i)
    spec = storage.read_json(layout.RUN_SPEC_KEY)
    assert spec["limit"] == LIMIT and spec["rows"] == LIMIT and spec["input"] == str(manifest)
    invoke("cancel", run_id)
