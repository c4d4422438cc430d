"""Run storage: one small interface, a local folder or an S3-compatible bucket."""

from __future__ import annotations

from dfk8s.storage._base import Storage, join_key
from dfk8s.storage._local import LocalStorage


def open_storage(uri: str, *, endpoint_url: str | None = None) -> Storage:
    """Open a storage root from a local folder path or an ``s3://bucket/prefix`` URI.

    Args:
        uri: A local folder (created on first write) or ``s3://bucket[/prefix]``.
        endpoint_url: S3 endpoint for S3-compatible servers; defaults to ``AWS_ENDPOINT_URL``.

    Returns:
        The storage rooted at ``uri``.
    """
    if uri.startswith("s3://"):
        from dfk8s.storage._s3 import S3Storage  # boto3 import is slow; only pay for it when used

        return S3Storage.from_uri(uri, endpoint_url=endpoint_url)
    return LocalStorage(uri)


def check_output(uri: str, *, endpoint_url: str | None = None) -> None:
    """Fail early, in one line, when runs cannot be written under ``uri``.

    A local folder must be (or be creatable as) a writable folder; on S3 an endpoint must be given and
    the bucket must exist.

    Raises:
        StorageError: What is wrong, and what to change.
    """
    if uri.startswith("s3://"):
        from dfk8s.storage._s3 import S3Storage

        S3Storage.from_uri(uri, endpoint_url=endpoint_url).check_bucket()
        return
    from dfk8s.storage._local import check_writable_folder

    check_writable_folder(uri)


__all__ = ["Storage", "LocalStorage", "open_storage", "join_key", "check_output"]
