"""Where a report's files go and how its images are linked: relative paths, or presigned S3 URLs."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from pathlib import Path
from urllib.parse import quote

from dfk8s.errors import Dfk8sError
from dfk8s.run import layout

log = logging.getLogger(__name__)

THUMBS_PREFIX = layout.THUMBS_PREFIX
#: Presigned URLs live at most 7 days with SigV4.
DEFAULT_EXPIRES = 7 * 24 * 3600


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def put(storage, key: str, data: bytes, content_type: str) -> None:
    """Write one object; on S3 with a Content-Type, so a browser shows it instead of downloading it."""
    if not storage.uri.startswith("s3://"):
        storage.write_bytes(key, data)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, full = split_s3(storage.url(key))
    try:
        storage.client.put_object(Bucket=bucket, Key=full, Body=data, ContentType=content_type)
    except (BotoCoreError, ClientError) as exc:
        raise Dfk8sError(f"cannot write {storage.url(key)}: {exc}") from None


def write_thumbs(storage, thumbs: dict, *, s3: bool) -> None:
    """Write the thumbnails under report/thumbs/, dropping unused ones an earlier report left."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = {t.name: t.data for t in thumbs.values() if t.data}
    existing = set(storage.list(THUMBS_PREFIX))
    todo = [
        (name, data) for name, data in wanted.items() if f"{THUMBS_PREFIX}/{name}" not in existing or not s3
    ]  # named by content: on S3 an existing thumbnail is the same image, not uploaded again

    def upload(item):
        name, data = item
        put(storage, f"{THUMBS_PREFIX}/{name}", data, "image/jpeg")

    with ThreadPoolExecutor(max_workers=8 if s3 else 2) as pool:
        list(pool.map(upload, todo))
    for key in existing - {f"{THUMBS_PREFIX}/{name}" for name in wanted}:
        storage.delete(key)


class Presigner:
    """Presigned GET URLs (boto3 ``generate_presigned_url``) for objects of the run and other S3 refs."""

    def __init__(self, storage, endpoint_url: str | None, expires: int):
        self.storage, self.endpoint_url, self.expires = storage, endpoint_url, expires
        self._client = None

    @property
    def client(self):
        """A boto3 client that signs with SigV4 (query-string SigV2 is refused by AWS in newer regions)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def url(self, uri: str) -> str:
        """Presign ``s3://bucket/key``."""
        bucket, key = split_s3(uri)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.expires
        )

    def run_url(self, key: str) -> str:
        """Presign a key of the run."""
        return self.url(self.storage.url(key))

    def href(self, ref: str) -> str | None:
        """Where a card's image links to on the S3 page (local paths of this machine: nowhere)."""
        if ref.startswith("s3://"):
            return self.url(ref)
        if ref.startswith(layout.RUN_REF_SCHEME):
            return self.run_url(ref[len(layout.RUN_REF_SCHEME) :])
        return None


def local_href(ref: str, html_dir: Path, storage, presigner: Presigner) -> str | None:
    """Link to the full image from a page in ``html_dir``: a relative path, or a presigned URL for S3."""
    if ref.startswith(layout.RUN_REF_SCHEME):
        ref = storage.url(ref[len(layout.RUN_REF_SCHEME) :])
    if ref.startswith("s3://"):
        try:
            return presigner.url(ref)
        except Exception as exc:  # no credentials here: the card still shows the thumbnail
            log.info("cannot presign %s: %s", ref, exc)
            return None
    if "://" in ref:
        return None
    rel = os.path.relpath(ref, html_dir)
    return quote(rel.replace(os.sep, "/")) if not rel.startswith("/") else Path(ref).as_uri()


def short_ref(ref: str) -> str:
    """The last two segments of a ref, for captions under images."""
    parts = ref.replace("\\", "/").rstrip("/").split("/")
    return posixpath.join(*parts[-2:]) if len(parts) > 1 else ref


def content_digest(data: bytes) -> str:
    """A short digest (CSP hashes of the inline script and style)."""
    import base64

    return base64.b64encode(hashlib.sha256(data).digest()).decode()
