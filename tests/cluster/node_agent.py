"""A node agent: the one stand-in of the local control plane, doing a kubelet's job for bound pods.

Test code, not shipped. A real kubelet needs a container runtime (containerd + runc), a pause image
from registry.k8s.io and a CNI network; the images cannot be fetched here (only package registries
are reachable) and DESIGN.md forbids the bridges and iptables rules a CNI needs. So this agent does
what the kubelet does, against the real kube-apiserver, for pods the real scheduler bound to its nodes:

* registers two Nodes, ``dfk8s-cpu`` and ``dfk8s-gpu`` (``nvidia.com/gpu`` capacity, the
  ``nvidia.com/gpu.present=true`` label and the ``nvidia.com/gpu:NoSchedule`` taint the text2image
  profile asks for), Ready, and renews their Leases;
* watches pods bound (``spec.nodeName``) to them and runs each pod's container as a local process:
  command and args (the image is ignored; ``dfk8s`` is the checkout's venv, first on PATH), env with
  ``value``, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` and ``envFrom`` resolved as the
  kubelet does, plus ``KUBERNETES_SERVICE_HOST/PORT`` of the API server;
* sets up the pod's volumes as the kubelet does: ``emptyDir`` (a folder per pod), ``secret``,
  ``configMap``, ``downwardAPI`` and ``projected`` (the ServiceAccount admission plugin's
  ``kube-api-access-*`` volume: a TokenRequest bound to the pod, ``kube-root-ca.crt``, the
  namespace) and ``persistentVolumeClaim`` (the ``hostPath`` folder of the PersistentVolume the real
  PV controller bound the claim to: no storage driver runs here, so a test creates a hostPath PV per
  claim; an unbound claim waits in ContainerCreating), and bind-mounts them at their mount paths in a
  private mount namespace
  (``unshare --mount``) of that process only, with the root filesystem read-only when the container
  asks for ``readOnlyRootFilesystem``. No token volume, no token: automount off means none;
* reports status as the kubelet does: Pending (``ContainerCreating``, or
  ``CreateContainerConfigError`` for a missing Secret key), Running (conditions and a running
  container status), then Succeeded or Failed with the exit code in
  ``containerStatuses[].state.terminated`` (reason Completed or Error);
* honours deletion: SIGTERM to the process group, SIGKILL after the grace period, final status,
  then a delete with grace 0 (as the kubelet does); a pod the API already deleted is killed;
* evicts like the kubelet's eviction manager (:meth:`NodeAgent.evict`: DisruptionTarget condition,
  phase Failed, reason Evicted), besides honouring the API's Eviction subresource;
* serves container logs over HTTPS at ``/containerLogs/<ns>/<pod>/<container>`` (``follow``,
  ``tailLines``, ``timestamps``, ``limitBytes``), where the API server's ``pods/log`` looks for them.

Differences from a kubelet that a test could notice: processes run as root on the host network and
filesystem (the Python interpreter sits under /root, which only root can read, so ``runAsUser`` is
not applied), no cgroups (limits are not enforced), every pod's IP is 127.0.0.1, and images are not
pulled. :meth:`NodeAgent.hold` keeps matching pods in ContainerCreating, the way a slow image pull
would, so a test can act on a pod before its process starts.
"""

from __future__ import annotations

import atexit
import datetime
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tests.cluster.controlplane import _die_with_parent

GPU_RESOURCE = "nvidia.com/gpu"
CPU_NODE = "dfk8s-cpu"
GPU_NODE = "dfk8s-gpu"
NODES: dict[str, dict] = {
    CPU_NODE: {
        "labels": {},
        "taints": [],
        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"},
    },
    GPU_NODE: {
        # What NVIDIA GPU feature discovery labels and what GPU node pools are usually tainted with.
        "labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}],
        "capacity": {
            "cpu": "64",
            "memory": "512Gi",
            "pods": "110",
            "ephemeral-storage": "1Ti",
            GPU_RESOURCE: "4",
        },
    },
}
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
STATE_ROOT = Path("/var/lib/dfk8s-node-agent")
LEASE_SECONDS = 40
SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_REF = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_SMP = "application/strategic-merge-patch+json"


def now() -> str:
    """The time as the API writes it (RFC 3339, seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConfigError(Exception):
    """The container cannot be created yet (CreateContainerConfigError): a missing Secret or key."""


class _Pod:
    """One pod this agent runs: its process, log, and the status it reports."""

    def __init__(self, agent: NodeAgent, pod: dict):
        self.agent = agent
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.pod = pod
        self.container = pod["spec"]["containers"][0]
        self.dir = agent.state_dir / "pods" / self.uid
        self.log_path = self.dir / "logs" / f"{self.container['name']}.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: str | None = None
        self.terminating = threading.Event()
        self.delete_requested = False
        self.exited = threading.Event()
        self.evicted: str | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    # ----- lifecycle ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception as exc:  # the agent must not die with one pod; say why in its status
            self.agent.problems.append(f"{self.namespace}/{self.name}: {type(exc).__name__}: {exc}")
            self.exited.set()

    def _lifecycle(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        self._patch_status(self._pending_status("ContainerCreating", None))
        reported = None
        while not self.terminating.is_set():
            if self.agent.is_held(self.pod):
                self.terminating.wait(0.2)
                continue
            try:
                argv, env, cwd = self._prepare()
                break
            except ConfigError as exc:
                if reported != str(exc):  # the kubelet retries; status says why it waits
                    self._patch_status(self._pending_status("CreateContainerConfigError", str(exc)))
                    reported = str(exc)
                self.terminating.wait(1.0)
        else:
            self._finish(None)
            return
        with self.lock:
            if self.terminating.is_set():
                self._finish(None)
                return
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.started_at = now()
        self.agent.procs[self.uid] = self.proc
        self._patch_status(self._running_status())
        with open(self.log_path, "ab", buffering=0) as log:
            for line in self.proc.stdout:  # the CRI log format: "<time> stdout F <line>"
                stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                log.write(stamp.encode() + b" stdout F " + line.rstrip(b"\n") + b"\n")
        code = self.proc.wait()
        self.agent.procs.pop(self.uid, None)
        self._finish(128 - code if code < 0 else code)

    def _finish(self, exit_code: int | None) -> None:
        self.exited.set()
        if not self.agent.running:
            return
        self._patch_status(self._terminated_status(exit_code))
        if self.delete_requested:
            self.agent.delete_now(self.namespace, self.name, self.uid)

    def terminate(self, grace: float) -> None:
        """Deletion asked for: SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        with self.lock:
            if self.delete_requested:
                return
            self.delete_requested = True
            self.terminating.set()
            proc = self.proc
        if proc is None:
            return
        _signal_group(proc, signal.SIGTERM)

        def kill_later():
            if not self.exited.wait(max(grace, 0)):
                _signal_group(proc, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()

    def kill(self) -> None:
        """Kill the process group now (agent stopping, or the pod object is gone)."""
        self.terminating.set()
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)

    # ----- the container's process ---------------------------------------------------------------

    def _prepare(self) -> tuple[list[str], dict[str, str], str]:
        container = self.container
        mounts = self._volumes()
        env = self._env()
        command = [_expand(part, env) for part in container.get("command") or []]
        args = [_expand(part, env) for part in container.get("args") or []]
        argv = command + args
        if not argv:
            raise ConfigError(f"container {container['name']} has no command (the node agent runs no images)")
        security = container.get("securityContext") or {}
        script = ["set -e"]
        for source, target, read_only in mounts:
            script.append(f"mkdir -p {shlex.quote(target)}")
            script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        if security.get("readOnlyRootFilesystem"):
            script.append("mount -o remount,bind,ro /")
        script.append('exec "$@"')
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "pod"]
        cwd = container.get("workingDir") or str(self.dir)
        return wrapper + argv, env, cwd

    def _volumes(self) -> list[tuple[Path, str, bool]]:
        spec = self.pod["spec"]
        folders: dict[str, Path] = {}
        read_only: set[str] = set()
        for volume in spec.get("volumes") or ():
            name = volume["name"]
            folder = self.dir / "volumes" / name
            if "persistentVolumeClaim" in volume:
                folder = self._claim_folder(volume["persistentVolumeClaim"]["claimName"])
                if volume["persistentVolumeClaim"].get("readOnly"):
                    read_only.add(name)
            folder.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                self._write_keys(
                    folder,
                    self._secret(volume["secret"]["secretName"], optional=volume["secret"].get("optional")),
                    volume["secret"].get("items"),
                )
            elif "configMap" in volume:
                self._write_keys(
                    folder,
                    self._config_map(
                        volume["configMap"]["name"], optional=volume["configMap"].get("optional")
                    ),
                    volume["configMap"].get("items"),
                )
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"].get("items") or ():
                    self._write_file(folder, item["path"], self._field(item["fieldRef"]["fieldPath"]))
            elif "projected" in volume:
                self._projected(folder, volume["projected"])
            folders[name] = folder
        mounts = []
        for mount in self.container.get("volumeMounts") or ():
            source = folders.get(mount["name"])
            if source is None:
                raise ConfigError(f"volume {mount['name']} is mounted but not defined")
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            read_only_mount = bool(mount.get("readOnly")) or mount["name"] in read_only
            mounts.append((source, mount["mountPath"], read_only_mount))
        # Parents before children (/tmp before /tmp/x), as container runtimes order them.
        return sorted(mounts, key=lambda m: len(Path(m[1]).parts))

    def _claim_folder(self, claim: str) -> Path:
        """The host folder of a claim: the ``hostPath`` of the PersistentVolume it is bound to.

        No storage driver runs here, so the agent mounts only hostPath volumes (a test creates the PV
        with a folder of its own, and the real PV controller binds the claim). An unbound claim or
        another kind of volume waits, as a kubelet waits for a volume it cannot attach.
        """
        pvc = self.agent.read("persistentvolumeclaims", self.namespace, claim)
        if pvc is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        if not volume_name or (pvc.get("status") or {}).get("phase") != "Bound":
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.agent.read("persistentvolumes", "", volume_name)
        path = ((pv or {}).get("spec") or {}).get("hostPath", {}).get("path")
        if not path:
            raise ConfigError(f"persistentvolume {volume_name}: the node agent mounts only hostPath volumes")
        return Path(path)

    def _projected(self, folder: Path, projected: dict) -> None:
        for source in projected.get("sources") or ():
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                self._write_file(
                    folder,
                    token["path"],
                    self.agent.pod_token(
                        self.pod, token.get("audience"), int(token.get("expirationSeconds") or 3600)
                    ),
                )
            elif "configMap" in source:
                ref = source["configMap"]
                self._write_keys(
                    folder, self._config_map(ref["name"], optional=ref.get("optional")), ref.get("items")
                )
            elif "secret" in source:
                ref = source["secret"]
                self._write_keys(
                    folder, self._secret(ref["name"], optional=ref.get("optional")), ref.get("items")
                )
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or ():
                    self._write_file(folder, item["path"], self._field(item["fieldRef"]["fieldPath"]))

    def _write_keys(self, folder: Path, data: dict[str, str], items) -> None:
        if items:
            for item in items:
                if item["key"] not in data:
                    raise ConfigError(f"key {item['key']} not found")
                self._write_file(folder, item["path"], data[item["key"]])
        else:
            for key, value in data.items():
                self._write_file(folder, key, value)

    @staticmethod
    def _write_file(folder: Path, path: str, value: str) -> None:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value)
        target.chmod(0o644)

    def _secret(self, name: str, *, optional=None) -> dict[str, str]:
        found = self.agent.read("secrets", self.namespace, name)
        if found is None:
            if optional:
                return {}
            raise ConfigError(f'secret "{name}" not found')
        import base64

        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    def _config_map(self, name: str, *, optional=None) -> dict[str, str]:
        found = self.agent.read("configmaps", self.namespace, name)
        if found is None:
            if optional:
                return {}
            raise ConfigError(f'configmap "{name}" not found')
        return dict(found.get("data") or {})

    def _field(self, path: str) -> str:
        pod = self.pod
        meta, spec = pod["metadata"], pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        match = _FIELD_REF.match(path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _env(self) -> dict[str, str]:
        container, agent = self.container, self.agent
        env: dict[str, str] = {
            "PATH": agent.pod_path,
            "HOSTNAME": self.pod["spec"].get("hostname") or self.name,
        }
        for source in container.get("envFrom") or ():
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret(source["secretRef"]["name"], optional=source["secretRef"].get("optional"))
            else:
                data = self._config_map(
                    source["configMapRef"]["name"], optional=source["configMapRef"].get("optional")
                )
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or ():
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = _expand(item.get("value", ""), env)
                continue
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                key_ref = ref["secretKeyRef"]
                data = self._secret(key_ref["name"], optional=key_ref.get("optional"))
                if key_ref["key"] not in data:
                    if key_ref.get("optional"):
                        continue
                    raise ConfigError(
                        f"couldn't find key {key_ref['key']} in Secret {self.namespace}/{key_ref['name']}"
                    )
                env[name] = data[key_ref["key"]]
            elif "configMapKeyRef" in ref:
                key_ref = ref["configMapKeyRef"]
                data = self._config_map(key_ref["name"], optional=key_ref.get("optional"))
                if key_ref["key"] not in data:
                    if key_ref.get("optional"):
                        continue
                    raise ConfigError(
                        f"couldn't find key {key_ref['key']} in ConfigMap {self.namespace}/{key_ref['name']}"
                    )
                env[name] = data[key_ref["key"]]
            elif "fieldRef" in ref:
                env[name] = self._field(ref["fieldRef"]["fieldPath"])
            else:
                raise ConfigError(
                    f"env {name}: only value, secretKeyRef, configMapKeyRef and fieldRef are "
                    "supported by the node agent"
                )
        # What the kubelet adds for the `kubernetes` Service, with or without enableServiceLinks.
        port = str(agent.apiserver_port)
        env.update(
            {
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
            }
        )
        return env

    # ----- status -------------------------------------------------------------------------------

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict]:
        stamp = now()
        condition = {
            "status": "True" if ready else "False",
            "lastTransitionTime": stamp,
            "lastProbeTime": None,
        }
        if reason:
            condition["reason"] = reason
        started = {
            "type": "PodReadyToStartContainers",
            "status": "True",
            "lastTransitionTime": stamp,
            "lastProbeTime": None,
        }
        return [
            started,
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp, "lastProbeTime": None},
            {"type": "Ready", **condition},
            {"type": "ContainersReady", **condition},
        ]

    def _base_status(self) -> dict:
        return {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.pod.get("status", {}).get("startTime") or now(),
            "qosClass": self.pod.get("status", {}).get("qosClass"),
        }

    def _container_status(self, state: dict, *, ready=False, started=False) -> dict:
        container = self.container
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"dfk8s://{self.uid}",
            "ready": ready,
            "started": started,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }

    def _pending_status(self, reason: str, message: str | None) -> dict:
        waiting = {"reason": reason}
        if message:
            waiting["message"] = message
        return {
            **self._base_status(),
            "phase": "Pending",
            "conditions": self._conditions(False, "ContainersNotReady"),
            "containerStatuses": [self._container_status({"waiting": waiting})],
        }

    def _running_status(self) -> dict:
        return {
            **self._base_status(),
            "phase": "Running",
            "conditions": self._conditions(True),
            "containerStatuses": [
                self._container_status({"running": {"startedAt": self.started_at}}, ready=True, started=True)
            ],
        }

    def _terminated_status(self, exit_code: int | None) -> dict:
        if exit_code is None:  # killed before its process started (what the kubelet reports then)
            terminated = {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
            }
        else:
            terminated = {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": self.started_at,
                "finishedAt": now(),
            }
        phase = "Succeeded" if exit_code == 0 and not self.evicted else "Failed"
        conditions = self._conditions(False, "PodCompleted" if phase == "Succeeded" else "PodFailed")
        status = {
            **self._base_status(),
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [self._container_status({"terminated": terminated})],
        }
        if self.evicted:
            status.update(reason="Evicted", message=self.evicted)
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": self.evicted,
                    "lastTransitionTime": now(),
                    "lastProbeTime": None,
                }
            )
        return status

    def _patch_status(self, status: dict) -> None:
        self.agent.patch_status(self.namespace, self.name, status)


def _expand(text: str, env: dict[str, str]) -> str:
    """Expand ``$(VAR)`` references to earlier env vars as the kubelet does (``$$`` escapes)."""

    def repl(match):
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(repl, text)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class NodeAgent:
    """Registers the nodes and runs the pods bound to them; see the module docstring.

    Args:
        plane: a started :class:`tests.cluster.controlplane.ControlPlane`.
        state_dir: where pods' folders and logs go (default: under the control plane's state).
        venv_bin: the folder whose ``dfk8s`` and ``python`` pods run (default: this interpreter's).

    """

    def __init__(self, plane, *, state_dir: Path | None = None, venv_bin: Path | None = None):
        self.plane = plane
        # Like the kubelet's /var/lib/kubelet/pods: outside every path a pod mounts over (/tmp above
        # all), so each volume's folder is still reachable when the next one is bind-mounted.
        self._own_dir = state_dir is None
        if state_dir is None:
            STATE_ROOT.mkdir(parents=True, exist_ok=True)
            state_dir = Path(tempfile.mkdtemp(prefix="node-", dir=STATE_ROOT))
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.apiserver_port = plane.apiserver_port
        venv_bin = Path(venv_bin or Path(sys.executable).parent)
        self.pod_path = f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.pods: dict[str, _Pod] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.problems: list[str] = []
        self.running = False
        self._holds: list[Callable[[dict], bool]] = []
        self._deleted: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._log_server: socketserver.BaseServer | None = None

    # ----- API ----------------------------------------------------------------------------------

    def _clients(self):
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.plane.kubeconfig))
        return api, client.CoreV1Api(api), client.CoordinationV1Api(api)

    def read(self, resource: str, namespace: str, name: str) -> dict | None:
        """GET one object (namespaced, or a PersistentVolume) as a dict; None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        method = {
            "secrets": self.core.read_namespaced_secret,
            "configmaps": self.core.read_namespaced_config_map,
            "persistentvolumeclaims": self.core.read_namespaced_persistent_volume_claim,
            "persistentvolumes": lambda name, namespace, **kw: self.core.read_persistent_volume(name, **kw),
        }[resource]
        try:
            response = method(name, namespace, _preload_content=False, _request_timeout=30)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    def pod_token(self, pod: dict, audience: str | None, seconds: int) -> str:
        """A token of the pod's ServiceAccount bound to the pod (TokenRequest), as the kubelet gets it."""
        meta = pod["metadata"]
        spec = {
            "expirationSeconds": max(600, seconds),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        response = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName") or "default",
            meta["namespace"],
            {"spec": spec},
            _preload_content=False,
            _request_timeout=30,
        )
        return json.loads(response.data)["status"]["token"]

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """Strategic-merge the pod's status (conditions merge by type, as the kubelet's patches do)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(
                name,
                namespace,
                {"status": status},
                _content_type=_SMP,
                _preload_content=False,
                _request_timeout=30,
            )
        except ApiException as exc:
            if exc.status != 404:
                self.problems.append(f"status of {namespace}/{name}: {exc.status} {exc.body}")

    def delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Delete a terminated pod with grace 0 (the kubelet's last step), once."""
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            if uid in self._deleted:
                return
            self._deleted.add(uid)
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                _request_timeout=30,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                self.problems.append(f"delete of {namespace}/{name}: {exc.status}")

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        """Register the nodes, serve logs, and start watching pods."""
        self.api, self.core, self.coordination = self._clients()
        self.running = True
        atexit.register(self.stop)
        self.log_port = self._serve_logs()
        for name, spec in NODES.items():
            self._register(name, spec)
        self._spawn(self._watch_pods, "pod-watch")
        self._spawn(self._heartbeat, "node-leases")
        return self

    def stop(self) -> None:
        """Kill every pod process and stop watching; node objects stay (the cluster goes with them)."""
        if not self.running:
            return
        self.running = False
        self._stop.set()
        for pod in list(self.pods.values()):
            pod.kill()
        for proc in list(self.procs.values()):
            _signal_group(proc, signal.SIGKILL)
        for pod in list(self.pods.values()):
            pod.thread.join(5)
        if self._log_server is not None:
            self._log_server.shutdown()
            self._log_server.server_close()
        self.api.close()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ----- nodes --------------------------------------------------------------------------------

    def _register(self, name: str, spec: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **spec["labels"],
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": spec["taints"]},
        }
        try:
            self.core.create_node(body, _preload_content=False, _request_timeout=30)
        except ApiException as exc:
            if exc.status != 409:
                raise
        stamp = now()

        def condition(kind, status, reason):
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": reason,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }

        status = {
            "capacity": spec["capacity"],
            "allocatable": spec["capacity"],
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                condition("Ready", "True", "KubeletReady"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kernelVersion": os.uname().release,
                "osImage": "dfk8s node agent",
                "containerRuntimeVersion": "dfk8s-node-agent://0",
                "kubeletVersion": self.plane.version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.core.patch_node_status(
            name, {"status": status}, _content_type=_SMP, _preload_content=False, _request_timeout=30
        )
        # TaintNodesByCondition put node.kubernetes.io/not-ready on the new node; removing it once the
        # node is Ready is the node-lifecycle controller's job, which this control plane does not run.
        node = json.loads(self.core.read_node(name, _preload_content=False, _request_timeout=30).data)
        taints = [t for t in node["spec"].get("taints") or () if t["key"] != NOT_READY_TAINT]
        self.core.patch_node(
            name,
            [{"op": "replace", "path": "/spec/taints", "value": taints}],
            _content_type="application/json-patch+json",
            _preload_content=False,
            _request_timeout=30,
        )
        self._renew_lease(name)

    def _renew_lease(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": _micro_now(),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(
                name,
                "kube-node-lease",
                {"spec": body["spec"]},
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=30,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(
                "kube-node-lease", body, _preload_content=False, _request_timeout=30
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(10):
            for name in NODES:
                try:
                    self._renew_lease(name)
                except Exception as exc:
                    self.problems.append(f"lease {name}: {exc}")

    # ----- pods ---------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                response = self.core.list_pod_for_all_namespaces(
                    field_selector="spec.nodeName!=", _preload_content=False, _request_timeout=60
                )
                listed = json.loads(response.data)
                for pod in listed["items"]:
                    self._on_pod("ADDED", pod)
                stream = watch.Watch()
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector="spec.nodeName!=",
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=120,
                    _request_timeout=150,
                ):
                    if self._stop.is_set():
                        stream.stop()
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["type"], event["raw_object"])
            except Exception as exc:
                if self._stop.is_set():
                    return
                self.problems.append(f"pod watch: {type(exc).__name__}: {exc}")
                self._stop.wait(1)

    def _on_pod(self, kind: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("nodeName") not in NODES:
            return
        uid = meta["uid"]
        known = self.pods.get(uid)
        phase = (pod.get("status") or {}).get("phase")
        if kind == "DELETED":
            if known is not None:
                known.kill()
            return
        if known is not None:
            known.pod = {**known.pod, "metadata": meta}  # annotations, deletionTimestamp
            if meta.get("deletionTimestamp"):
                grace = meta.get("deletionGracePeriodSeconds")
                known.terminate(
                    float(spec.get("terminationGracePeriodSeconds", 30) if grace is None else grace)
                )
                if known.exited.is_set():
                    self.delete_now(meta["namespace"], meta["name"], uid)
            return
        if phase in ("Succeeded", "Failed"):
            if meta.get("deletionTimestamp"):  # a finished pod being deleted (GC, cancel): finish it
                self.delete_now(meta["namespace"], meta["name"], uid)
            return
        worker = _Pod(self, pod)
        self.pods[uid] = worker
        if meta.get("deletionTimestamp"):
            worker.delete_requested = True
            worker.terminating.set()
        worker.thread.start()

    def hold(self, predicate: Callable[[dict], bool]) -> None:
        """Keep pods for which ``predicate(pod)`` is true in ContainerCreating until :meth:`release`."""
        self._holds.append(predicate)

    def release(self) -> None:
        """Let held pods start."""
        self._holds.clear()

    def is_held(self, pod: dict) -> bool:
        """Whether a hold applies to this pod now."""
        return any(predicate(pod) for predicate in list(self._holds))

    def evict(
        self, namespace: str, name: str, message: str = "The node was low on resource: memory."
    ) -> None:
        """Evict a running pod as the kubelet's eviction manager does: DisruptionTarget, Failed, Evicted."""
        pod = next((p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)), None)
        if pod is None:
            raise KeyError(f"pod {namespace}/{name} does not run on this agent")
        pod.evicted = message
        with pod.lock:
            pod.terminating.set()
            proc = pod.proc
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)

    def pod_dir(self, namespace: str, name: str) -> Path:
        """The folder of a pod's volumes and logs."""
        pod = next(p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name))
        return pod.dir

    # ----- logs ---------------------------------------------------------------------------------

    def _log_file(self, namespace: str, name: str, container: str) -> tuple[Path, _Pod] | None:
        candidates = [p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)]
        for pod in reversed(candidates):
            if pod.container["name"] == container:
                return pod.log_path, pod
        return None

    def _serve_logs(self) -> int:
        agent = self
        serving = self.plane.kubelet_serving

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes (follow streams)

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "not found")
                    return
                found = agent._log_file(*parts[1:])
                if found is None:
                    self.send_error(404, f"container {parts[3]} of pod {parts[1]}/{parts[2]} is not here")
                    return
                query = urllib.parse.parse_qs(url.query)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                try:
                    _stream_log(self.wfile, *found, query)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        server = Server(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(serving[0]), str(serving[1]))
        # Only the API server (its kubelet client certificate, from the cluster CA) may read logs.
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(self.plane.certs.ca))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._log_server = server
        self._spawn(server.serve_forever, "node-logs")
        return server.server_address[1]


def _stream_log(out, path: Path, pod: _Pod, query: dict) -> None:
    def flag(name):
        return (query.get(name) or ["false"])[0].lower() == "true"

    follow, timestamps = flag("follow"), flag("timestamps")
    tail = int(query["tailLines"][0]) if "tailLines" in query else None
    limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
    sent = 0

    def emit(raw: bytes) -> bool:
        nonlocal sent
        stamp, _, rest = raw.partition(b" ")
        _stream, _, rest = rest.partition(b" ")
        _tag, _, text = rest.partition(b" ")
        line = (stamp + b" " if timestamps else b"") + text + b"\n"
        if limit is not None and sent + len(line) > limit:
            out.write(line[: limit - sent])
            out.flush()
            return False
        out.write(line)
        sent += len(line)
        return True

    with open(path, "rb") as log:
        lines = log.read().splitlines(keepends=True)
        complete = [line for line in lines if line.endswith(b"\n")]
        pending = b"".join(lines[len(complete) :])
        if tail is not None:
            complete = complete[-tail:] if tail else []
        for line in complete:
            if not emit(line.rstrip(b"\n")):
                return
        out.flush()
        if not follow:
            return
        while True:
            chunk = log.read()
            if chunk:
                pending += chunk
                *done, pending = pending.split(b"\n")
                for line in done:
                    if not emit(line):
                        return
                out.flush()
            elif pod.exited.is_set():
                return
            else:
                time.sleep(0.2)
