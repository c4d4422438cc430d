"""The fake API server's write operations: create a Job (checked and defaulted), delete Jobs and pods.

Part of :mod:`dfk8s.testing.fake_kube` (a stand-in kube-apiserver for tests); see its docstring.
"""

from __future__ import annotations

import copy
import uuid

from dfk8s.testing._fake_kube_controller import _condition, _JobTrack
from dfk8s.testing._fake_kube_store import ApiError, _not_found, now_iso

_MAX_INT32 = 2**31 - 1


class _ApiServer:
    """``POST`` and ``DELETE`` as the API server (and garbage collector) answer them.

    A mixin of :class:`dfk8s.testing.fake_kube.FakeKube`, whose ``__init__`` sets the state below.
    """

    validate_version: str | None

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
