"""hack/kind-test.sh, checked without a cluster: syntax, shellcheck, its Helm values and object names
against the chart, its `dfk8s submit` flags against the CLI, and a whole run with stub kind / helm /
kubectl / docker commands, where the stub `dfk8s submit` runs the same request locally on real S3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED

SCRIPT = REPO / "hack" / "kind-test.sh"
HACK_SCRIPTS = sorted((REPO / "hack").glob("*.sh")) + sorted((REPO / "hack" / "cluster").glob("*.sh"))
CHART_DIR = REPO / "charts" / "dfk8s"
IMAGE_TESTS_ENV = "DFK8S_IMAGE_TESTS"


def _script_text() -> str:
    return SCRIPT.read_text()


def _script_setting(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", _script_text(), re.M)
    assert match, f"{name}= not found in {SCRIPT}"
    return match.group(1)


def _helm_sets() -> dict[str, str]:
    """The script's `--set key=value` pairs, values with the script's own variables filled in."""
    text = _script_text()
    pairs = dict(re.findall(r'--set "([A-Za-z0-9_.]+)=([^"]*)"', text))
    assert pairs, "no --set found in the script"
    variables = {"RELEASE": "dfk8s", "S3_PORT": "8333", "API_PORT": "8000", "API_KEY": "k",
                 "S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "s", "IMAGE%:*": "dfk8s-cpu", "IMAGE##*:": "dev"}
    return {key: re.sub(r"\$\{?([A-Za-z0-9_%:*#]+)\}?", lambda m: variables[m.group(1)], value)
            for key, value in pairs.items()}


@pytest.mark.parametrize("script", HACK_SCRIPTS, ids=lambda path: path.name)
def test_hack_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_hack_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get(IMAGE_TESTS_ENV) == "1":
            pytest.fail("shellcheck is missing (make test-images installs it with apt)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); make test-images runs this")
    result = subprocess.run(["shellcheck", "-x", *map(str, HACK_SCRIPTS)], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_helm_value_the_script_sets_exists_in_values_yaml():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for key in _helm_sets():
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: no {part!r} in values.yaml"
            node = node[part]
        assert not isinstance(node, dict), f"--set {key} would replace a whole section of values.yaml"


def test_the_names_the_script_uses_are_what_the_chart_renders():
    import helm_python

    values: dict = {}
    for key, value in _helm_sets().items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        # helm --set turns numbers and booleans into their types.
        node[leaf] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    chart = helm_python.Chart.load(str(CHART_DIR))
    try:
        manifests = chart.render(values, name="dfk8s", namespace="dfk8s-test")
    finally:
        chart.close()
    objects = [doc for path, text in manifests.items() if not path.endswith("NOTES.txt")
               for doc in yaml.safe_load_all(text) if doc]
    by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    release = _script_setting("RELEASE")
    s3 = by_name[("Service", _script_setting("S3_SERVICE").replace("$RELEASE", release))]
    assert s3["spec"]["ports"][0]["port"] == int(_script_setting("S3_PORT"))
    api = by_name[("Service", _script_setting("API_SERVICE").replace("$RELEASE", release))]
    assert api["spec"]["ports"][0]["port"] == int(_script_setting("API_PORT"))
    secret = by_name[("Secret", _script_setting("CREDENTIALS_SECRET").replace("$RELEASE", release))]
    assert {"DF_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
    assert ("ServiceAccount", _script_setting("REDUCER_ACCOUNT").replace("$RELEASE", release)) in by_name
    # The chart's pods run the image the script builds and loads, never pulled.
    for kind, name in (("Deployment", f"{release}-seaweedfs"), ("Deployment", f"{release}-fake-api")):
        container = by_name[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "dfk8s-cpu:dev" and container["imagePullPolicy"] == "Never"


def test_every_submit_flag_the_script_passes_exists():
    from dfk8s.cli import cli

    block = re.search(r"local submit_args=\((.*?)\n  \)", _script_text(), re.S)
    assert block, "submit_args=( ... ) not found in the script"
    used = set(re.findall(r"^\s+(--[a-z0-9-]+)", block.group(1), re.M))
    known = {opt for param in cli.commands["submit"].params for opt in (*param.opts, *param.secondary_opts)}
    assert used and used <= known, f"flags dfk8s submit does not have: {sorted(used - known)}"


# ---- a whole run with stub cluster tools --------------------------------------------------------

STUBS = {
    # kind: remembers whether the cluster exists in a file.
    "kind": """
        echo "kind $*" >>"$STUB_LOG"
        case "$1 $2" in
          "get clusters") [ -f "$STUB_DIR/cluster" ] && echo dfk8s-test; exit 0 ;;
          "create cluster") touch "$STUB_DIR/cluster" ;;
          "delete cluster") rm -f "$STUB_DIR/cluster" ;;
        esac
    """,
    # docker: answers info/inspect, records the build context it is sent.
    "docker": """
        echo "docker $*" >>"$STUB_LOG"
        case "$1" in
          build) tar -tf - >"$STUB_DIR/context.txt" ;;
          image) echo 572000000 ;;
          inspect) echo "127.0.0.1 " ;;  # the kind node's IP
        esac
    """,
    "helm": """
        echo "helm $*" >>"$STUB_LOG"
    """,
    # kubectl: port-forward "forwards" to the test's real S3 server and stays up until killed.
    "kubectl": """
        echo "kubectl $*" >>"$STUB_LOG"
        case " $* " in
          *" port-forward "*)
            echo $$ >"$STUB_DIR/port-forward.pid"
            echo "Forwarding from 127.0.0.1:$STUB_S3_PORT -> 8333"
            exec sleep 300 ;;
          *" get service "*) echo "$STUB_S3_PORT" ;;  # the NodePort
        esac
    """,
    # dfk8s: `submit` runs the same request with the local executor against the test's fake API.
    "dfk8s": """
        echo "dfk8s $*" >>"$STUB_LOG"
        [ "$1" = submit ] || exit 2
        shift
        if [ "$1" = --help ]; then
          [ -z "$STUB_NO_POD_FLAG" ] && echo "  --cluster-s3-endpoint URL  S3 endpoint of the pods"
          exit 0
        fi
        [ -n "$STUB_FAIL_SUBMIT" ] && exit 1
        args=()
        while [ $# -gt 0 ]; do
          case "$1" in
            --pipeline|--input|--image-root|--output|--run-id|--rows-per-shard|--model|--s3-endpoint)
              args+=("$1" "$2"); shift 2 ;;
            --api-url) args+=(--api-url "$STUB_API_URL"); shift 2 ;;
            --wait|--no-progress) shift ;;
            *) shift 2 ;;
          esac
        done
        DF_API_KEY=stub exec "$REAL_DFK8S" run --no-progress --workers 2 "${args[@]}"
    """,
}


@pytest.fixture
def stub_env(tmp_path, seaweed, fake_api):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_S3_PORT": seaweed.endpoint.rsplit(":", 1)[1],
        "STUB_API_URL": fake_api.url + "/v1",
        "REAL_DFK8S": str(Path(sys.executable).with_name("dfk8s")),
        "DFK8S": str(bin_dir / "dfk8s"),
        "PYTHON": sys.executable,
        "DFK8S_SHARED": str(SHARED),
        "DFK8S_BUILD_CA": "",
        "PIP_CERT": "",
    }
    for name in ("DOCKER_HOST", "DFK8S_KIND_KEEP", "AWS_ENDPOINT_URL", "STUB_FAIL_SUBMIT",
                 "STUB_NO_POD_FLAG"):
        env.pop(name, None)
    return env


def _calls(tmp_path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def _port_forward_stopped(tmp_path) -> bool:
    pid = int((tmp_path / "port-forward.pid").read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_kind_test_runs_end_to_end_with_stub_cluster_tools(tmp_path, stub_env, seaweed, fake_api):
    result = subprocess.run(["bash", str(SCRIPT), "test"], env=stub_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "result.jsonl: 8 rows in input order, 4 captions, 4 recorded errors" in result.stderr
    assert "kind test passed" in result.stderr
    calls = _calls(tmp_path)
    order = [calls.index(call) for call in ("kind create cluster --name dfk8s-test --wait 180s",
                                            "kind load docker-image dfk8s-cpu:dev --name dfk8s-test")]
    assert order == sorted(order)
    helm = next(call for call in calls if call.startswith("helm upgrade --install dfk8s "))
    for setting in ("seaweedfs.enabled=true", "fakeApi.enabled=true", "secret.create=true",
                    "image.repository=dfk8s-cpu", "image.tag=dev", "image.pullPolicy=Never"):
        assert f"--set {setting}" in helm
    submit = next(call for call in calls if call.startswith("dfk8s submit --pipeline"))
    for part in ("--api-url http://dfk8s-fake-api.dfk8s-test.svc:8000/v1",
                 "--api-key-secret dfk8s-credentials/DF_API_KEY", "--s3-secret dfk8s-credentials",
                 "--service-account dfk8s-reducer", "--image dfk8s-cpu:dev", "--context kind-dfk8s-test",
                 f"--s3-endpoint http://127.0.0.1:{stub_env['STUB_S3_PORT']}",
                 "--cluster-s3-endpoint http://dfk8s-seaweedfs.dfk8s-test.svc:8333", "--wait"):
        assert part in submit
    # The cluster this run created is deleted, and the port-forward stopped.
    assert calls[-1] == "kind delete cluster --name dfk8s-test"
    assert _port_forward_stopped(tmp_path)
    # The image is built from a context of only what it needs.
    context = set((tmp_path / "context.txt").read_text().split())
    assert {"pyproject.toml", "README.md", "dfk8s/cli/__init__.py", "jobs/caption.yaml",
            "images/cpu/Dockerfile",
            "images/build-ca/README.md"} <= context
    assert not [name for name in context if ".venv" in name or "__pycache__" in name or name.endswith(".pyc")]
    # The run really happened on S3: result.jsonl holds the fixture's rows in order.
    client = seaweed.client()
    run_ids = {key["Key"].split("/")[1] for key in client.list_objects_v2(Bucket="dfk8s-kind")["Contents"]}
    assert len(run_ids) == 1
    body = client.get_object(Bucket="dfk8s-kind", Key=f"runs/{run_ids.pop()}/result.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    manifest = json.loads((SHARED / "fixtures/dataflow-mm/dataflow/example/vqa/sample_data.json").read_text())
    assert [row["conversation"] for row in rows] == [row["conversation"] for row in manifest]


def test_kind_test_deletes_the_cluster_and_shows_the_pods_when_the_run_fails(tmp_path, stub_env):
    stub_env["STUB_FAIL_SUBMIT"] = "1"
    result = subprocess.run(["bash", str(SCRIPT), "test"], env=stub_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 1
    assert "kind test FAILED (exit 1)" in result.stderr
    calls = _calls(tmp_path)
    assert any(call.startswith("kubectl --context kind-dfk8s-test --namespace dfk8s-test get jobs,pods")
               for call in calls)
    assert calls[-1] == "kind delete cluster --name dfk8s-test"
    assert _port_forward_stopped(tmp_path)


def test_kind_test_keeps_a_cluster_it_did_not_create(tmp_path, stub_env):
    (tmp_path / "cluster").touch()  # made by `make kind-up` earlier
    stub_env["STUB_FAIL_SUBMIT"] = "1"
    result = subprocess.run(["bash", str(SCRIPT), "test"], env=stub_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 1
    calls = _calls(tmp_path)
    assert not any(call.startswith("kind create") or call.startswith("kind delete") for call in calls)


def test_kind_test_uses_a_nodeport_when_submit_has_no_pod_endpoint_flag(tmp_path, stub_env):
    stub_env["STUB_NO_POD_FLAG"] = stub_env["STUB_FAIL_SUBMIT"] = "1"
    result = subprocess.run(["bash", str(SCRIPT), "test"], env=stub_env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 1 and "using a NodePort on the kind node" in result.stderr, result.stderr
    calls = _calls(tmp_path)
    assert any(" expose deployment dfk8s-seaweedfs --name dfk8s-seaweedfs-nodeport --type NodePort" in call
               for call in calls)
    assert not any(" port-forward " in call for call in calls)
    submit = next(call for call in calls if call.startswith("dfk8s submit --pipeline"))
    assert f"--s3-endpoint http://127.0.0.1:{stub_env['STUB_S3_PORT']}" in submit
    assert "--cluster-s3-endpoint" not in submit
    assert calls[-1] == "kind delete cluster --name dfk8s-test"
