"""The fake API server's wire layer: HTTP routes, ``Status`` errors, lists, watch and log streams.

Part of :mod:`dfk8s.testing.fake_kube` (a stand-in kube-apiserver for tests); see its docstring.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from dfk8s.testing._fake_kube_store import _RESOURCES, ApiError, _not_found, field_matcher, label_matcher

if TYPE_CHECKING:
    from dfk8s.testing.fake_kube import FakeKube

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
_PATH = re.compile(
    r"^/(?:api/v1|apis/batch/v1)(?:/namespaces/(?P<ns>[^/]+))?/(?P<resource>jobs|pods)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)


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
