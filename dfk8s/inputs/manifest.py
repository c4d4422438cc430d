"""Read a manifest as a stream of rows, never whole.

A manifest is a JSONL file, a JSON array or a Parquet file, local or ``s3://``; or a folder or glob of
them (one manifest, in sorted file order); or a folder of images with no manifest at all (one row per
image file). ``limit`` and ``sample`` pick which rows are read.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import heapq
import json
import os
import random
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
        binary: The row may hold ``bytes`` (a Parquet binary column).
    """

    pos: int
    where: str
    row: dict | None
    error: str | None = None
    raw: str | None = None
    binary: bool = False


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


#: File names read as manifests in a folder or glob (anything else there is ignored).
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")
#: File names read as images when a folder holds no manifest: one row per image.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_GLOB_CHARS = ("*", "?", "[")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _s3_client(bucket: str, endpoint_url: str | None):
    from dfk8s.inputs.images import _bucket

    return _bucket(bucket, endpoint_url).client


def _open(source: str, endpoint_url: str | None) -> IO[bytes]:
    if source.startswith("s3://"):
        bucket, key = _split_s3(source)
        try:
            return _s3_client(bucket, endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # botocore errors carry no secret, but keep the message short
            raise ManifestError(f"cannot read manifest: {exc}", source=source) from None
    try:
        return open(source, "rb")
    except FileNotFoundError:
        raise ManifestError("no such file", source=source) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc.strerror}", source=source) from None


@dataclass(frozen=True)
class Layout:
    """What a manifest location holds.

    Attributes:
        files: The files to read, in order (absolute paths or s3:// URIs).
        kind: ``file`` (one manifest), ``files`` (a folder or glob of manifests) or ``images`` (a folder
            or glob of image files, one row each).
        root: The folder the files are named relative to (and relative image paths start at).
    """

    files: tuple[str, ...]
    kind: str
    root: str


def expand_source(source: str, *, endpoint_url: str | None = None) -> Layout:
    """Find the files behind a manifest location: a file, a folder or a glob, local or s3://.

    Raises:
        ManifestError: Nothing is there, or a folder holds neither manifests nor images.
    """
    is_glob = any(c in source for c in _GLOB_CHARS)
    if source.startswith("s3://"):
        bucket, key = _split_s3(source)
        if is_glob:
            head = key[:min(key.index(c) for c in _GLOB_CHARS if c in key)]
            prefix = head.rsplit("/", 1)[0] if "/" in head else ""
            names = [f"s3://{bucket}/{k}" for k in _s3_keys(bucket, prefix, endpoint_url)
                     if fnmatch.fnmatchcase(k, key)]
            root = f"s3://{bucket}/{prefix}".rstrip("/")
        else:
            if key and not key.endswith("/") and _s3_exists(bucket, key, endpoint_url):
                return Layout((source,), "file", source.rsplit("/", 1)[0])
            prefix = key.rstrip("/")
            names = [f"s3://{bucket}/{k}" for k in _s3_keys(bucket, prefix, endpoint_url)]
            root = f"s3://{bucket}/{prefix}".rstrip("/")
            if not names:
                raise ManifestError("no such file or folder", source=source)
    else:
        path = os.path.abspath(os.path.expanduser(source))
        if is_glob:
            names = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            root = os.path.dirname(path[:min(path.index(c) for c in _GLOB_CHARS if c in path)])
        elif os.path.isdir(path):
            names = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
            root = path
        else:
            return Layout((source,), "file", os.path.dirname(path))
    # Hidden files and Spark/Hadoop side files (.crc, _SUCCESS, _temporary/) are not data.
    names = [n for n in names if not any(part[:1] in "._" for part in _relative(n, root).split("/"))]
    manifests = [n for n in names if n.lower().endswith(MANIFEST_SUFFIXES)]
    if manifests:
        return Layout(tuple(manifests), "files", root)
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        return Layout(tuple(images), "images", root)
    raise ManifestError(f"no manifest ({', '.join(MANIFEST_SUFFIXES)}) or image files found", source=source)


def _s3_keys(bucket: str, prefix: str, endpoint_url: str | None) -> list[str]:
    client = _s3_client(bucket, endpoint_url)
    keys: list[str] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=(prefix + "/") if prefix else "")
        for page in pages:
            keys.extend(obj["Key"] for obj in page.get("Contents", ()) if not obj["Key"].endswith("/"))
    except Exception as exc:
        raise ManifestError(f"cannot list: {exc}", source=f"s3://{bucket}/{prefix}") from None
    return sorted(keys)


def _s3_exists(bucket: str, key: str, endpoint_url: str | None) -> bool:
    try:
        _s3_client(bucket, endpoint_url).head_object(Bucket=bucket, Key=key)
        return True
    except Exception:
        return False


def _relative(name: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


class Manifest:
    """A streaming reader of one manifest; iterate it once to get :class:`ManifestItem` s.

    After a complete pass, :attr:`digest` holds a sha256 of the input (of the bytes read for a single
    JSON/JSONL file) and :attr:`nbytes` the bytes read; both stay unset when ``limit`` stopped early.

    Args:
        source: A file, folder or glob, local or s3://.
        endpoint_url: S3 endpoint.
        image_key: The key a folder of images puts each image under (default ``image``).
        limit: Read only the first ``limit`` rows.
        sample: Keep a uniform random sample of this many rows (reservoir sampling, one pass), in input
            order; with ``limit``, a sample of the first ``limit`` rows.
        seed: Seed of the sample.
    """

    def __init__(self, source: str, *, endpoint_url: str | None = None, image_key: str | None = None,
                 limit: int | None = None, sample: int | None = None, seed: int = 0):
        self.source = source
        self.endpoint_url = endpoint_url
        self.image_key = image_key or "image"
        self.limit = limit
        self.sample = sample
        self.seed = seed
        self.digest: str | None = None
        self.nbytes = 0
        self.format: str | None = None
        self._file_digest: str | None = None

    def __iter__(self) -> Iterator[ManifestItem]:
        items = self._all()
        if self.limit is not None:
            items = _first(items, self.limit)
        if self.sample is not None:
            yield from _reservoir(items, self.sample, self.seed)
        else:
            yield from items

    def _all(self) -> Iterator[ManifestItem]:
        layout = expand_source(self.source, endpoint_url=self.endpoint_url)
        self.digest, self.nbytes = None, 0
        if layout.kind == "images":
            self.format = "images"
            yield from self._image_rows(layout)
            return
        if layout.kind == "file":
            yield from self._file(layout.files[0], 0, "")
            self.digest = self._file_digest
            return
        digests, pos = hashlib.sha256(), 0
        for name in layout.files:
            relative = _relative(name, layout.root)
            for item in self._file(name, pos, relative + " "):
                pos = item.pos + 1
                yield item
            digests.update(f"{relative}\0{self._file_digest}\n".encode())
        self.format = "files"
        self.digest = digests.hexdigest()

    def _image_rows(self, layout: Layout) -> Iterator[ManifestItem]:
        digest = hashlib.sha256()
        for pos, name in enumerate(layout.files):
            relative = _relative(name, layout.root)
            digest.update(relative.encode() + b"\n")
            yield ManifestItem(pos, relative, {self.image_key: relative})
        self.digest = digest.hexdigest()

    def _file(self, name: str, start: int, label: str) -> Iterator[ManifestItem]:
        """The items of one file, numbered from ``start``; ``label`` prefixes their location."""
        before = self.nbytes
        if name.lower().endswith((".parquet", ".pq")):
            self.format = "parquet"
            yield from self._parquet(name, start, label)
            return
        raw = _open(name, self.endpoint_url)
        reader = _HashingReader(raw)
        try:
            first = reader.peek_first_char()
            # Anything not starting with "[" is read as JSONL: a bad line becomes an error item.
            self.format = "json" if first == b"[" else "jsonl"
            items = self._json_array(reader, name) if self.format == "json" else self._jsonl(reader)
            for item in items:
                item.pos += start
                if label:
                    item.where = label + item.where
                yield item
            # Drain what is left (trailing whitespace) so the digest covers the whole file.
            while reader.read(1 << 20):
                pass
            self._file_digest = reader.sha.hexdigest()
            self.nbytes = before + reader.nbytes
        finally:
            raw.close()

    def _parquet(self, name: str, start: int, label: str) -> Iterator[ManifestItem]:
        from dfk8s.inputs.parquet import S3RangeFile, iter_parquet_rows

        before = self.nbytes
        if name.startswith("s3://"):
            bucket, key = _split_s3(name)
            try:
                file = S3RangeFile(_s3_client(bucket, self.endpoint_url), bucket, key)
            except Exception as exc:
                raise ManifestError(f"cannot read manifest: {exc}", source=name) from None
            identity, size = f"{name} {file.size} {file.etag}", file.size
        else:
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                raise ManifestError("no such file", source=name) from None
            file = name
            identity, size = None, stat.st_size
        pos = start
        for number, row, binary in iter_parquet_rows(file, name):
            yield ManifestItem(pos, f"{label}row {number}", row, binary=binary)
            pos += 1
        if identity is None:  # a local file is hashed whole (fast next to parsing it)
            with open(name, "rb") as f:
                self._file_digest = hashlib.file_digest(f, "sha256").hexdigest()
        else:  # an S3 object is known by its ETag: downloading it twice to hash it is not worth it
            self._file_digest = hashlib.sha256(identity.encode()).hexdigest()
        self.nbytes = before + size

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

    def _json_array(self, reader: _HashingReader, name: str) -> Iterator[ManifestItem]:
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
                                source=name) from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")


def _first(items: Iterator[ManifestItem], limit: int) -> Iterator[ManifestItem]:
    if limit <= 0:
        return
    for item in items:
        yield item
        if item.pos + 1 >= limit:
            return


def _reservoir(items: Iterator[ManifestItem], size: int, seed: int) -> Iterator[ManifestItem]:
    """A uniform sample of ``size`` items in one pass (Algorithm R), given back in input order."""
    rng = random.Random(seed)
    kept: list[ManifestItem] = []
    for seen, item in enumerate(items):
        if seen < size:
            kept.append(item)
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                kept[slot] = item
    yield from heapq.nsmallest(len(kept), kept, key=lambda i: i.pos)


def count_rows(source: str, *, endpoint_url: str | None = None, **selection) -> int:
    """Count a manifest's rows in one streaming pass (used to split into a fixed number of shards).

    ``selection`` takes :class:`Manifest`'s ``limit``, ``sample`` and ``seed``.
    """
    return sum(1 for _ in Manifest(source, endpoint_url=endpoint_url, **selection))


__all__ = ["IMAGE_SUFFIXES", "MANIFEST_SUFFIXES", "Layout", "Manifest", "ManifestItem", "count_rows",
           "expand_source"]
