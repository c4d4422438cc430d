"""Read a Parquet manifest row group by row group (pyarrow), as plain JSON-ready rows; never whole."""

from __future__ import annotations

import base64
import datetime
import decimal
import io
from collections.abc import Iterator
from typing import IO, Any

from dfk8s.errors import ManifestError

#: Rows converted to Python at a time: bounds memory however big a row group is.
BATCH_ROWS = 1024


class S3RangeFile(io.RawIOBase):
    """A seekable read-only view of an S3 object through ranged GETs (boto3).

    pyarrow reads a Parquet file's footer first and then only the column chunks it needs, so the file
    is never downloaded whole. It goes through boto3, not pyarrow's own S3 client, so the endpoint and
    credentials are those every other part of dfk8s uses (pyarrow's client would also probe the EC2
    metadata address for credentials and region).
    """

    def __init__(self, client, bucket: str, key: str):
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        head = client.head_object(Bucket=bucket, Key=key)
        self.size = int(head["ContentLength"])
        self.etag = str(head.get("ETag", "")).strip('"')
        self.position = 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def tell(self) -> int:
        """Current offset."""
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the offset like a file."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` from the current offset with one ranged GET."""
        if self.position >= self.size or not len(buffer):
            return 0
        end = min(self.size, self.position + len(buffer)) - 1
        body = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                      Range=f"bytes={self.position}-{end}")["Body"].read()
        n = len(body)
        buffer[:n] = body
        self.position += n
        return n


def iter_parquet_rows(file: IO[bytes] | str, source: str) -> Iterator[tuple[int, dict, bool]]:
    """Yield ``(row number, row, has binary columns)`` for each row of a Parquet file, 1-based, streaming.

    Values are JSON-ready (timestamps as ISO text, decimals as numbers), except binary values, which
    stay ``bytes``: an image column's bytes are staged by the planner; other binary values become
    base64 text there.

    Raises:
        ManifestError: The file is not Parquet or a row group cannot be read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file, buffer_size=1 << 20, pre_buffer=False)
        plain = all(_is_plain(field.type) for field in parquet.schema_arrow)
        binary = any(_has_binary(field.type) for field in parquet.schema_arrow)
        number = 0
        # iter_batches reads one row group at a time and hands it out in small batches.
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
            for row in batch.to_pylist():
                number += 1
                yield number, (row if plain else {k: _json_ready(v) for k, v in row.items()}), binary
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"cannot read Parquet: {str(exc).splitlines()[0][:200]}", source=source) from None


def _is_plain(arrow_type) -> bool:
    """Whether values of this type come out of to_pylist() as JSON types (or bytes) already."""
    import pyarrow.types as t

    if t.is_list(arrow_type) or t.is_large_list(arrow_type):
        return _is_plain(arrow_type.value_type)
    if t.is_struct(arrow_type):
        return all(_is_plain(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    return (t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_integer(arrow_type)
            or t.is_floating(arrow_type) or t.is_boolean(arrow_type) or t.is_null(arrow_type)
            or t.is_binary(arrow_type) or t.is_large_binary(arrow_type))


def _has_binary(arrow_type) -> bool:
    import pyarrow.types as t

    if t.is_list(arrow_type) or t.is_large_list(arrow_type):
        return _has_binary(arrow_type.value_type)
    if t.is_struct(arrow_type):
        return any(_has_binary(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    return t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or t.is_fixed_size_binary(arrow_type)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, tuple):  # map columns come out as lists of (key, value)
        return [_json_ready(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def json_safe(value: Any) -> Any:
    """Replace ``bytes`` left in a row (binary columns that are not images) by base64 text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


