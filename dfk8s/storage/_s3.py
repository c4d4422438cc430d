"""S3 (or any S3-compatible server) as run storage, through boto3 with path-style addressing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property

from dfk8s.errors import NotFound, StorageError
from dfk8s.storage._base import Storage, join_key


class S3Storage(Storage):
    """Storage rooted at ``s3://bucket/prefix``; credentials come from boto3's standard chain."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

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

        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
        return boto3.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _errors(self, key: str):
        return _S3Errors(self, key)

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def write_file(self, key: str, local_path: str) -> None:
        # upload_file switches to a multipart upload for big files; the object appears only on completion.
        with self._errors(key):
            self.client.upload_file(local_path, self.bucket, self._key(key))

    def open_lines(self, key: str) -> Iterator[bytes]:
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        with body:
            yield from body.iter_lines(chunk_size=1 << 20, keepends=False)

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix)
        if full and not full.endswith("/") and prefix:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def child(self, prefix: str) -> S3Storage:
        child = S3Storage(self.bucket, join_key(self.prefix, prefix), endpoint_url=self.endpoint_url)
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
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(self.storage.url(self.key)) from None
            raise StorageError(f"S3 {code or 'error'} on {self.storage.url(self.key)}") from exc
        if isinstance(exc, BotoCoreError):
            raise StorageError(f"S3 error on {self.storage.url(self.key)}: {exc}") from exc
        return False
