"""What only a real kubelet shows: the image's own user and files, a read-only root, native sidecars.

The pods run on the node's kubelet and containerd (tests/cluster/node.py), from the CPU image that
`make test-images` builds, imported under the tag `dfk8s submit` uses by default.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.kube.manifests import RUN_AS_USER, WORKER_CONTAINER, _container_security, _pod_security, cpu_image
from tests.cluster.conftest import CREDENTIALS, NS
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST

#: What the worker container runs, as seen from inside it: the image's entrypoint, from the image's venv.
PROBE = "id -u; id -g; cat /proc/1/cmdline | tr '\\0' ' '; echo; " \
        "touch /probe 2>&1 || true; touch /tmp/probe && echo tmp-writable"


def test_a_map_pod_runs_the_image_as_its_non_root_user_with_a_read_only_root(
    kube_env, s3_bucket, fake_api, api_key, run_id
):
    cluster = kube_env
    fake_api.config.latency = 20.0  # the worker waits on its answers: long enough to look inside
    result = CliRunner().invoke(cli, [str(a) for a in (
        "submit", "--pipeline", "caption", "--input", VQA_MANIFEST, "--image-root", DATAFLOW_ROOT,
        "--output", f"s3://{s3_bucket}/runs", *CREDENTIALS, "--run-id", run_id, "--shards", "1",
        "--api-url", fake_api.url + "/v1",
    )])
    assert result.exit_code == 0, result.output

    def running():
        pods = cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=map")
        return next((p for p in pods if p["status"].get("phase") == "Running"), None)

    pod = cluster.wait_for(running, what="the map pod running")
    cluster.wait_for(lambda: fake_api.requests(), what="the worker's first request")
    probe = cluster.kubectl("exec", "-n", NS, pod["metadata"]["name"], "-c", WORKER_CONTAINER, "--",
                            "sh", "-c", PROBE)
    assert probe.returncode == 0, probe.stderr
    uid, gid, cmdline, touch_root, touch_tmp = probe.stdout.splitlines()
    assert (uid, gid) == (str(RUN_AS_USER), str(RUN_AS_USER))
    # PID 1 is the image's ENTRYPOINT (dfk8s, from the image's /opt/dfk8s venv) given the Job's args.
    interpreter, entrypoint, command = cmdline.split()[:3]
    assert interpreter.startswith("/opt/dfk8s/bin/python") and (entrypoint, command) == (
        "/opt/dfk8s/bin/dfk8s", "worker"), cmdline
    assert "Read-only file system" in touch_root and touch_tmp == "tmp-writable"
    assert pod["spec"]["containers"][0]["image"] == cpu_image()  # the tag submit uses by default
    fake_api.config.latency = 0.0
    CliRunner().invoke(cli, ["cancel", run_id])


def _sidecar_pod(name: str) -> dict:
    """A pod with a native sidecar (an init container that restarts Always) and one main container."""
    image = cpu_image()
    sidecar = ("echo sidecar up; trap 'echo sidecar stopped on TERM; exit 0' TERM; "
               "touch /tmp/shared/ready; while true; do sleep 0.1; done")
    main = "test -f /tmp/shared/ready && echo main saw the sidecar; sleep 2; echo main done"
    container = {"image": image, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c"],
                 "securityContext": _container_security(),
                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                 "volumeMounts": [{"name": "shared", "mountPath": "/tmp/shared"}]}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never", "securityContext": _pod_security(),
            "initContainers": [{**container, "name": "sidecar", "args": [sidecar], "restartPolicy": "Always",
                                "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/shared/ready"]},
                                                 "periodSeconds": 1}}],
            "containers": [{**container, "name": "main", "args": [main]}],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        },
    }


def test_a_native_sidecar_starts_first_and_stops_when_the_main_container_ends(kube_env, run_id):
    cluster = kube_env
    name = f"sidecar-{run_id}"
    created = cluster.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(_sidecar_pod(name)))
    assert created.returncode == 0, created.stderr
    try:
        pod = cluster.wait_for(
            lambda: (lambda p: p if p["status"].get("phase") in ("Succeeded", "Failed") else None)(
                json.loads(cluster.kubectl("get", "pod", "-n", NS, name, "-o", "json").stdout)),
            what="the sidecar pod to finish",
        )
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        (sidecar,) = pod["status"]["initContainerStatuses"]
        (main,) = pod["status"]["containerStatuses"]
        sidecar_ran, main_ran = sidecar["state"]["terminated"], main["state"]["terminated"]
        # The main container started once the sidecar was up (its startup probe passed)...
        assert main_ran["exitCode"] == 0 and sidecar_ran["startedAt"] <= main_ran["startedAt"]
        main_log = cluster.kubectl("logs", "-n", NS, name, "-c", "main").stdout
        assert main_log.splitlines() == ["main saw the sidecar", "main done"]
        # ... and the kubelet stopped the sidecar (SIGTERM) after the main container ended.
        assert sidecar_ran["finishedAt"] >= main_ran["finishedAt"]
        sidecar_log = cluster.kubectl("logs", "-n", NS, name, "-c", "sidecar").stdout
        assert sidecar_log.splitlines() == ["sidecar up", "sidecar stopped on TERM"]
        assert sidecar["restartCount"] == 0
    finally:
        cluster.kubectl("delete", "pod", "-n", NS, name, "--wait=false")
