"""The storage interface every stage talks through."""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from typing import Any


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage(abc.ABC):
    """A flat key space of whole objects; keys are ``/``-separated and relative to the root."""

    uri: str

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the whole object; raise :class:`dfk8s.errors.NotFound` if it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object: readers see the old object or the new one, never half of it."""

    @abc.abstractmethod
    def write_file(self, key: str, local_path: str) -> None:
        """Upload a local file as one whole object."""

    @abc.abstractmethod
    def open_lines(self, key: str) -> Iterator[bytes]:
        """Stream an object's lines (without their newline), never holding it whole in memory."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Return whether the object exists."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys under ``prefix`` (relative to the root), sorted."""

    @abc.abstractmethod
    def folders(self) -> list[str]:
        """The names of the folders (common prefixes) right under this storage's root, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Storage:
        """Return a storage view rooted at ``prefix`` under this root."""

    @abc.abstractmethod
    def url(self, key: str = "") -> str:
        """Return an absolute path or ``s3://`` URI for ``key``, for messages and for other processes."""

    def read_json(self, key: str) -> Any:
        """Read and parse a JSON object."""
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, value: Any) -> None:
        """Write ``value`` as indented JSON."""
        self.write_bytes(key, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
