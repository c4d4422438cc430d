"""The CPU image end to end: a worker and a reducer container on a real S3 run, as a restricted pod runs them.

Run by ``make test-images``, which starts a private Docker daemon, builds the image and sets
``DFK8S_IMAGE_TESTS=1``; plain ``make test`` does not collect this file (tests/images/conftest.py).
A missing daemon or image is a failure, never a skip.

Everything on the host (SeaweedFS, the fake API) listens on 127.0.0.1 and the containers share the
host's network (``--network host``), as the private daemon has no bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid

import pytest

from dfk8s import __version__
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.ports import listen_port
from dfk8s.run import layout
from tests.conftest import DATAFLOW_ROOT, REPO, VQA_MANIFEST

IMAGE = os.environ.get("DFK8S_CPU_IMAGE", "dfk8s-cpu:dev")
UID = "10001"

# What the chart's pods get: non-root, read-only root filesystem with a writable /tmp, no capabilities,
# no privilege escalation.
RESTRICTED = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}",
              "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def _docker(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:8])} ... exited {result.returncode}\n"
                    f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def _run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``docker run --rm`` with the restricted flags; ``env`` is passed by name, so no value is on argv."""
    env = env or {}
    env_flags = [flag for name in env for flag in ("-e", name)]
    return _docker("run", "--rm", *RESTRICTED, *env_flags, *args, env=env, check=check)


def _assert_image_located(storage, got: list, want: list) -> None:
    """A result row names its image so it resolves from anywhere: a path the plan staged becomes the
    ``s3://`` URI of the staged copy (same bytes); a path it could not read stays as written."""
    assert len(got) == len(want) == 1
    source = DATAFLOW_ROOT / want[0]
    if not source.is_file():
        assert got == want
        return
    prefix = storage.url(layout.STAGED_PREFIX + "/")
    assert got[0].startswith(prefix), got
    staged = layout.STAGED_PREFIX + "/" + got[0][len(prefix):]
    assert storage.read_bytes(staged) == source.read_bytes()


def _lines(storage, key):
    return [json.loads(line) for line in storage.open_lines(key)]


@pytest.fixture(scope="module", autouse=True)
def docker_image():
    """Fail (not skip) when the daemon or the image is missing: the target promised to test them."""
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("the docker CLI is not installed: run `make test-images` (it installs docker.io)")
    if info.returncode != 0:
        pytest.fail(f"no Docker daemon answers (DOCKER_HOST={os.environ.get('DOCKER_HOST', '')!r}): "
                    f"{info.stderr.strip()}; `make test-images` starts one with hack/docker-up.sh")
    inspect = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, text=True,
                             timeout=30)
    if inspect.returncode != 0:
        pytest.fail(f"image {IMAGE} is missing: build it with `make image-cpu`")
    return json.loads(inspect.stdout)[0]


@pytest.fixture(scope="module")
def s3():
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed()
    server.create_bucket("images")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api():
    from dfk8s.testing.fake_api import FakeAPI, FakeConfig

    server = FakeAPI(FakeConfig())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def container_env(s3):
    """The environment a worker pod gets (from Secret references in the cluster)."""
    return {**s3.env(), "DF_API_KEY": "test-key-not-secret", "JOB_COMPLETION_INDEX": "0"}


def _plan(s3, api_url: str, run_id: str):
    """Plan a caption run of the VQA fixture on S3 with its images staged: containers see no host file."""
    saved = {name: os.environ.get(name) for name in s3.env()}
    os.environ.update(s3.env())
    try:
        return prepare_run(
            RunRequest(pipeline="caption", input=str(VQA_MANIFEST), image_root=str(DATAFLOW_ROOT),
                       output="s3://images/runs", run_id=run_id,
                       options={"api_url": api_url, "model": "gpt-5-nano", "max_concurrency": 4},
                       endpoint_url=s3.endpoint),
            stage_images=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def caption_run(s3, api):
    storage, spec, resumed = _plan(s3, api.url + "/v1", f"img-{uuid.uuid4().hex[:8]}")
    assert not resumed and spec.shards == 1 and spec.rows == 8
    return storage, spec


def test_image_runs_as_non_root_uid_10001_by_default(docker_image):
    assert docker_image["Config"]["User"] == f"{UID}:{UID}"
    assert docker_image["Config"]["Entrypoint"] == ["dfk8s"]
    # No --user here: the image's own default.
    result = _docker("run", "--rm", "--network", "host", "--entrypoint", "id", IMAGE)
    assert result.stdout.split()[:2] == [f"uid={UID}(dfk8s)", f"gid={UID}(dfk8s)"]


def test_version_matches_the_package():
    assert _run(IMAGE, "--version").stdout.strip() == f"dfk8s, version {__version__}"


def test_job_profiles_load_inside_the_image():
    """`dfk8s submit` in a launcher pod reads the profiles from /etc/dfk8s/jobs (the chart mounts over it)."""
    script = ("from dfk8s.kube.profiles import load_profile\n"
              "for name in ('caption', 'vqa', 'text2image', 'imageedit'):\n"
              "    print(load_profile(name).source)\n")
    result = _run("--entrypoint", "python", IMAGE, "-c", script)
    assert result.stdout.split() == [f"/etc/dfk8s/jobs/{name}.yaml"
                                     for name in ("caption", "vqa", "text2image", "imageedit")]
    # The wheel's own copy is there too, for a pip-installed dfk8s without /etc/dfk8s/jobs.
    listing = _run("--entrypoint", "ls", IMAGE, "/opt/dfk8s/share/dfk8s/jobs").stdout.split()
    assert listing == sorted(path.name for path in (REPO / "jobs").glob("*.yaml"))


def test_worker_container_finishes_the_shard_on_s3(s3, api, container_env, caption_run):
    storage, spec = caption_run
    result = _run(IMAGE, "worker", "--run", f"s3://images/runs/{spec.run_id}", env=container_env)
    assert "shard 0: 4 ok, 4 failed" in result.stderr, result.stderr[-2000:]

    rows = _lines(storage, layout.shard_output_key(0))
    original = json.loads(VQA_MANIFEST.read_text())
    assert len(rows) == 8
    for got, want in zip(rows, original, strict=True):
        assert got["conversation"] == want["conversation"]
        _assert_image_located(storage, got["image"], want["image"])
        if "Face.jpg" in want["image"][0]:
            assert "caption" not in got and got["error"]["type"] == "BadRow"
            assert "Face.jpg" in got["error"]["message"]
        else:
            assert got["caption"].startswith("fake caption:") and "error" not in got
    done = storage.read_json(layout.shard_done_key(0))
    assert (done["index"], done["rows"], done["ok"], done["failed"]) == (0, 8, 4, 4)
    assert done["failed_offsets"] == [0, 2, 4, 6]
    # The four good rows reached the fake API from inside the container, each with the staged PNG.
    sent = api.requests()
    assert len(sent) == 4 and all(req["image_mimes"] == ["image/png"] for req in sent)
    assert all(req["body"]["model"] == "gpt-5-nano" for req in sent)


def test_reducer_container_writes_the_ordered_result(s3, container_env, caption_run):
    storage, spec = caption_run
    if not storage.exists(layout.shard_done_key(0)):
        _run(IMAGE, "worker", "--run", f"s3://images/runs/{spec.run_id}", env=container_env)
    result = _run(IMAGE, "reduce", f"s3://images/runs/{spec.run_id}", env=container_env)
    assert "8 rows: 4 ok, 4 failed" in result.stderr, result.stderr[-2000:]

    rows = _lines(storage, layout.RESULT_KEY)
    original = json.loads(VQA_MANIFEST.read_text())
    assert len(rows) == 8
    for got, want in zip(rows, original, strict=True):
        assert got["conversation"] == want["conversation"]
        _assert_image_located(storage, got["image"], want["image"])
        if "Face.jpg" in want["image"][0]:
            assert "caption" not in got and got["error"]["type"] == "BadRow"
        else:
            assert got["caption"].startswith("fake caption:") and "error" not in got
    assert [e["pos"] for e in _lines(storage, layout.ERRORS_KEY)] == [0, 2, 4, 6]
    summary = storage.read_json(layout.SUMMARY_KEY)
    assert (summary["rows"], summary["ok"], summary["failed"], summary["complete"]) == (8, 4, 4, True)
    assert "test-key-not-secret" not in storage.read_bytes(layout.RUN_SPEC_KEY).decode()


def test_worker_container_without_api_key_exits_42(s3, api, container_env):
    """Missing credentials: the pod must say 'do not retry' (exit 42), so the Job fails the index at once."""
    storage, spec, _ = _plan(s3, api.url + "/v1", f"nokey-{uuid.uuid4().hex[:8]}")
    env = {name: value for name, value in container_env.items() if name != "DF_API_KEY"}
    result = _run(IMAGE, "worker", "--run", f"s3://images/runs/{spec.run_id}", env=env, check=False)
    assert result.returncode == 42, result.stderr[-2000:]
    assert "DF_API_KEY" in result.stderr
    assert not storage.exists(layout.shard_done_key(0))


def test_fake_api_command_of_the_chart_serves_from_the_image():
    """The chart's fake-api Deployment runs `python -m dfk8s.testing.fake_api` from this image."""
    port = listen_port()
    name = f"dfk8s-test-fake-api-{uuid.uuid4().hex[:8]}"
    _docker("run", "-d", "--name", name, *RESTRICTED, "--entrypoint", "python", IMAGE,
            "-m", "dfk8s.testing.fake_api", "--host", "127.0.0.1", "--port", str(port))
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", name)
    finally:
        _docker("rm", "-f", name, check=False)


def test_seaweedfs_of_the_chart_runs_from_the_image():
    """The chart's SeaweedFS Deployment runs `weed server -s3` from this image, read-only, as uid 10001."""
    from tests.helpers.seaweed import SeaweedS3, server_ports

    ports = server_ports("127.0.0.1")
    name = f"dfk8s-test-weed-{uuid.uuid4().hex[:8]}"
    # The chart's flags, plus loopback addresses and free ports: this container shares the host network.
    _docker("run", "-d", "--name", name, *RESTRICTED, "--tmpfs", f"/data:uid={UID},gid={UID}",
            "--workdir", "/data", "-e", "HOME=/tmp", "--entrypoint", "weed", IMAGE,
            "server", "-s3", f"-s3.port={ports['s3']}", "-dir=/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", "-s3.port.iceberg=0", "-s3.port.lance=0")
    try:
        server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", process=None, data_dir="")
        deadline = time.monotonic() + 60
        while True:
            try:
                server.create_bucket("probe")
                client = server.client()
                client.put_object(Bucket="probe", Key="k", Body=b"hello")
                assert client.get_object(Bucket="probe", Key="k")["Body"].read() == b"hello"
                break
            except Exception as exc:
                if not _running(name) or time.monotonic() > deadline:
                    logs = _docker("logs", "--tail", "40", name, check=False)
                    pytest.fail(f"weed in the image did not serve S3 ({exc}):\n{logs.stdout}{logs.stderr}")
                time.sleep(0.5)
    finally:
        _docker("rm", "-f", name, check=False)


def _running(container: str) -> bool:
    state = _docker("inspect", "--format", "{{.State.Running}}", container, check=False)
    return state.stdout.strip() == "true"


def _wait_http(url: str, container: str, timeout: float = 60) -> None:
    # No proxy from the environment: the server is on this machine's loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url, timeout=2) as response:
                assert response.status == 200
                return
        except OSError as exc:
            if not _running(container) or time.monotonic() > deadline:
                logs = _docker("logs", "--tail", "40", container, check=False)
                pytest.fail(f"{url} did not answer ({exc}):\n{logs.stdout}{logs.stderr}")
            time.sleep(0.3)
