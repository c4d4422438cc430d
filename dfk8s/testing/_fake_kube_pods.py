"""Running pods (``FakeKube(run_pods=True)``): each pod's command as a local process, with its env.

Part of :mod:`dfk8s.testing.fake_kube` (a stand-in kube-apiserver for tests); see its docstring.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import deque

from dfk8s.testing._fake_kube_controller import _container_status

# Env vars holding credentials are not passed from the test process to pods: pods get them only
# from Secrets, as on a cluster, so a test proves the Secret wiring.
CREDENTIAL_ENV = frozenset(
    {
        "DF_API_KEY",
        "OPENAI_API_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
    }
)


class _PodRunner:
    """The controller loop that starts pods for pending indexes, and a kubelet that runs them.

    A mixin of :class:`dfk8s.testing.fake_kube.FakeKube`, whose ``__init__`` sets the state below.
    """

    kubeconfig_path: str | None
    extra_env: dict[str, str]
    poll_seconds: float
    _secrets: dict[tuple[str, str], dict[str, str]]
    _injections: dict[tuple[str, str], dict[int, deque]]
    _stopping: threading.Event

    def _control_loop(self) -> None:
        while not self._stopping.is_set():
            starts: list[tuple[str, str]] = []
            with self._cond:
                for track in list(self._jobs.values()):
                    job = self._store["jobs"].get(track.key)
                    if job is None or track.finished or job["spec"].get("suspend"):
                        continue
                    pending = [
                        i
                        for i in range(track.completions)
                        if i not in track.completed and i not in track.failed and i not in track.active
                    ]
                    room = int(job["spec"].get("parallelism", 1)) - len(track.active)
                    for index in pending[: max(0, room)]:
                        starts.append((track.key[0], self._create_pod(track, index)))
                self._retry_waiting_pods(starts)
            for namespace, name in starts:
                self._launch(namespace, name)
            with self._cond:
                self._cond.wait(self.poll_seconds)

    def _retry_waiting_pods(self, starts: list) -> None:
        for (namespace, name), pod_track in self._pods.items():
            pod = self._store["pods"].get((namespace, name))
            if (
                pod
                and pod["status"]["phase"] == "Pending"
                and pod_track.process is None
                and not pod_track.terminal
                and (namespace, name) not in starts
                and pod["status"].get("reason") == "CreateContainerConfigError"
            ):
                starts.append((namespace, name))

    def _launch(self, namespace: str, name: str) -> None:
        with self._cond:
            pod = self._store["pods"].get((namespace, name))
            pod_track = self._pods.get((namespace, name))
            if pod is None or pod_track is None or pod_track.deleted or pod_track.terminal:
                return
            actions = self._injections.get(pod_track.job or ("", ""), {}).get(pod_track.index)
            if actions:
                action = actions.popleft()
                self._set_running(namespace, name)
                if action == "evict":
                    self._terminate(namespace, name, 143, disruption=True)
                else:
                    pod_track.log.extend(f"injected exit {action}\n".encode())
                    self._terminate(namespace, name, int(action))
                return
            container = pod["spec"]["containers"][0]
            try:
                env = self._pod_env(pod, container)
            except LookupError as exc:
                waiting = [
                    _container_status(
                        container["name"],
                        container.get("image", ""),
                        {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}},
                    )
                ]
                if pod["status"].get("containerStatuses") != waiting:  # the kubelet retries quietly
                    pod["status"]["reason"] = "CreateContainerConfigError"
                    pod["status"]["containerStatuses"] = waiting
                    self._put("pods", pod, "MODIFIED")
                return
            pod["status"].pop("reason", None)
            argv = list(container.get("command") or []) + list(container.get("args") or [])
            if argv and argv[0] == "dfk8s":
                argv = [sys.executable, "-m", "dfk8s", *argv[1:]]
            try:
                process = subprocess.Popen(
                    argv,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                pod_track.log.extend(f"cannot start {argv[0]}: {exc}\n".encode())
                self._set_running(namespace, name)
                self._terminate(namespace, name, 128, reason="StartError")
                return
            pod_track.process = process
            self._set_running(namespace, name)
        thread = threading.Thread(
            target=self._pump, args=(namespace, name, process), daemon=True, name=f"pod-{name}"
        )
        thread.start()

    def _pump(self, namespace: str, name: str, process: subprocess.Popen) -> None:
        pod_track = self._pods[(namespace, name)]
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            with self._cond:
                pod_track.log.extend(chunk)
                self._cond.notify_all()
        code = process.wait()
        with self._cond:
            if not pod_track.deleted:
                self._terminate(namespace, name, code if code >= 0 else 128 - code)
            self._cond.notify_all()

    def _pod_env(self, pod: dict, container: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
        env.pop("JOB_COMPLETION_INDEX", None)
        if self.kubeconfig_path:
            env["KUBECONFIG"] = self.kubeconfig_path
        env.update(self.extra_env)
        namespace = pod["metadata"]["namespace"]
        for item in container.get("env") or ():
            source = item.get("valueFrom")
            if source is None:
                env[item["name"]] = str(item.get("value", ""))
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self._secrets.get((namespace, ref["name"]))
                if secret is None:
                    raise LookupError(f'secret "{ref["name"]}" not found')
                if ref["key"] not in secret:
                    raise LookupError(f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}")
                env[item["name"]] = secret[ref["key"]]
            elif "fieldRef" in source:
                env[item["name"]] = _field_path(pod, source["fieldRef"]["fieldPath"])
        return env


def _field_path(pod: dict, path: str) -> str:
    match = re.match(r"^metadata\.(annotations|labels)\['(.+)'\]$", path)
    if match:
        return (pod["metadata"].get(match[1]) or {}).get(match[2], "")
    return {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
    }.get(path, "")
