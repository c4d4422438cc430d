"""Read a manifest (JSONL or a JSON array, local or s3://) as a stream of rows, never whole."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import ijson

from dfk8s.errors import ManifestError


@dataclass(slots=True)
class ManifestItem:
    """One element of a manifest: a row, or the reason it is not one.

    Attributes:
        pos: 0-based position among the manifest's rows (blank lines are not rows).
        where: human location, ``line 12`` (JSONL) or ``element 3`` (JSON array), 1-based.
        row: The parsed row, or None when the element is not a JSON object.
        error: Why the element is not a row, or None.
        raw: The raw text of a bad JSONL line, kept so nothing is lost.
    """

    pos: int
    where: str
    row: dict | None
    error: str | None = None
    raw: str | None = None


class _HashingReader:
    """A binary reader that hashes what passes through it (the run's input digest)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def readline(self) -> bytes:
        data = self.raw.readline()
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

    def peek_first_char(self) -> bytes:
        """Return the first non-whitespace byte without consuming it from the hashed stream."""
        # Read a small prefix, then splice it back in front of the stream.
        head = self.raw.read(4096)
        self.raw = _Prefixed(head, self.raw)
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        return stripped[:1]


class _Prefixed:
    def __init__(self, head: bytes, rest: IO[bytes]):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.rest.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(n)

    def readline(self) -> bytes:
        if self.head:
            nl = self.head.find(b"\n")
            if nl >= 0:
                data, self.head = self.head[: nl + 1], self.head[nl + 1:]
                return data
            data, self.head = self.head, b""
            return data + self.rest.readline()
        return self.rest.readline()


def _open(source: str, endpoint_url: str | None) -> IO[bytes]:
    if source.startswith("s3://"):
        from dfk8s.storage import open_storage

        bucket_root, _, key = source[5:].partition("/")
        storage = open_storage(f"s3://{bucket_root}", endpoint_url=endpoint_url)
        try:
            return storage.client.get_object(Bucket=bucket_root, Key=key)["Body"]
        except Exception as exc:  # botocore errors carry no secret, but keep the message short
            raise ManifestError(f"cannot read manifest: {exc}", source=source) from None
    try:
        return open(source, "rb")
    except FileNotFoundError:
        raise ManifestError("no such file", source=source) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc.strerror}", source=source) from None


class Manifest:
    """A streaming reader of one manifest; iterate it once to get :class:`ManifestItem` s.

    After iterating, :attr:`digest` holds the sha256 of the bytes read and :attr:`nbytes` their count.
    """

    def __init__(self, source: str, *, endpoint_url: str | None = None):
        self.source = source
        self.endpoint_url = endpoint_url
        self.digest: str | None = None
        self.nbytes = 0
        self.format: str | None = None

    def __iter__(self) -> Iterator[ManifestItem]:
        raw = _open(self.source, self.endpoint_url)
        reader = _HashingReader(raw)
        try:
            first = reader.peek_first_char()
            # Anything not starting with "[" is read as JSONL: a bad line becomes an error item.
            self.format = "json" if first == b"[" else "jsonl"
            items = self._json_array(reader) if self.format == "json" else self._jsonl(reader)
            yield from items
            # Drain what is left (trailing whitespace) so the digest covers the whole file.
            while reader.read(1 << 20):
                pass
            self.digest = reader.sha.hexdigest()
            self.nbytes = reader.nbytes
        finally:
            raw.close()

    def _jsonl(self, reader: _HashingReader) -> Iterator[ManifestItem]:
        pos = 0
        for lineno, line in enumerate(reader, start=1):
            text = line.strip()
            if not text:
                continue
            where = f"line {lineno}"
            try:
                value = json.loads(text)
            except (ValueError, UnicodeDecodeError) as exc:
                raw = text.decode("utf-8", "replace")
                yield ManifestItem(pos, where, None, f"bad JSON: {_short(exc)}", raw)
            else:
                if isinstance(value, dict):
                    yield ManifestItem(pos, where, value)
                else:
                    yield ManifestItem(pos, where, None, f"expected a JSON object, got {_kind(value)}",
                                       text.decode("utf-8", "replace"))
            pos += 1

    def _json_array(self, reader: _HashingReader) -> Iterator[ManifestItem]:
        pos = 0
        try:
            for value in ijson.items(reader, "item", use_float=True):
                where = f"element {pos + 1}"
                if isinstance(value, dict):
                    yield ManifestItem(pos, where, value)
                else:
                    yield ManifestItem(pos, where, None, f"expected a JSON object, got {_kind(value)}",
                                       json.dumps(value))
                pos += 1
        except ijson.JSONError as exc:
            # A broken array cannot be resynchronised: stop with the element where it broke.
            raise ManifestError(f"bad JSON array after element {pos}: {_short(exc)}",
                                source=self.source) from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")


def count_rows(source: str, *, endpoint_url: str | None = None) -> int:
    """Count a manifest's rows in one streaming pass (used to split into a fixed number of shards)."""
    return sum(1 for _ in Manifest(source, endpoint_url=endpoint_url))


__all__ = ["Manifest", "ManifestItem", "count_rows"]
