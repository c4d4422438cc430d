"""The circuit breaker: a run whose first requests all fail the same way stops after a handful.

Each systematic cause is tried through the real openai SDK and through the lean path, against the fake
server, with request counts; the stopped run keeps its unsent rows unprocessed and resumes.
"""

import json
import socket
import subprocess
import sys
import time

import pytest

from dfk8s.errors import SystematicFailure
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.run import layout
from dfk8s.worker.shard import process_shard, read_parts

CLIENTS = ("fast", "sdk")
ROWS = 300


def _manifest(tmp_path, n=ROWS):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "conversation": [{"from": "human", "value": f"q{i}"}]}) + "\n")
    return path


def _plan(tmp_path, api_url, client, run_id="b", **options):
    request = RunRequest(pipeline="vqa", input=str(_manifest(tmp_path)), output=str(tmp_path), run_id=run_id,
                         shards=1, options={"api_url": api_url, "client": client, "max_concurrency": 64,
                                            "max_retries": 2, **options})
    storage, _, _ = prepare_run(request)
    return storage, request


def _trip(storage):
    with pytest.raises(SystematicFailure) as info:
        process_shard(storage, 0)
    return info.value


def _finished(storage):
    return read_parts(storage, 0)[0]


def _status(tmp_path, run_id, *flags):
    from click.testing import CliRunner

    from dfk8s.cli import cli

    result = CliRunner().invoke(cli, ["status", run_id, "--output", str(tmp_path), *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in flags else result.stdout


@pytest.mark.parametrize("client", CLIENTS)
def test_misspelled_model_sends_a_handful_then_resumes_every_row(tmp_path, fake_api, api_key, client):
    fake_api.configure(models="gpt-4o-mini", latency=0.02)
    storage, request = _plan(tmp_path, fake_api.url, client, model="gpt-4o-mni")
    failure = _trip(storage)
    assert failure.type == "ModelNotFound" and "gpt-4o-mni" in failure.message and "--model" in failure.hint
    assert fake_api.stats()["requests_total"] <= 5  # not 300
    assert _finished(storage) == {}  # no error record: every row stays unprocessed, so a resume sends it
    breaker = storage.read_json(layout.BREAKER_KEY)
    assert breaker["shard"] == 0 and breaker["type"] == "ModelNotFound" and "--model" in breaker["hint"]
    assert not storage.exists(layout.shard_done_key(0))
    status = _status(tmp_path, "b")  # dfk8s status says why the run stopped
    assert "stopped by the circuit breaker (shard 0): every request failed with ModelNotFound" in status
    assert _status(tmp_path, "b", "--json")["breaker"] == breaker

    # Per run: while breaker.json is there, another shard (or worker) does not start at all.
    before = fake_api.stats()["requests_total"]
    assert _trip(storage).type == "ModelNotFound"
    assert fake_api.stats()["requests_total"] == before

    fake_api.configure(models="")  # the endpoint now serves the name (the fix), and the run resumes
    request.input = None
    storage, _, resumed = prepare_run(request)
    assert resumed and not storage.exists(layout.BREAKER_KEY)
    assert _status(tmp_path, "b", "--json")["breaker"] is None
    stats = process_shard(storage, 0)
    assert stats.ok == ROWS and stats.failed == 0
    assert fake_api.stats()["requests_total"] - before == ROWS  # each row once


@pytest.mark.parametrize("client", CLIENTS)
def test_bad_key_trips_on_the_first_401(tmp_path, fake_api, api_key, client):
    fake_api.configure(api_key="the-right-key")
    storage, _ = _plan(tmp_path, fake_api.url, client)
    failure = _trip(storage)
    assert failure.type == "AuthenticationError" and "Incorrect API key provided" in failure.message
    assert api_key not in str(failure) and "DF_API_KEY" in failure.hint
    assert fake_api.stats()["requests_total"] <= 5


@pytest.mark.parametrize("client", CLIENTS)
def test_bad_endpoint_path_is_named(tmp_path, fake_api, api_key, client):
    storage, _ = _plan(tmp_path, fake_api.url + "/proxy/v1", client)
    failure = _trip(storage)
    assert failure.type == "NotFound" and "--api-url" in failure.hint
    assert fake_api.stats()["requests_total"] == 0  # the fake counts only the API routes it serves


@pytest.mark.parametrize("client", CLIENTS)
def test_a_400_that_repeats_verbatim_trips_after_a_few(tmp_path, fake_api, api_key, client):
    proxy = {"error": {"message": "Upstream refused the request shape.", "type": "invalid_request",
                       "param": "None", "code": "400"}}
    fake_api.fail_model("gpt-4o-mini", 400, proxy)
    storage, _ = _plan(tmp_path, fake_api.url, client)
    failure = _trip(storage)
    assert failure.type == "BadRequest" and "Upstream refused" in failure.message
    assert "LiteLLM" in failure.hint
    sent = fake_api.stats()["requests_total"]
    assert 5 <= sent <= 10
    # The rows that failed with the error the breaker stopped on go with the unprocessed ones: no row is
    # final, so a resume (or one `dfk8s retry`) after the fix sends them all.
    assert _finished(storage) == {}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("answer", "kind", "flag"), [
    ({"message": "Authentication Error, No connected db.", "type": "no_db_connection", "code": "400"},
     "AuthenticationError", "API key"),
    ({"message": "{'error': '/chat/completions: Invalid model name passed in model=gpt-4o-mni. Call "
                 "`/v1/models` to view available models for your key.'}", "type": "None", "code": "400"},
     "ModelNotFound", "--model")])
def test_a_gateways_own_400_names_the_key_or_the_model_at_once(tmp_path, fake_api, api_key, client, answer,
                                                               kind, flag):
    # LiteLLM (no database) answers a key it does not know, and a model it does not route, with its own 400.
    fake_api.fail_model("gpt-4o-mini", 400, {"error": {**answer, "param": "None"}})
    storage, _ = _plan(tmp_path, fake_api.url, client)
    failure = _trip(storage)
    assert failure.type == kind and flag in failure.hint
    assert fake_api.stats()["requests_total"] <= 4  # the probe's requests, not five in a row


@pytest.mark.parametrize("client", CLIENTS)
def test_some_failures_then_success_do_not_trip(tmp_path, fake_api, api_key, client):
    path = tmp_path / "m.jsonl"
    with path.open("w") as f:
        for i in range(40):
            text = f"q{i} [[500]]" if i < 4 else f"q{i}"
            f.write(json.dumps({"conversation": [{"from": "human", "value": text}]}) + "\n")
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", input=str(path), output=str(tmp_path), run_id="ok",
                                           options={"api_url": fake_api.url, "client": client,
                                                    "max_retries": 0}))
    stats = process_shard(storage, 0)
    assert stats.ok == 36 and stats.failed == 4 and not storage.exists(layout.BREAKER_KEY)


@pytest.fixture
def no_dns(monkeypatch):
    """Names under .invalid do not resolve, answered here rather than by a DNS server.

    A stand-in: the only resolver this machine has is off loopback, where tests may not send traffic.
    """
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, (str, bytes)) and str(host).rstrip(".").endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("client", CLIENTS)
def test_unresolvable_host_fails_fast_as_a_dns_error(tmp_path, api_key, client, no_dns):
    storage, _ = _plan(tmp_path, "http://api.nowhere.invalid/v1", client, timeout=60, max_retries=5)
    started = time.monotonic()
    failure = _trip(storage)
    assert failure.type == "DNSError" and "api.nowhere.invalid" in failure.message
    assert "Timeout" not in str(failure) and "host name" in failure.hint
    assert time.monotonic() - started < 20  # no minutes of retries


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("client", CLIENTS)
def test_connection_refused_trips_as_fast_as_an_unknown_host(tmp_path, api_key, client):
    # Before anything answered, a refused connection is a wrong host or port: no retries with backoff
    # (they took 35 s), it trips at once and names the cause.
    storage, _ = _plan(tmp_path, f"http://127.0.0.1:{_closed_port()}/v1", client, max_retries=5)
    started = time.monotonic()
    failure = _trip(storage)
    assert time.monotonic() - started < 5
    assert failure.type == "ConnectionRefused" and "127.0.0.1" in failure.message
    assert "port" in failure.hint
    assert _finished(storage) == {}  # nothing was answered: every row stays unprocessed


def test_dfk8s_run_with_a_misspelled_model_stops_the_whole_run(tmp_path, fake_api, api_key):
    fake_api.configure(models="gpt-4o-mini", latency=0.05)
    manifest = _manifest(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "-i", str(manifest), "-o", str(tmp_path / "o"),
         "--run-id", "typo", "--api-url", fake_api.url, "--model", "gpt-4o-mni", "--workers", "2",
         "--rows-per-shard", "50", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert fake_api.stats()["requests_total"] <= 2 * 5  # a probe per worker, not 300 rows
    summary = json.loads((tmp_path / "o" / "typo" / layout.SUMMARY_KEY).read_text())
    assert summary["ok"] == 0 and summary["not_processed"] == ROWS


def test_one_retry_with_the_fix_finishes_a_run_the_breaker_stopped(tmp_path, fake_api, api_key):
    fake_api.configure(models="gpt-4o-mini", latency=0.05)
    manifest = _manifest(tmp_path)
    output = str(tmp_path / "o")
    base = [sys.executable, "-m", "dfk8s"]
    stopped = subprocess.run([*base, "run", "-p", "vqa", "-i", str(manifest), "-o", output, "--run-id", "fix",
                              "--api-url", fake_api.url, "--model", "gpt-4o-mni", "--workers", "2",
                              "--rows-per-shard", "50", "--no-progress"], capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 42 and "check --model" in stopped.stderr
    assert f"dfk8s retry fix -o {output} --model" in stopped.stderr  # the next step, in one command
    fixed = subprocess.run([*base, "retry", "fix", "-o", output, "--model", "gpt-4o-mini", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr
    summary = json.loads((tmp_path / "o" / "fix" / layout.SUMMARY_KEY).read_text())
    assert summary["ok"] == ROWS and summary["failed"] == 0 and summary["not_processed"] == 0
