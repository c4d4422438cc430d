"""A stand-in Kubernetes API server for tests: the real wire format for the few things dfk8s uses.

No kube-apiserver, kind or registry can run where the tests run, so this module serves, over plain
HTTP with a dummy bearer token, what the official ``kubernetes`` client sends and expects:

* discovery: ``GET /version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/batch/v1``;
* Jobs: ``POST/GET/DELETE /apis/batch/v1/namespaces/{ns}/jobs[/{name}]``, lists with
  ``labelSelector`` / ``fieldSelector``, ``?watch=true`` streams (chunked, one JSON event per line:
  ``{"type": "ADDED|MODIFIED|DELETED|ERROR", "object": {...}}``), ``resourceVersion`` and
  ``timeoutSeconds``, 410 Gone for a compacted resource version, collection deletes;
* Pods: ``GET/DELETE /api/v1/namespaces/{ns}/pods[/{name}]`` (lists, selectors, watches) and
  ``GET .../pods/{name}/log`` (``container``, ``tailLines``, ``follow``);
* errors as ``Status`` objects (400, 401, 403, 404, 405, 409, 422), deletes honouring
  ``propagationPolicy`` (batch/v1 Jobs orphan their pods by default, as on a real cluster).

A small Job controller stands in for kube-controller-manager. Test code drives it through Python
methods (:meth:`FakeKube.start_pod`, :meth:`FakeKube.finish_pod`, :meth:`FakeKube.evict`,
:meth:`FakeKube.end_job`), or lets it run the pods (``run_pods=True``): the container command of
each pod runs as a local subprocess (``dfk8s ...`` becomes ``python -m dfk8s ...``) with the pod's
literal env, its ``secretKeyRef`` values from secrets created with :meth:`FakeKube.create_secret`,
``JOB_COMPLETION_INDEX`` from the completion-index annotation, and ``KUBECONFIG`` pointing back at
this server. The exit code sets the pod's phase; ``podFailurePolicy`` (``Ignore`` on
``DisruptionTarget``, ``FailIndex``/``FailJob``/``Count`` on exit codes), ``backoffLimitPerIndex``,
``maxFailedIndexes`` and ``backoffLimit`` decide retries and the Job's end, with
``status.completedIndexes``, ``status.failedIndexes`` and ``Complete``/``Failed`` conditions as the
Job controller writes them.

What it is not: no scheduling, RBAC, admission, defaulting beyond the Job fields above, TTL
controller or PATCH; pods skip straight from Pending to Running; a deleted pod is gone at once
(no graceful termination phase). Objects it accepts can optionally be checked against the real
OpenAPI schema with kubernetes-validate (``validate_version``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

log = logging.getLogger(__name__)

FAKE_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-dfk8s-fake",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
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
_MAX_INT32 = 2**31 - 1
_RESOURCES = {"jobs": ("batch", "v1", "Job"), "pods": ("", "v1", "Pod")}
_PATH = re.compile(
    r"^/(?:api/v1|apis/batch/v1)(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>jobs|pods)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)


def now_iso() -> str:
    """Return the current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


# ----- selectors --------------------------------------------------------------------------------

_LABEL_REQ = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_matcher(text: str | None):
    """Parse a label selector (``a=b,c!=d,e,!f,g in (x,y),h notin (z)``) into a predicate on labels.

    Raises:
        ValueError: the selector does not parse.

    """
    tests = []
    for requirement in _split_selector(text or ""):
        match = _LABEL_REQ.match(requirement)
        if not match:
            raise ValueError(f"unable to parse requirement: {requirement!r}")
        key, neg = match["key"], bool(match["neg"])
        if match["op"]:
            if neg:
                raise ValueError(f"unable to parse requirement: {requirement!r}")
            value, equal = match["value"], match["op"] != "!="
            tests.append(lambda labels, k=key, v=value, e=equal: (labels.get(k) == v) == e)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            inside = match["setop"] == "in"
            tests.append(
                lambda labels, k=key, vs=values, i=inside: (
                    (labels.get(k) in vs) if i else (labels.get(k) not in vs)
                )
            )
        else:
            tests.append(lambda labels, k=key, n=neg: (k in labels) != n)
    return lambda labels: all(test(labels or {}) for test in tests)


_FIELDS = {
    "jobs": {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace")},
    "pods": {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "status.phase": ("status", "phase"),
        "spec.nodeName": ("spec", "nodeName"),
    },
}


def field_matcher(resource: str, text: str | None):
    """Parse a field selector (``metadata.name=x``) for ``resource`` into a predicate on objects.

    Raises:
        ValueError: an unsupported field or a bad requirement, as the API server says.

    """
    tests = []
    for requirement in _split_selector(text or ""):
        match = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", requirement)
        if not match:
            raise ValueError(f"invalid field selector: {requirement!r}")
        name, op, value = match.groups()
        if name not in _FIELDS[resource]:
            raise ValueError(f"field label not supported: {name}")
        path = _FIELDS[resource][name]
        tests.append(
            lambda obj, p=path, v=value, e=op != "!=": ((obj.get(p[0]) or {}).get(p[1], "") == v) == e
        )
    return lambda obj: all(test(obj) for test in tests)


# ----- state ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error the fake answers with a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        """Return the ``Status`` body."""
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(resource: str, name: str) -> ApiError:
    group = _RESOURCES[resource][0]
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(
        404, "NotFound", f'{qualified} "{name}" not found', {"name": name, "group": group, "kind": resource}
    )


@dataclass
class _Event:
    rv: int
    resource: str
    namespace: str
    type: str
    old: dict | None
    new: dict


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


class FakeKube:
    """The fake API server and Job controller; see the module docstring.

    Args:
        run_pods: Start pods for pending indexes and run their commands as subprocesses.
        token: The bearer token clients must send.
        watch_timeout: Longest a watch stays open (the API server's ``--min-request-timeout``);
            short values make clients re-list and re-watch, as they must on a real cluster.
        validate_version: When set (e.g. ``"1.29"``), created Jobs are checked strictly against that
            version's schema with kubernetes-validate and refused with 422 when invalid.
        extra_env: Env vars added to every pod subprocess (after the test's own env, minus
            credentials).
        poll_seconds: How often the controller looks for work.

    """

    def __init__(
        self,
        *,
        run_pods: bool = False,
        token: str = "fake-token",
        watch_timeout: float = 60.0,
        validate_version: str | None = None,
        extra_env: dict[str, str] | None = None,
        poll_seconds: float = 0.05,
    ):
        self.run_pods = run_pods
        self.token = token
        self.watch_timeout = watch_timeout
        self.validate_version = validate_version
        self.extra_env = dict(extra_env or {})
        self.poll_seconds = poll_seconds
        self.kubeconfig_path: str | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rv = 1
        self._compacted = 0
        self._events: deque[_Event] = deque(maxlen=10_000)
        self._store: dict[str, dict[tuple[str, str], dict]] = {"jobs": {}, "pods": {}}
        self._secrets: dict[tuple[str, str], dict[str, str]] = {}
        self._jobs: dict[tuple[str, str], _JobTrack] = {}
        self._pods: dict[tuple[str, str], _PodTrack] = {}
        self._forbidden: set[tuple[str, str]] = set()
        self._injections: dict[tuple[str, str], dict[int, deque]] = {}
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.requests: list[tuple[str, str]] = []

    # ----- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server, ``http://127.0.0.1:PORT``."""
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKube:
        """Serve on a free loopback port in background threads (and run the controller)."""
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        serve = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="fake-kube", daemon=True
        )
        serve.start()
        self._threads.append(serve)
        if self.run_pods:
            controller = threading.Thread(target=self._control_loop, name="fake-kube-controller", daemon=True)
            controller.start()
            self._threads.append(controller)
        return self

    def stop(self) -> None:
        """Stop serving, end open watches and kill every pod process."""
        self._stopping.set()
        with self._cond:
            processes = [p.process for p in self._pods.values() if p.process is not None]
            self._cond.notify_all()
        for process in processes:
            _kill(process, grace=0.5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(
        self, path: str | os.PathLike, *, namespace: str = "default", context: str = "fake"
    ) -> str:
        """Write a kubeconfig (http server, token auth) for this server; pods get it as KUBECONFIG."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": self.token}}],
            "contexts": [
                {"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}
            ],
            "current-context": context,
        }
        Path(path).write_text(yaml.safe_dump(config), encoding="utf-8")
        self.kubeconfig_path = str(path)
        return str(path)

    # ----- test-side controls -------------------------------------------------------------------

    def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Create a Secret pods can reference (kept out of the API: dfk8s never reads Secrets)."""
        with self._lock:
            self._secrets[(namespace, name)] = dict(data)

    def forbid(self, verb: str, resource: str) -> None:
        """Answer 403 to ``verb`` (create/get/list/watch/delete) on ``resource`` (jobs/pods/pods/log)."""
        with self._lock:
            self._forbidden.add((verb, resource))

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()
            self._cond.notify_all()

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        """Return a copy of a stored object, or None."""
        with self._lock:
            obj = self._store[resource].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, resource: str, namespace: str, label_selector: str | None = None) -> list[dict]:
        """Return copies of the stored objects of ``resource`` in ``namespace`` matching the selector."""
        match = label_matcher(label_selector)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._store[resource].items())
                if ns == namespace and match(obj["metadata"].get("labels"))
            ]

    def pod_for(self, namespace: str, job: str, index: int) -> str | None:
        """Name of the active pod of ``index`` of a Job, or None."""
        with self._lock:
            track = self._jobs.get((namespace, job))
            return track.active.get(index) if track else None

    def pod_log(self, namespace: str, pod: str) -> str:
        """Everything a pod wrote so far."""
        with self._lock:
            return bytes(self._pods[(namespace, pod)].log).decode(errors="replace")

    def start_pod(self, namespace: str, job: str, index: int = 0, *, log: str = "") -> str:
        """Create a Running pod for ``index`` (what the Job controller and kubelet do); returns its name."""
        with self._cond:
            track = self._track(namespace, job)
            if track.finished or index in track.completed or index in track.failed:
                raise ValueError(f"index {index} of job {job} is not pending")
            if index in track.active:
                raise ValueError(f"index {index} of job {job} already has pod {track.active[index]}")
            name = self._create_pod(track, index)
            self._set_running(namespace, name)
            self._pods[(namespace, name)].log.extend(log.encode())
            return name

    def finish_pod(
        self, namespace: str, job: str, index: int = 0, exit_code: int = 0, *, log: str = ""
    ) -> str:
        """End the pod of ``index`` (starting one if none) with ``exit_code``; returns the pod name."""
        with self._cond:
            track = self._track(namespace, job)
            name = track.active.get(index) or self.start_pod(namespace, job, index)
            self._pods[(namespace, name)].log.extend(log.encode())
            self._terminate(namespace, name, exit_code)
            return name

    def evict(self, namespace: str, job: str, index: int = 0) -> str:
        """Evict the pod of ``index`` (condition ``DisruptionTarget``, as a drain or preemption does)."""
        with self._cond:
            track = self._track(namespace, job)
            name = track.active.get(index) or self.start_pod(namespace, job, index)
            self._terminate(namespace, name, 143, disruption=True)
            return name

    def end_job(
        self,
        namespace: str,
        job: str,
        *,
        reason: str = "DeadlineExceeded",
        message: str = "Job was active longer than specified deadline",
    ) -> None:
        """End a Job as Failed now, whatever its indexes (like activeDeadlineSeconds running out)."""
        with self._cond:
            self._fail_job(self._track(namespace, job), reason, message)

    def inject(self, namespace: str, job: str, index: int, *actions: int | str) -> None:
        """With ``run_pods``: the next pods of ``index`` do ``actions`` in turn instead of running.

        Each action is an exit code (the pod fails with it at once) or ``"evict"``; once they are
        used up, pods of the index run their command.
        """
        with self._lock:
            self._injections.setdefault((namespace, job), {}).setdefault(index, deque()).extend(actions)

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        """Wait until ``predicate()`` is truthy (re-checked on every change); returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"fake kube: timed out waiting for {what}")
                self._cond.wait(min(0.2, remaining))

    def job_finished(self, namespace: str, job: str) -> str | None:
        """``"Complete"`` or ``"Failed"`` once the Job has that condition, else None."""
        obj = self.get("jobs", namespace, job)
        for condition in ((obj or {}).get("status") or {}).get("conditions") or ():
            if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
                return condition["type"]
        return None

    # ----- store --------------------------------------------------------------------------------

    def _put(self, resource: str, obj: dict, event: str) -> dict:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        old = self._store[resource].get(key)
        self._store[resource][key] = obj
        self._record(
            _Event(self._rv, resource, key[0], event, copy.deepcopy(old) if old else None, copy.deepcopy(obj))
        )
        return obj

    def _record(self, event: _Event) -> None:
        if len(self._events) == self._events.maxlen:
            self._compacted = self._events[0].rv  # the oldest event is about to be forgotten
        self._events.append(event)
        self._cond.notify_all()

    def _remove(self, resource: str, namespace: str, name: str) -> dict:
        obj = self._store[resource].pop((namespace, name))
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._record(_Event(self._rv, resource, namespace, "DELETED", copy.deepcopy(obj), copy.deepcopy(obj)))
        return obj

    def _track(self, namespace: str, job: str) -> _JobTrack:
        track = self._jobs.get((namespace, job))
        if track is None:
            raise KeyError(f"no job {namespace}/{job}")
        return track

    # ----- API operations (called by the HTTP handler) ------------------------------------------

    def api_create_job(self, namespace: str, body: dict) -> dict:
        """POST a Job: check it, default it as the API server does, store it."""
        if body.get("kind") != "Job" or body.get("apiVersion") != "batch/v1":
            raise ApiError(
                400,
                "BadRequest",
                f"the body is a {body.get('apiVersion')}/{body.get('kind')}, not a batch/v1 Job",
            )
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", 'Job.batch "" is invalid: metadata.name: Required value')
        if meta.get("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if self.validate_version:
            self._validate(body, name)
        with self._cond:
            if (namespace, name) in self._store["jobs"]:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'jobs.batch "{name}" already exists',
                    {"name": name, "group": "batch", "kind": "jobs"},
                )
            job = copy.deepcopy(body)
            uid = str(uuid.uuid4())
            meta = job["metadata"]
            meta.update(namespace=namespace, uid=uid, creationTimestamp=now_iso(), generation=1)
            meta.setdefault("labels", {})
            meta["labels"].update(
                {
                    "batch.kubernetes.io/controller-uid": uid,
                    "batch.kubernetes.io/job-name": name,
                    "controller-uid": uid,
                    "job-name": name,
                }
            )
            spec = job.setdefault("spec", {})
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            if "completions" not in spec and "parallelism" not in spec:
                spec["completions"] = 1
            spec.setdefault("parallelism", 1)
            spec.setdefault("backoffLimit", _MAX_INT32 if "backoffLimitPerIndex" in spec else 6)
            spec.setdefault(
                "podReplacementPolicy", "Failed" if "podFailurePolicy" in spec else "TerminatingOrFailed"
            )
            spec["manualSelector"] = False
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
            template_meta.setdefault("labels", {}).update(
                {
                    "batch.kubernetes.io/controller-uid": uid,
                    "batch.kubernetes.io/job-name": name,
                    "controller-uid": uid,
                    "job-name": name,
                }
            )
            job["status"] = (
                {} if spec["suspend"] else {"startTime": now_iso(), "active": 0, "ready": 0, "terminating": 0}
            )
            if spec["suspend"]:
                job["status"]["conditions"] = [_condition("Suspended", "JobSuspended", "Job suspended")]
            if spec["completionMode"] == "Indexed" and "backoffLimitPerIndex" in spec:
                job["status"]["failedIndexes"] = ""
            self._jobs[(namespace, name)] = _JobTrack(
                (namespace, name), uid, int(spec.get("completions") or 1), spec["completionMode"] == "Indexed"
            )
            self._put("jobs", job, "ADDED")
            return copy.deepcopy(job)

    def api_delete_job(self, namespace: str, name: str, policy: str | None) -> dict:
        """DELETE a Job; its pods go with it (Background/Foreground) or stay, ownerless (Orphan, default)."""
        with self._cond:
            job = self._store["jobs"].get((namespace, name))
            if job is None:
                raise _not_found("jobs", name)
            uid = job["metadata"]["uid"]
            track = self._jobs.pop((namespace, name), None)
            if track:
                track.finished = True
            owned = [
                pod_name
                for (ns, pod_name), pod in list(self._store["pods"].items())
                if ns == namespace
                and any(ref.get("uid") == uid for ref in pod["metadata"].get("ownerReferences") or ())
            ]
            policy = policy or "Orphan"
            if policy == "Foreground":
                job["metadata"]["deletionTimestamp"] = now_iso()
                job["metadata"]["finalizers"] = ["foregroundDeletion"]
                self._put("jobs", job, "MODIFIED")
                returned = copy.deepcopy(job)
                for pod_name in owned:
                    self._delete_pod(namespace, pod_name)
                self._remove("jobs", namespace, name)
                return returned
            self._remove("jobs", namespace, name)
            for pod_name in owned:
                if policy == "Background":
                    self._delete_pod(namespace, pod_name)
                else:
                    pod = self._store["pods"][(namespace, pod_name)]
                    pod["metadata"].pop("ownerReferences", None)
                    self._pods[(namespace, pod_name)].job = None
                    self._put("pods", pod, "MODIFIED")
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "group": "batch", "kind": "jobs", "uid": uid},
            }

    def api_delete_pod(self, namespace: str, name: str) -> dict:
        """DELETE a pod: its process is killed and it is gone; a live Job makes a new one for the index."""
        with self._cond:
            if (namespace, name) not in self._store["pods"]:
                raise _not_found("pods", name)
            return self._delete_pod(namespace, name)

    def _validate(self, body: dict, name: str) -> None:
        import kubernetes_validate  # test-only dependency

        try:
            kubernetes_validate.validate(body, self.validate_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: {where}: {exc.message}') from None

    # ----- the Job controller -------------------------------------------------------------------

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

    # ----- running pods -------------------------------------------------------------------------

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


# ----- HTTP -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_fake: FakeKube

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("fake kube: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    # ----- plumbing -----------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        fake = self.server_fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        fake.requests.append((method, self.path))
        try:
            body = self._read_body()
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            discovery = _discovery(url.path.rstrip("/") or "/")
            if discovery is not None and method == "GET":
                return self._json(200, discovery)
            match = _PATH.match(url.path)
            if not match:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._route(method, match["ns"], match["resource"], match["name"], match["sub"], query, body)
        except ApiError as exc:
            self._json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _read_body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _check_allowed(self, verb: str, resource: str, namespace: str | None) -> None:
        if (verb, resource) in self.server_fake._forbidden:
            group = _RESOURCES.get(resource.split("/")[0], ("",))[0]
            raise ApiError(
                403,
                "Forbidden",
                f'{resource}{"." + group if group else ""} is forbidden: User "system:serviceaccount:'
                f'{namespace}:default" cannot {verb} resource "{resource}" in API group "{group}" '
                f'in the namespace "{namespace}"',
                {"kind": resource},
            )

    # ----- routes -------------------------------------------------------------------------------

    def _route(
        self,
        method: str,
        namespace: str | None,
        resource: str,
        name: str | None,
        sub: str | None,
        query: dict,
        body: dict | None,
    ) -> None:
        fake = self.server_fake
        if (resource == "jobs") != self.path.startswith("/apis/batch/v1"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watching = query.get("watch", "").lower() in ("true", "1")
        if sub == "log":
            self._check_allowed("get", "pods/log", namespace)
            return self._log(namespace, name, query)
        if method == "GET" and name is None:
            self._check_allowed("watch" if watching else "list", resource, namespace)
            try:
                labels = label_matcher(query.get("labelSelector"))
                fields = field_matcher(resource, query.get("fieldSelector"))
            except ValueError as exc:
                raise ApiError(400, "BadRequest", str(exc)) from None
            if watching:
                return self._watch(resource, namespace, labels, fields, query)
            return self._list(resource, namespace, labels, fields)
        if method == "GET":
            self._check_allowed("get", resource, namespace)
            obj = fake.get(resource, namespace, name)
            if obj is None:
                raise _not_found(resource, name)
            return self._json(200, _with_kind(resource, obj))
        if method == "POST" and resource == "jobs" and name is None:
            self._check_allowed("create", resource, namespace)
            return self._json(201, _with_kind(resource, fake.api_create_job(namespace, body or {})))
        if method == "DELETE" and name is not None:
            self._check_allowed("delete", resource, namespace)
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
            if resource == "jobs":
                return self._json(200, fake.api_delete_job(namespace, name, policy))
            return self._json(200, _with_kind(resource, fake.api_delete_pod(namespace, name)))
        if method == "DELETE":
            self._check_allowed("deletecollection", resource, namespace)
            labels = label_matcher(query.get("labelSelector"))
            fields = field_matcher(resource, query.get("fieldSelector"))
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy")
            with fake._cond:
                doomed = [
                    obj
                    for (ns, _), obj in sorted(fake._store[resource].items())
                    if ns == namespace and labels(obj["metadata"].get("labels")) and fields(obj)
                ]
                for obj in doomed:
                    if resource == "jobs":
                        fake.api_delete_job(namespace, obj["metadata"]["name"], policy)
                    else:
                        fake.api_delete_pod(namespace, obj["metadata"]["name"])
            return self._json(200, _list_body(resource, [copy.deepcopy(o) for o in doomed], fake._rv))
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {resource}")

    def _list(self, resource: str, namespace: str | None, labels, fields) -> None:
        fake = self.server_fake
        with fake._lock:
            items = [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(fake._store[resource].items())
                if (namespace is None or ns == namespace)
                and labels(obj["metadata"].get("labels"))
                and fields(obj)
            ]
            rv = fake._rv
        self._json(200, _list_body(resource, items, rv))

    def _watch(self, resource: str, namespace: str | None, labels, fields, query: dict) -> None:
        fake = self.server_fake

        def matches(obj: dict | None) -> bool:
            return (
                obj is not None
                and (namespace is None or obj["metadata"]["namespace"] == namespace)
                and labels(obj["metadata"].get("labels"))
                and fields(obj)
            )

        timeout = float(query.get("timeoutSeconds") or fake.watch_timeout)
        deadline = time.monotonic() + min(timeout, fake.watch_timeout)
        requested = query.get("resourceVersion") or "0"
        with fake._lock:
            if requested == "0":
                initial = [
                    {"type": "ADDED", "object": _with_kind(resource, copy.deepcopy(obj))}
                    for (ns, _), obj in sorted(fake._store[resource].items())
                    if matches(obj)
                ]
                cursor = fake._rv
            else:
                initial, cursor = [], int(requested)
        self._start_stream("application/json")
        try:
            for event in initial:
                self._chunk(json.dumps(event).encode() + b"\n")
            while not fake._stopping.is_set() and time.monotonic() < deadline:
                with fake._cond:
                    if cursor < fake._compacted:
                        gone = ApiError(
                            410, "Expired", f"too old resource version: {cursor} ({fake._compacted})"
                        )
                        self._chunk(json.dumps({"type": "ERROR", "object": gone.status()}).encode() + b"\n")
                        break
                    events = [e for e in fake._events if e.rv > cursor and e.resource == resource]
                    if events:
                        cursor = events[-1].rv
                    else:
                        cursor = max(cursor, fake._rv)
                        fake._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                        continue
                for event in events:
                    was, now = matches(event.old), matches(event.new)
                    kind = event.type
                    if kind == "MODIFIED" and was != now:
                        kind = "ADDED" if now else "DELETED"
                    if (kind == "DELETED" and not (was or now)) or (kind != "DELETED" and not now):
                        continue
                    self._chunk(
                        json.dumps({"type": kind, "object": _with_kind(resource, event.new)}).encode() + b"\n"
                    )
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _log(self, namespace: str, name: str, query: dict) -> None:
        fake = self.server_fake
        pod = fake.get("pods", namespace, name)
        if pod is None:
            raise _not_found("pods", name)
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = query.get("container") or containers[0]
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        with fake._lock:
            pod_track = fake._pods.get((namespace, name))
        if pod["status"]["phase"] == "Pending" and not (pod_track and pod_track.log):
            reason = pod["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason", "")
            raise ApiError(
                400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        tail = query.get("tailLines")

        def text() -> bytes:
            with fake._lock:
                data = bytes(pod_track.log) if pod_track else b""
            if tail is not None:
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(tail) :]) if int(tail) else b""
            return data

        if query.get("follow", "").lower() not in ("true", "1"):
            data = text()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._start_stream("text/plain")
        with fake._lock:
            sent = len(pod_track.log) - len(text()) if pod_track else 0  # tailLines applies to following too
        try:
            while True:
                with fake._cond:
                    data = bytes(pod_track.log) if pod_track else b""
                    done = (
                        pod_track is None
                        or pod_track.terminal
                        or pod_track.deleted
                        or fake._stopping.is_set()
                    )
                    if len(data) == sent and not done:
                        fake._cond.wait(0.5)
                        continue
                self._chunk(data[sent:])
                sent = len(data)
                if done:
                    break
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _with_kind(resource: str, obj: dict) -> dict:
    group, version, kind = _RESOURCES[resource]
    return {"kind": kind, "apiVersion": f"{group}/{version}" if group else version, **obj}


def _list_body(resource: str, items: list[dict], rv: int) -> dict:
    group, version, kind = _RESOURCES[resource]
    return {
        "kind": f"{kind}List",
        "apiVersion": f"{group}/{version}" if group else version,
        "metadata": {"resourceVersion": str(rv)},
        "items": items,
    }


def _discovery(path: str) -> dict | None:
    if path == "/version":
        return dict(FAKE_VERSION)
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        }
    if path == "/apis":
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": "batch",
                    "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"},
                }
            ],
        }
    verbs = ["create", "delete", "deletecollection", "get", "list", "watch"]
    if path == "/api/v1":
        return {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": verbs},
                {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
            ],
        }
    if path == "/apis/batch/v1":
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "batch/v1",
            "resources": [
                {"name": "jobs", "singularName": "job", "namespaced": True, "kind": "Job", "verbs": verbs}
            ],
        }
    return None


__all__ = ["FakeKube", "format_indexes", "label_matcher", "field_matcher"]
