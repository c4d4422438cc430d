"""The node agent does a kubelet's part for plain pods: env, tokens, status, deletion, eviction, logs."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster.conftest import NS
from tests.cluster.node_agent import CPU_NODE

RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def make_pod(cluster, name, script, *, grace=30, automount=False, env=(), service_account=None, labels=None):
    spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": automount,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", script],
                "env": list(env),
                "securityContext": RESTRICTED,
            }
        ],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"test": name}},
        "spec": spec,
    }
    cluster.core.create_namespaced_pod(NS, body)
    return name


def pod(cluster, name):
    found = [p for p in cluster.pods(NS) if p["metadata"]["name"] == name]
    return found[0] if found else None


def wait_phase(cluster, name, *phases, timeout=90):
    return cluster.wait_for(
        lambda: (lambda p: p if p and p["status"].get("phase") in phases else None)(pod(cluster, name)),
        what=f"pod {name} to be {'/'.join(phases)}",
        timeout=timeout,
    )


def log(cluster, name, **kwargs):
    return cluster.core.read_namespaced_pod_log(name, NS, **kwargs)


def cleanup(cluster, *names):
    for name in names:
        try:
            cluster.core.delete_namespaced_pod(name, NS, grace_period_seconds=0)
        except Exception:
            pass


def test_env_is_resolved_as_the_kubelet_does(kube_env, run_id):
    cluster = kube_env
    cluster.create_secret(NS, f"sec-{run_id}", {"password": "s3cr3t"})
    cluster.core.create_namespaced_config_map(
        NS, {"metadata": {"name": f"cm-{run_id}"}, "data": {"mode": "fast"}}
    )
    name = f"env-{run_id}"
    env = [
        {"name": "PLAIN", "value": "a"},
        {"name": "EXPANDED", "value": "$(PLAIN)-b"},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": f"sec-{run_id}", "key": "password"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": f"cm-{run_id}", "key": "mode"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PODNS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['test']"}}},
    ]
    make_pod(
        cluster,
        name,
        'echo "$PLAIN $EXPANDED $SECRET $MODE $POD $PODNS $NODE $LABEL $KUBERNETES_SERVICE_HOST"'
        "; test ! -e /var/run/secrets/kubernetes.io/serviceaccount/token",
        env=env,
    )
    try:
        done = wait_phase(cluster, name, "Succeeded", "Failed")
        assert done["status"]["phase"] == "Succeeded", log(cluster, name)
        assert log(cluster, name).strip() == f"a a-b s3cr3t fast {name} {NS} {CPU_NODE} {name} 127.0.0.1"
    finally:
        cleanup(cluster, name)


def test_a_missing_secret_keeps_the_pod_waiting_with_the_kubelets_reason(kube_env, run_id):
    cluster = kube_env
    name = f"nosecret-{run_id}"
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": f"later-{run_id}", "key": "k"}}}]
    make_pod(cluster, name, "echo got $X", env=env)
    try:

        def waiting():
            found = pod(cluster, name)
            statuses = (found or {}).get("status", {}).get("containerStatuses") or []
            return (
                statuses
                and statuses[0]["state"].get("waiting", {}).get("reason") == "CreateContainerConfigError"
                and statuses[0]["state"]["waiting"]
            )

        state = cluster.wait_for(waiting, what="CreateContainerConfigError")
        assert f'secret "later-{run_id}" not found' in state["message"]
        cluster.create_secret(NS, f"later-{run_id}", {"k": "v"})  # the kubelet retries: now it starts
        assert wait_phase(cluster, name, "Succeeded")["status"]["phase"] == "Succeeded"
        assert log(cluster, name).strip() == "got v"
    finally:
        cleanup(cluster, name)


def test_the_service_account_token_is_mounted_for_that_pod_only_and_works(kube_env, run_id):
    cluster = kube_env
    name = f"token-{run_id}"
    # The reducer's account from the chart: it may list jobs, and nothing else.
    script = (
        "d=/var/run/secrets/kubernetes.io/serviceaccount; cat $d/namespace; echo; "
        'python -c "from kubernetes import client, config; config.load_incluster_config(); '
        "print(len(client.BatchV1Api().list_namespaced_job(open('$d/namespace').read()).items) >= 0)\"; "
        'python -c "from kubernetes import client, config; config.load_incluster_config(); '
        "client.CoreV1Api().list_namespaced_secret('batch')\" 2>&1 | grep -o 'Reason: Forbidden' | head -1"
    )
    make_pod(cluster, name, script, automount=True, service_account="dfk8s-reducer")
    try:
        done = wait_phase(cluster, name, "Succeeded", "Failed")
        text = log(cluster, name)
        assert done["status"]["phase"] == "Succeeded", text
        assert text.split() == [NS, "True", "Reason:", "Forbidden"]
        # The token is a bound one (TokenRequest for this pod), on the pod's own volume only.
        volume = next(v for v in done["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
        folder = cluster.agent.pod_dir(NS, name) / "volumes" / volume["name"]
        token = (folder / "token").read_text()
        claims = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["kubernetes.io"]["pod"]["name"] == name
        assert claims["sub"] == f"system:serviceaccount:{NS}:dfk8s-reducer"
        assert not __import__("os").path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")
    finally:
        cleanup(cluster, name)


def test_exit_codes_become_terminated_states(kube_env, run_id):
    cluster = kube_env
    name = f"exit-{run_id}"
    make_pod(cluster, name, "echo bye; exit 3")
    try:
        done = wait_phase(cluster, name, "Failed")
        terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
        conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
        assert conditions["PodScheduled"] == "True" and conditions["Ready"] == "False"
        assert conditions["Initialized"] == "True"
    finally:
        cleanup(cluster, name)


def test_running_pods_report_running_and_stream_logs(kube_env, run_id):
    cluster = kube_env
    name = f"run-{run_id}"
    make_pod(cluster, name, "for i in 1 2 3; do echo line $i; sleep 1; done")
    try:
        running = wait_phase(cluster, name, "Running", "Succeeded")
        if running["status"]["phase"] == "Running":
            status = running["status"]["containerStatuses"][0]
            assert status["ready"] is True and "running" in status["state"]
            assert {c["type"]: c["status"] for c in running["status"]["conditions"]}["Ready"] == "True"
        from kubernetes import watch

        followed = list(watch.Watch().stream(cluster.core.read_namespaced_pod_log, name, NS, follow=True))
        assert followed == ["line 1", "line 2", "line 3"]
        assert log(cluster, name, tail_lines=1) == "line 3\n"
        stamped = log(cluster, name, timestamps=True).splitlines()
        assert len(stamped) == 3 and stamped[0].endswith(" line 1") and stamped[0][:4].isdigit()
    finally:
        cleanup(cluster, name)


@pytest.mark.parametrize("trap", ["'exit 0'", "''"])
def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(kube_env, run_id, trap):
    cluster = kube_env
    ignores = trap == "''"
    name = f"del-{run_id}-{'ignores' if ignores else 'exits'}"
    make_pod(cluster, name, f"trap {trap} TERM; echo started; while true; do sleep 0.2; done", grace=3)
    try:
        wait_phase(cluster, name, "Running")
        cluster.wait_for(lambda: "started" in log(cluster, name), what="the process to start")
        uid = pod(cluster, name)["metadata"]["uid"]
        proc = cluster.agent.procs[uid]
        started = time.monotonic()
        cluster.core.delete_namespaced_pod(name, NS)
        cluster.wait_for(lambda: pod(cluster, name) is None, what="the pod object to go", timeout=60)
        took = time.monotonic() - started
        assert proc.poll() is not None
        if not ignores:
            assert proc.returncode == 0  # it got SIGTERM and exited by itself
        else:
            assert proc.returncode == -9 and took >= 3  # SIGKILL, after the grace period
    finally:
        cleanup(cluster, name)


def test_kubelet_eviction_sets_disruption_target(kube_env, run_id):
    cluster = kube_env
    name = f"evict-{run_id}"
    make_pod(cluster, name, "echo up; sleep 600")
    try:
        wait_phase(cluster, name, "Running")
        cluster.wait_for(lambda: "up" in log(cluster, name), what="the process to start")
        cluster.agent.evict(NS, name)
        done = wait_phase(cluster, name, "Failed")
        assert done["status"]["reason"] == "Evicted"
        target = next(c for c in done["status"]["conditions"] if c["type"] == "DisruptionTarget")
        assert target["status"] == "True" and target["reason"] == "TerminationByKubelet"
    finally:
        cleanup(cluster, name)
