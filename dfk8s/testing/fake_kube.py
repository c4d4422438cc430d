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

:class:`FakeKube` is put together from private modules, one job each: ``_fake_kube_store`` (objects,
resourceVersions, the event history watches read, selectors), ``_fake_kube_api`` (creating and
deleting as the API server does), ``_fake_kube_controller`` (the Job controller: pods per index, Job
status), ``_fake_kube_pods`` (``run_pods``: pod commands as local processes) and ``_fake_kube_http``
(the wire: routes, ``Status`` errors, list, watch and log streams). This module keeps the lifecycle
and the test-side controls, and is the one to import.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from http.server import ThreadingHTTPServer
from pathlib import Path

import yaml

from dfk8s.testing._fake_kube_api import _ApiServer
from dfk8s.testing._fake_kube_controller import (
    INDEX_KEY,
    _JobController,
    _JobTrack,
    _kill,
    _PodTrack,
    format_indexes,
)
from dfk8s.testing._fake_kube_http import FAKE_VERSION, _Handler
from dfk8s.testing._fake_kube_pods import CREDENTIAL_ENV, _PodRunner
from dfk8s.testing._fake_kube_store import (
    ApiError,
    _Event,
    _ObjectStore,
    field_matcher,
    label_matcher,
    now_iso,
)

__all__ = [
    "CREDENTIAL_ENV",
    "FAKE_VERSION",
    "INDEX_KEY",
    "ApiError",
    "FakeKube",
    "field_matcher",
    "format_indexes",
    "label_matcher",
    "now_iso",
]


class FakeKube(_ApiServer, _PodRunner, _JobController, _ObjectStore):
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
