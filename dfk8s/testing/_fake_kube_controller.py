"""The fake Job controller: pods for a Job's indexes, their ends, and the Job status written from them.

Part of :mod:`dfk8s.testing.fake_kube` (a stand-in kube-apiserver for tests); see its docstring.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import subprocess
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from dfk8s.testing._fake_kube_store import now_iso

INDEX_KEY = "batch.kubernetes.io/job-completion-index"


def format_indexes(indexes) -> str:
    """Write indexes as the Job controller does: sorted, runs as ``a-b``, comma separated (``1,3-5``)."""
    out: list[str] = []
    ordered = sorted(set(indexes))
    start = prev = None
    for index in ordered + [None]:
        if index is not None and prev is not None and index == prev + 1:
            prev = index
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = index
    return ",".join(out)


@dataclass
class _JobTrack:
    """What the Job controller keeps about one Job (derived from its pods on a real cluster)."""

    key: tuple[str, str]
    uid: str
    completions: int
    indexed: bool
    completed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    failures: Counter = field(default_factory=Counter)
    active: dict[int, str] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)
    succeeded_pods: int = 0
    failed_pods: int = 0
    finished: bool = False
    injected: dict[int, deque] = field(default_factory=dict)


@dataclass
class _PodTrack:
    job: tuple[str, str] | None
    index: int
    log: bytearray = field(default_factory=bytearray)
    process: subprocess.Popen | None = None
    terminal: bool = False
    deleted: bool = False


class _JobController:
    """What kube-controller-manager's Job controller (and the kubelet's pod status) does, under the lock.

    A mixin of :class:`dfk8s.testing.fake_kube.FakeKube`, whose ``__init__`` sets the state below.
    """

    _store: dict[str, dict[tuple[str, str], dict]]
    _jobs: dict[tuple[str, str], _JobTrack]
    _pods: dict[tuple[str, str], _PodTrack]

    def _track(self, namespace: str, job: str) -> _JobTrack:
        track = self._jobs.get((namespace, job))
        if track is None:
            raise KeyError(f"no job {namespace}/{job}")
        return track

    def _create_pod(self, track: _JobTrack, index: int) -> str:
        namespace, job_name = track.key
        job = self._store["jobs"][track.key]
        template = copy.deepcopy(job["spec"]["template"])
        suffix = secrets.token_hex(3)[:5]
        name = f"{job_name}-{index}-{suffix}" if track.indexed else f"{job_name}-{suffix}"
        meta = template.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        annotations = dict(meta.get("annotations") or {})
        spec = template["spec"]
        if track.indexed:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            for container in spec.get("containers", []):
                container.setdefault("env", []).append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {
                                "apiVersion": "v1",
                                "fieldPath": f"metadata.annotations['{INDEX_KEY}']",
                            }
                        },
                    }
                )
        spec.setdefault("nodeName", "fake-node")
        pod = {
            "metadata": {
                "name": name,
                "generateName": name[: -len(suffix)],
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_iso(),
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job_name,
                        "uid": track.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": {
                "phase": "Pending",
                "conditions": [_condition("PodScheduled")],
                "containerStatuses": [
                    _container_status(
                        c["name"], c.get("image", ""), {"waiting": {"reason": "ContainerCreating"}}
                    )
                    for c in spec.get("containers", [])
                ],
            },
        }
        self._pods[(namespace, name)] = _PodTrack(track.key, index)
        track.active[index] = name
        track.attempts[index] += 1
        self._put("pods", pod, "ADDED")
        self._sync_job(track)
        return name

    def _set_running(self, namespace: str, name: str) -> None:
        pod = self._store["pods"][(namespace, name)]
        pod["status"].update(
            phase="Running",
            startTime=now_iso(),
            podIP="10.0.0.1",
            conditions=[
                _condition("PodScheduled"),
                _condition("Initialized"),
                _condition("ContainersReady"),
                _condition("Ready"),
            ],
        )
        pod["status"]["containerStatuses"] = [
            _container_status(
                c["name"], c.get("image", ""), {"running": {"startedAt": now_iso()}}, ready=True
            )
            for c in pod["spec"].get("containers", [])
        ]
        self._put("pods", pod, "MODIFIED")
        track = self._jobs.get(self._pods[(namespace, name)].job or ("", ""))
        if track:
            self._sync_job(track)

    def _terminate(
        self,
        namespace: str,
        name: str,
        exit_code: int,
        *,
        disruption: bool = False,
        reason: str | None = None,
    ) -> None:
        """End a pod's container: set the pod terminal, then let its Job react."""
        pod_track = self._pods.get((namespace, name))
        pod = self._store["pods"].get((namespace, name))
        if pod_track is None or pod is None or pod_track.terminal:
            return
        pod_track.terminal = True
        succeeded = exit_code == 0 and not disruption
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if succeeded else (reason or "Error"),
                "startedAt": pod["status"].get("startTime", now_iso()),
                "finishedAt": now_iso(),
            }
        }
        conditions = [
            _condition("PodScheduled"),
            _condition("Initialized"),
            _condition("ContainersReady", status="False", reason="PodCompleted"),
            _condition("Ready", status="False", reason="PodCompleted"),
        ]
        if disruption:
            conditions.insert(
                0,
                _condition(
                    "DisruptionTarget", reason="EvictionByEvictionAPI", message="Eviction API: evicting"
                ),
            )
        pod["status"].update(phase="Succeeded" if succeeded else "Failed", conditions=conditions)
        pod["status"]["containerStatuses"] = [
            _container_status(c["name"], c.get("image", ""), state) for c in pod["spec"].get("containers", [])
        ]
        self._put("pods", pod, "MODIFIED")
        track = self._jobs.get(pod_track.job) if pod_track.job else None
        if track is None or track.finished or track.active.get(pod_track.index) != name:
            return
        del track.active[pod_track.index]
        index = pod_track.index
        if succeeded:
            track.succeeded_pods += 1
            track.completed.add(index)
        else:
            self._pod_failed(track, pod, index, exit_code, disruption)
        self._sync_job(track)

    def _pod_failed(self, track: _JobTrack, pod: dict, index: int, exit_code: int, disruption: bool) -> None:
        spec = self._store["jobs"][track.key]["spec"]
        action = _failure_action(spec.get("podFailurePolicy"), pod, exit_code, disruption)
        if action == "Ignore":
            return  # not counted: the index is pending again
        track.failed_pods += 1
        if action == "FailJob":
            self._fail_job(
                track,
                "PodFailurePolicy",
                f"Container of pod {pod['metadata']['name']} failed "
                f"with exit code {exit_code} matching FailJob rule",
            )
            return
        per_index = spec.get("backoffLimitPerIndex")
        if track.indexed and per_index is not None:
            track.failures[index] += 1
            if action == "FailIndex" or track.failures[index] > per_index:
                track.failed.add(index)

    def _fail_job(self, track: _JobTrack, reason: str, message: str) -> None:
        if track.finished:
            return
        job = self._store["jobs"][track.key]
        job["status"]["conditions"] = [
            c for c in job["status"].get("conditions") or () if c["type"] != "Suspended"
        ]
        job["status"]["conditions"].append(_condition("FailureTarget", reason=reason, message=message))
        self._put("jobs", job, "MODIFIED")
        for name in list(track.active.values()):
            self._stop_pod(track.key[0], name, reason)
        track.active.clear()
        track.finished = True
        self._sync_job(track, failed=(reason, message))

    def _stop_pod(self, namespace: str, name: str, reason: str) -> None:
        pod_track = self._pods.get((namespace, name))
        if pod_track and pod_track.process is not None and pod_track.process.poll() is None:
            _kill(pod_track.process)
        if pod_track and not pod_track.terminal:
            track = self._jobs.get(pod_track.job) if pod_track.job else None
            if track:
                track.failed_pods += 1
                track.active.pop(pod_track.index, None)
            pod_track.job = None  # the Job no longer reacts to it
            self._terminate(namespace, name, 137, reason=reason)

    def _delete_pod(self, namespace: str, name: str) -> dict:
        pod_track = self._pods.get((namespace, name))
        if pod_track is not None:
            pod_track.deleted = True
            if pod_track.process is not None and pod_track.process.poll() is None:
                _kill(pod_track.process)
            track = self._jobs.get(pod_track.job) if pod_track.job else None
            if track and track.active.get(pod_track.index) == name:
                del track.active[pod_track.index]  # a live Job makes a new pod for the index
                self._sync_job(track)
        obj = self._remove("pods", namespace, name)
        return obj

    def _sync_job(self, track: _JobTrack, failed: tuple[str, str] | None = None) -> None:
        """Write the Job's status from what its pods did, and end it when its indexes say so."""
        job = self._store["jobs"].get(track.key)
        if job is None:
            return
        spec, status = job["spec"], dict(job["status"])
        if not track.finished:
            per_index = spec.get("backoffLimitPerIndex")
            max_failed = spec.get("maxFailedIndexes")
            if (
                track.indexed
                and per_index is not None
                and max_failed is not None
                and len(track.failed) > max_failed
            ):
                self._fail_job(
                    track,
                    "MaxFailedIndexesExceeded",
                    "Job has exceeded the specified maximal number of failed indexes",
                )
                return
            if per_index is None and track.failed_pods > spec.get("backoffLimit", 6):
                self._fail_job(track, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                return
            if len(track.completed) + len(track.failed) >= track.completions:
                if track.failed:
                    self._fail_job(track, "FailedIndexes", "Job has failed indexes")
                    return
                track.finished = True
                for name in list(track.active.values()):
                    self._stop_pod(track.key[0], name, "Completed")
                status["completionTime"] = now_iso()
                status["conditions"] = (status.get("conditions") or []) + [
                    _condition(
                        "SuccessCriteriaMet",
                        reason="CompletionsReached",
                        message="Reached expected number of succeeded pods",
                    ),
                    _condition(
                        "Complete",
                        reason="CompletionsReached",
                        message="Reached expected number of succeeded pods",
                    ),
                ]
        ready = sum(
            1
            for name in track.active.values()
            if (self._store["pods"].get((track.key[0], name)) or {}).get("status", {}).get("phase")
            == "Running"
        )
        status.update(active=len(track.active), ready=ready, terminating=0)
        if track.succeeded_pods:
            status["succeeded"] = track.succeeded_pods
        if track.failed_pods:
            status["failed"] = track.failed_pods
        if track.indexed:
            if track.completed:
                status["completedIndexes"] = format_indexes(track.completed)
            if spec.get("backoffLimitPerIndex") is not None:
                status["failedIndexes"] = format_indexes(track.failed)
        if status.get("active") == 0:
            status.pop("active")
        if failed is not None:
            status["conditions"] = (status.get("conditions") or []) + [
                _condition("Failed", reason=failed[0], message=failed[1])
            ]
        if status != job["status"]:
            job["status"] = status
            self._put("jobs", job, "MODIFIED")


def _failure_action(policy: dict | None, pod: dict, exit_code: int, disruption: bool) -> str:
    """Return the podFailurePolicy action for a failed pod: the first matching rule's, else ``Count``."""
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or ()}
    for rule in (policy or {}).get("rules") or ():
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            container = on_codes.get("containerName")
            codes = [
                s["state"]["terminated"]["exitCode"]
                for s in pod["status"].get("containerStatuses") or ()
                if "terminated" in s["state"] and (container is None or s["name"] == container)
            ]
            values = set(on_codes.get("values") or ())
            inside = on_codes.get("operator") == "In"
            if any((code in values) if inside else (code not in values and code != 0) for code in codes):
                return rule["action"]
        for pattern in rule.get("onPodConditions") or ():
            if conditions.get(pattern["type"]) == pattern.get("status", "True"):
                return rule["action"]
    return "Count"


def _condition(
    kind: str, status: str = "True", reason: str | None = None, message: str | None = None
) -> dict:
    condition = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": now_iso()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return {k: v for k, v in condition.items() if v is not None}


def _container_status(name: str, image: str, state: dict, ready: bool = False) -> dict:
    return {
        "name": name,
        "image": image,
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": "running" in state,
        "state": state,
    }


def _kill(process: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the pod's process group, SIGKILL after ``grace`` seconds (without blocking the caller)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return

    def reap():
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    threading.Thread(target=reap, daemon=True).start()
