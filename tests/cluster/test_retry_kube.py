"""`dfk8s retry RUN -o s3://... --no-run`, then `dfk8s submit --run-id RUN`: the failed rows, on Kubernetes.

The run is submitted to the real control plane (tests/cluster/conftest.py); its pods run on the real
kubelet, from the CPU image, against SeaweedFS and the fake OpenAI server. Chosen rows carry the fake's
counted triggers (``[[500x4]]``: that request fails four times, then succeeds), so they fail in the first
run and succeed in the retry only with the retry's higher ``--max-retries``. Requests are counted at the
fake, per row.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import SpecError
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.cluster.conftest import CREDENTIALS, NS
from tests.conftest import DATAFLOW_ROOT

#: Row texts: row 1 and 5 fail four times with 500, row 2 twice with 429, row 4 is refused (not
#: retryable), row 6's image does not exist (an error record at plan time, never sent).
TEXTS = ["", " [[500x4]]", " [[429x2]]", "", " [[refuse]]", " [[500x4]]", "", ""]
MISSING_IMAGE_ROW = 6


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _manifest(tmp_path):
    rows = []
    for i, tag in enumerate(TEXTS):
        image = "./static/images/Face.jpg" if i == MISSING_IMAGE_ROW else "./dataflow/example/vqa/ggbond.png"
        rows.append(
            {
                "id": f"row-{i}",
                "image": [image],
                "conversation": [{"from": "human", "value": f"<image>\nDescribe picture row-{i}.{tag}"}],
            }
        )
    path = tmp_path / "flaky.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cluster_flags(*extra):
    return [
        *CREDENTIALS,
        "--wait",
        "--poll-seconds",
        "0.5",
        "--no-progress",
        *extra,
    ]


def _sent(fake_api, since=0):
    """Requests per row (``row-N`` -> count) and the models they named, from the fake's request log."""
    counts: dict[str, int] = {}
    models = set()
    for entry in fake_api.requests():
        if entry["seq"] <= since:
            continue
        row = next(f"row-{i}" for i in range(len(TEXTS)) if f"row-{i}." in entry["prompt"])
        counts[row] = counts.get(row, 0) + 1
        models.add(entry["model"])
    return counts, models


def _last_seq(fake_api):
    return max((e["seq"] for e in fake_api.requests()), default=0)


def test_retry_no_run_then_submit_sends_only_the_retryable_failed_rows(
    kube_env, s3_bucket, fake_api, tmp_path, monkeypatch, run_id
):
    cluster = kube_env
    # This shell has no API key: the pods get theirs from the Secret, and a retry sends nothing itself.
    for name in ("DF_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    fake_api.configure(retry_after=0)
    output = f"s3://{s3_bucket}/runs"
    first = invoke(
        "submit",
        "--pipeline",
        "caption",
        "--input",
        _manifest(tmp_path),
        "--image-root",
        DATAFLOW_ROOT,
        "--id-key",
        "id",
        "--output",
        output,
        "--run-id",
        run_id,
        "--shards",
        "3",
        "--parallelism",
        "3",
        "--api-url",
        fake_api.url + "/v1",
        "--model",
        "gpt-5-nano",
        "--max-retries",
        "1",
        *_cluster_flags(),
    )
    assert first.exit_code == 0, first.output + cluster.pod_logs(NS)
    assert "8 rows: 3 ok, 5 failed" in first.stderr
    sent, models = _sent(fake_api)
    # One request per good row, two (--max-retries 1) for each faulty one; none for the missing image.
    assert sent == {"row-0": 1, "row-1": 2, "row-2": 2, "row-3": 1, "row-4": 1, "row-5": 2, "row-7": 1}
    assert models == {"gpt-5-nano"}
    storage = open_storage(output).child(run_id)
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert [(r.get("error") or {}).get("type") for r in rows[:6]] == [
        None,
        "ServerError",
        "RateLimited",
        None,
        "Refusal",
        "ServerError",
    ]
    assert "error" in rows[MISSING_IMAGE_ROW] and "caption" in rows[7]

    # The retry reopens the rows on S3 and records the changed options; it runs nothing here.
    before = _last_seq(fake_api)
    retry = invoke("retry", run_id, "-o", output, "--no-run", "--max-retries", "2", "--model", "gpt-5-mini")
    assert retry.exit_code == 0, retry.output
    assert f"run {run_id}: retrying 3 rows in 2 shards (RateLimited 1, ServerError 2)" in retry.stderr
    assert "model gpt-5-nano -> gpt-5-mini" in retry.stderr and "max_retries 1 -> 2" in retry.stderr
    hint = next(line for line in retry.stderr.splitlines() if line.startswith("reopened"))
    assert f"dfk8s cancel {run_id}" in hint and f"dfk8s submit --run-id {run_id} --output {output}" in hint
    assert _last_seq(fake_api) == before

    # A resume through submit with a flag that differs from run.json is refused in one line, before any
    # Job is created (the Jobs of the first run are gone first, so nothing else stands in the way).
    assert invoke("cancel", run_id).exit_code == 0
    cluster.wait_for(
        lambda: all(cluster.job(NS, f"dfk8s-{run_id}-{c}") is None for c in ("map", "reduce")),
        what="the first run's Jobs to go",
    )
    changed = invoke("submit", "--run-id", run_id, "--output", output, "--model", "gpt-4o", *_cluster_flags())
    assert isinstance(changed.exception, SpecError), changed.output
    message = str(changed.exception)
    assert "\n" not in message and "--model gpt-4o differs" in message and f"dfk8s retry {run_id}" in message
    assert cluster.job(NS, f"dfk8s-{run_id}-map") is None

    # The hint's command: no --pipeline, --input or serving flag (run.json knows them).
    resumed = invoke("submit", "--run-id", run_id, "--output", output, *_cluster_flags())
    assert resumed.exit_code == 0, resumed.output + cluster.pod_logs(NS)
    assert f"run {run_id}: resumed 8 rows in 3 shards" in resumed.stderr
    assert "8 rows: 6 ok, 2 failed" in resumed.stderr
    sent, models = _sent(fake_api, since=before)
    # Row 1 and 5 fail twice more and pass on the third try, which --max-retries 2 allows; row 2 passes
    # at once. Rows that succeeded, the refusal and the missing image are never sent again.
    assert sent == {"row-1": 3, "row-2": 1, "row-5": 3}, sent
    assert models == {"gpt-5-mini"}
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(len(TEXTS))]
    assert [("caption" in r) for r in rows] == [True, True, True, True, False, True, False, True]
    assert rows[4]["error"]["type"] == "Refusal" and "error" in rows[MISSING_IMAGE_ROW]
    summary = storage.read_json(layout.SUMMARY_KEY)
    assert summary["complete"] and (summary["ok"], summary["failed"]) == (6, 2)

    spec = storage.read_json(layout.RUN_SPEC_KEY)
    assert spec["options"]["model"] == "gpt-5-mini" and spec["options"]["max_retries"] == 2
    (entry,) = [h for h in spec["history"] if h["action"] == "retry"]
    assert entry["changes"] == {"model": ["gpt-5-nano", "gpt-5-mini"], "max_retries": [1, 2]}
    assert entry["rows"] == 3 and entry["shards"] == [0, 1]
    assert entry["by_type"] == {"ServerError": 2, "RateLimited": 1}
    invoke("cancel", run_id)
