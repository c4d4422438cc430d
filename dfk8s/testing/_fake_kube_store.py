"""The fake API server's objects: the store, resourceVersions, the event history watches read, selectors.

Part of :mod:`dfk8s.testing.fake_kube` (a stand-in kube-apiserver for tests); see its docstring.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

_RESOURCES = {"jobs": ("batch", "v1", "Job"), "pods": ("", "v1", "Pod")}


def now_iso() -> str:
    """Return the current time as Kubernetes writes it (RFC 3339, seconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


# ----- errors and events ------------------------------------------------------------------------


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


class _ObjectStore:
    """Jobs and pods by ``(namespace, name)``, each write a new resourceVersion and a recorded event.

    A mixin of :class:`dfk8s.testing.fake_kube.FakeKube`, whose ``__init__`` sets the state below.
    """

    _lock: threading.RLock
    _cond: threading.Condition
    _rv: int
    _compacted: int
    _events: deque[_Event]
    _store: dict[str, dict[tuple[str, str], dict]]

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

    # ----- writes: each a new resourceVersion and event -----------------------------------------

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
