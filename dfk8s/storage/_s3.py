"""S3 (or any S3-compatible server) as run storage, through boto3 with path-style addressing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import cached_property

from dfk8s.errors import NotFound, StorageError, UsageError
from dfk8s.storage._base import Storage, join_key
from dfk8s.storage._patience import StorageUnavailable, patiently, storage_patience

#: S3 error codes (and HTTP statuses) that pass: the server is restarting, overloaded or throttling.
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                              "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "500", "502",
                              "503", "504"})


class S3Storage(Storage):
    """Storage rooted at ``s3://bucket/prefix``; credentials come from boto3's standard chain."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 patience: float | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.patience = patience  # None: --storage-patience ($DFK8S_STORAGE_PATIENCE)

    @classmethod
    def from_uri(cls, uri: str, *, endpoint_url: str | None = None) -> S3Storage:
        """Parse ``s3://bucket/prefix``."""
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    @cached_property
    def client(self):
        """The boto3 client, made on first use (after a fork, each process makes its own)."""
        import boto3
        from botocore.config import Config

        if not self.endpoint_url:
            # Never guess: without an endpoint boto3 would talk to AWS, which is rarely what a user means.
            raise StorageError(f"{self.uri} needs an S3 endpoint: pass --s3-endpoint URL (or set "
                               "AWS_ENDPOINT_URL); for AWS itself, https://s3.REGION.amazonaws.com")

        # boto3's standard retries ride out short blips; `patiently` waits out longer outages around them.
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=5, read_timeout=60)
        return boto3.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _errors(self, key: str):
        return _S3Errors(self, key)

    def _patient(self, key: str, operation):
        def attempt():
            with self._errors(key):
                return operation()
        return patiently(attempt, self.patience)

    def with_patience(self, seconds: float) -> S3Storage:
        """The same storage with another patience (the progress bar does not wait out outages)."""
        view = S3Storage(self.bucket, self.prefix, endpoint_url=self.endpoint_url, patience=seconds)
        if "client" in self.__dict__:
            view.__dict__["client"] = self.client
        return view

    def read_bytes(self, key: str) -> bytes:
        return self._patient(key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def write_bytes(self, key: str, data: bytes) -> None:
        self._patient(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def write_file(self, key: str, local_path: str) -> None:
        # upload_file switches to a multipart upload for big files; the object appears only on completion.
        self._patient(key, lambda: self.client.upload_file(local_path, self.bucket, self._key(key)))

    def open_lines(self, key: str) -> Iterator[bytes]:
        # Streamed in chunks; a connection lost mid-object is resumed at the byte it stopped (Range GET).
        offset, pending, broke_at = 0, b"", None
        while True:
            def get(start=offset):
                kwargs = {"Range": f"bytes={start}-"} if start else {}
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)["Body"]
            try:
                body = self._patient(key, get)
            except StorageError as exc:
                if offset and "InvalidRange" in str(exc):
                    break  # the connection dropped exactly at the end
                raise
            try:
                with body:
                    for chunk in body.iter_chunks(1 << 20):
                        offset += len(chunk)
                        lines = (pending + chunk).split(b"\n")
                        pending = lines.pop()
                        for line in lines:
                            yield line[:-1] if line.endswith(b"\r") else line
                break
            except Exception as exc:  # the stream broke: retry from `offset` while patience lasts
                from botocore.exceptions import BotoCoreError

                if not isinstance(exc, (BotoCoreError, OSError)):
                    raise
                broke_at = broke_at or time.monotonic()
                patience = self.patience if self.patience is not None else storage_patience()
                if time.monotonic() - broke_at > patience:
                    raise StorageError(f"S3 stream of {self.url(key)} kept breaking: {exc}") from exc
                time.sleep(1.0)
        if pending:
            yield pending[:-1] if pending.endswith(b"\r") else pending

    def exists(self, key: str) -> bool:
        try:
            self._patient(key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix)
        if full and not full.endswith("/") and prefix:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0

        def list_all():
            keys = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
            return keys

        yield from sorted(self._patient(prefix, list_all))

    def folders(self) -> list[str]:
        full = self._key("")
        full = full + "/" if full and not full.endswith("/") else full

        def list_prefixes():
            names = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full,
                                                                           Delimiter="/")
            for page in pages:
                names.extend(p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", ()))
            return names

        return sorted(self._patient("", list_prefixes))

    def check_bucket(self) -> None:
        """Raise a one-line UsageError when the bucket does not exist; StorageError: it cannot be reached."""
        def head():
            with self._errors(""):
                self.client.head_bucket(Bucket=self.bucket)
        try:
            patiently(head, min(10.0, self.patience if self.patience is not None else 10.0))
        except NotFound:
            raise UsageError(f"bucket {self.bucket!r} does not exist at {self.endpoint_url} (create it "
                             "first, or check --output)") from None

    def delete(self, key: str) -> None:
        self._patient(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def child(self, prefix: str) -> S3Storage:
        child = S3Storage(self.bucket, join_key(self.prefix, prefix), endpoint_url=self.endpoint_url,
                          patience=self.patience)
        if "client" in self.__dict__:
            child.__dict__["client"] = self.client  # share the connection pool
        return child

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


class _S3Errors:
    """Turn botocore errors into dfk8s storage errors that name the object, never the credentials."""

    def __init__(self, storage: S3Storage, key: str):
        self.storage, self.key = storage, key

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        where = self.storage.url(self.key)
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {self.storage.bucket!r} does not exist at "
                                   f"{self.storage.endpoint_url} (create it, or check --output)") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(where) from None
            if code in _TRANSIENT_CODES or status.startswith("5"):
                raise StorageUnavailable(f"S3 {code or status} on {where}") from exc
            raise StorageError(f"S3 {code or 'error'} on {where}") from exc
        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
                            ReadTimeoutError)):
            raise StorageUnavailable(f"S3 error on {where}: {exc}") from exc
        if isinstance(exc, BotoCoreError):
            raise StorageError(f"S3 error on {where}: {exc}") from exc
        return False
