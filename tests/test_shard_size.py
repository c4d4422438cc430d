"""Default shard sizes come from the work: rows, workers or pods, the serving's concurrency and latency."""

import json
import math

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.inputs.manifest import count_rows
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.plan.sizing import MAX_ROWS_PER_SHARD, default_shard_size, estimate_rows


def _manifest(tmp_path, n, *, trailing_newline=True, name="m.jsonl"):
    path = tmp_path / name
    text = "\n".join(json.dumps({"conversation": [{"from": "human", "value": f"q{i}"}]}) for i in range(n))
    path.write_text(text + ("\n" if trailing_newline else ""))
    return path


@pytest.mark.parametrize("workers", [1, 4])
def test_every_local_worker_gets_several_shards(tmp_path, workers):
    request = RunRequest(pipeline="vqa", input=str(_manifest(tmp_path, 5000)), output=str(tmp_path / "o"),
                         run_id="s", parallelism=workers)
    _, spec, _ = prepare_run(request)
    assert spec.shards == 4 * workers and spec.rows == 5000
    assert spec.rows_per_shard == math.ceil(5000 / (4 * workers))


def test_a_pod_runs_for_minutes_not_seconds():
    # A million caption rows on 8 pods: 64 requests in flight at ~3 s each = ~21 rows/s a pod.
    sized = default_shard_size(1_000_000, "openai-chat", {}, 8, "kubernetes")
    assert sized.shards == 32 and sized.seconds_per_shard > 20 * 60
    # 5,000 rows on 8 pods: rather fewer pods than pods that live a few seconds each.
    small = default_shard_size(5_000, "openai-chat", {}, 8, "kubernetes")
    assert small.seconds_per_shard >= 5 * 60 or small.shards == 1
    local = default_shard_size(5_000, "openai-chat", {}, 8, "local")
    assert local.shards >= 8  # on this machine every worker gets a shard


def test_the_rate_follows_concurrency_latency_rpm_and_the_gpu():
    fast = default_shard_size(100_000, "openai-chat", {"max_concurrency": 256}, 1, "kubernetes")
    slow = default_shard_size(100_000, "openai-chat", {"max_concurrency": 4}, 1, "kubernetes")
    assert fast.rows_per_second == pytest.approx(256 / 3.0) and slow.rows_per_second == pytest.approx(4 / 3.0)
    assert fast.rows_per_shard > slow.rows_per_shard
    limited = default_shard_size(100_000, "openai-chat", {"rpm": 60}, 2, "kubernetes")
    assert limited.rows_per_second == pytest.approx(0.5)  # 60/min shared by 2 pods
    flux = default_shard_size(400, "diffusers", {}, 1, "local")
    assert flux.shards == 4 and flux.rows_per_second == pytest.approx(1 / 15.0)
    assert "15 s per row" in flux.rule and "4 shards per worker" in flux.rule
    huge = default_shard_size(10_000_000, "echo", {}, 1, "local")
    assert huge.rows_per_shard == MAX_ROWS_PER_SHARD


def test_explicit_sizes_still_win(tmp_path):
    manifest = str(_manifest(tmp_path, 5000))
    _, by_rows, _ = prepare_run(RunRequest(pipeline="vqa", input=manifest, output=str(tmp_path / "a"),
                                           run_id="a", rows_per_shard=1000))
    _, by_count, _ = prepare_run(RunRequest(pipeline="vqa", input=manifest, output=str(tmp_path / "b"),
                                            run_id="b", shards=3))
    assert (by_rows.shards, by_rows.rows_per_shard) == (5, 1000)
    assert (by_count.shards, by_count.rows_per_shard) == (3, 1667)


@pytest.mark.parametrize("trailing", [True, False])
def test_row_estimate_matches_the_manifest(tmp_path, trailing):
    path = _manifest(tmp_path, 1234, trailing_newline=trailing)
    assert estimate_rows(str(path)) == count_rows(str(path)) == 1234
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"conversation": [{"from": "human", "value": "x"}]}] * 7))
    assert estimate_rows(str(array)) == 7


def test_help_and_dry_run_state_the_rule(tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200)
    assert "about 4 shards per worker" in " ".join(result.output.split())
    manifest = _manifest(tmp_path, 5000)
    result = CliRunner().invoke(cli, [
        "submit", "-p", "vqa", "-i", str(manifest), "-o", "s3://bucket/runs", "--dry-run",
        "--namespace", "ns", "--api-key-secret", "k/DF_API_KEY", "--parallelism", "2"])
    assert result.exit_code == 0, result.output
    assert "shard size: ~" in result.output
    assert "per shard; default rule: about 4 shards per pod" in result.output
