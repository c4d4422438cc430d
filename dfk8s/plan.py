"""Plan a run: stream the manifest, normalise and check each row, write shards and run.json."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dfk8s import layout, rows
from dfk8s.cost import row_texts
from dfk8s.errors import ManifestError, SpecError
from dfk8s.images import (
    DEFAULT_MAX_BYTES,
    ImageProblem,
    check_image,
    decode_data_uri,
    is_data_uri,
    is_http_url,
    read_ref_bytes,
    resolve_ref,
    sha256_hex,
    short_ref,
    url_host,
)
from dfk8s.manifest import MANIFEST_SUFFIXES, Manifest, ManifestItem, count_rows, expand_source
from dfk8s.pipelines import Pipeline, get_pipeline
from dfk8s.spec import RunSpec

log = logging.getLogger(__name__)

#: Rows per shard when the work cannot be sized (no row count): the old fixed default.
DEFAULT_ROWS_PER_SHARD = 1000
#: Shards each worker (or pod) should get, so a slow or lost one holds up little and resume is fine-grained.
SHARDS_PER_WORKER = 4
#: Least work in a shard, in seconds, per executor: a local worker pays a checkpoint and a ramp-down per
#: shard; a pod pays its scheduling and start-up (image pull, imports, a model load), so it should run
#: for minutes.
MIN_SHARD_SECONDS = {"local": 10.0, "kubernetes": 300.0}
#: Most rows in a shard (a worker holds its shard's rows in memory).
MAX_ROWS_PER_SHARD = 50_000


@dataclass(frozen=True)
class ShardSize:
    """How a run is split by default, and why.

    Attributes:
        rows_per_shard: The size chosen.
        shards: The resulting shard count.
        seconds_per_shard: Expected time of one shard at the serving's estimated rate.
        rows_per_second: The rate one worker (or pod) is expected to keep.
        rule: The rule, in words, for --help-like messages and the dry-run plan.
    """

    rows_per_shard: int
    shards: int
    seconds_per_shard: float
    rows_per_second: float
    rule: str


def default_shard_size(rows: int, serving: str, options: dict, workers: int,
                       executor: str = "local") -> ShardSize:
    """Size shards for the work: about SHARDS_PER_WORKER per worker, none shorter than the executor's floor.

    A worker's rate is ``concurrency / latency`` rows/s (the serving's registered latency estimate and
    ``--max-concurrency``; one row per ``latency`` on a GPU), capped by its share of ``--rpm``. The size is
    ``rows / (SHARDS_PER_WORKER x workers)``, raised to at least ``MIN_SHARD_SECONDS[executor]`` of work,
    and at most ``MAX_ROWS_PER_SHARD``. Locally the floor never leaves a started worker without a shard;
    on Kubernetes it does: a small run takes fewer pods rather than pods that live for seconds.
    """
    from dfk8s.servings import serving_info

    info = serving_info(serving)
    workers = max(1, workers)
    merged = {**info.defaults, **{k: v for k, v in options.items() if v is not None}}
    rate = 1.0 / info.latency if info.gpu else info.concurrency(merged) / info.latency
    if merged.get("rpm"):
        rate = min(rate, float(merged["rpm"]) / 60.0 / workers)
    floor = math.ceil(MIN_SHARD_SECONDS.get(executor, MIN_SHARD_SECONDS["local"]) * rate)
    size = max(math.ceil(rows / (SHARDS_PER_WORKER * workers)), floor)
    if executor != "kubernetes":
        size = min(size, math.ceil(rows / workers))
    size = max(1, min(size, rows, MAX_ROWS_PER_SHARD))
    shards = math.ceil(rows / size) if rows else 0
    rule = (f"about {SHARDS_PER_WORKER} shards per {'pod' if executor == 'kubernetes' else 'worker'}, none "
            f"under ~{MIN_SHARD_SECONDS.get(executor, 10.0):g} s of work at ~{rate:,.1f} rows/s each "
            f"({serving}: ~{info.latency:g} s per {'row' if info.gpu else 'request'}"
            + ("" if info.gpu else f", {info.concurrency(merged)} in flight")
            + f"), at most {MAX_ROWS_PER_SHARD:,}")
    return ShardSize(size, shards, size / rate if rate else 0.0, rate, rule)


def estimate_rows(source: str, *, endpoint_url: str | None = None) -> int:
    """The manifest's row count: newlines for a local JSONL file (fast, no parsing), else a counting pass."""
    if "://" not in source and os.path.isfile(source):
        with open(source, "rb") as f:
            head = f.read(1 << 16)
            if not head.lstrip().startswith(b"["):  # JSONL: one row per non-empty line
                count, last = head.count(b"\n"), head[-1:] if head else b""
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
                return count + (last not in (b"", b"\n"))
    return count_rows(source, endpoint_url=endpoint_url)


class SeenIds:
    """The row ids seen so far, to flag duplicates, in flat memory however many rows there are.

    The first ``in_memory`` ids live in a set; past that they move to a private temporary SQLite
    database on disk (deleted when closed), so a plan of 100 million ids does not hold them all in RAM.
    """

    def __init__(self, in_memory: int = 50_000):
        self.in_memory = in_memory
        self.ids: set[str] | None = set()
        self.db = None

    def seen(self, row_id: str) -> bool:
        """Record ``row_id``; return whether it was seen before."""
        if self.ids is not None:
            if row_id in self.ids:
                return True
            self.ids.add(row_id)
            if len(self.ids) > self.in_memory:
                self._spill()
            return False
        cursor = self.db.execute("INSERT OR IGNORE INTO ids VALUES (?)", (row_id,))
        return cursor.rowcount == 0

    def _spill(self) -> None:
        import sqlite3

        self.db = sqlite3.connect("")  # "": a private temporary database on disk, removed on close
        self.db.execute("PRAGMA cache_size = -4000")  # 4 MB of pages in memory, the rest on disk
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY) WITHOUT ROWID")
        self.db.executemany("INSERT INTO ids VALUES (?)", ((i,) for i in self.ids))
        self.ids = None

    def close(self) -> None:
        """Drop what was recorded (and the temporary database)."""
        if self.db is not None:
            self.db.close()
            self.db = None
        self.ids = set()


@dataclass
class Problem:
    """One problem found in a manifest row, with where it is."""

    where: str
    message: str
    type: str = "BadRow"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RowChecker:
    """Checks rows against a pipeline, resolving and checking their images once per distinct file.

    Attributes:
        stage_to: When set, local images are uploaded into this run storage (content-addressed) and
            rows refer to them as ``run:staged/<sha>.<ext>``; otherwise rows carry absolute paths.
        blob_store: The run's storage: inline images (a Parquet binary column, ``data:`` URIs) are always
            staged there, since a worker cannot read them from anywhere else. None when only checking.
        options: The run's options: ``prompt`` (the user turn of rows without a conversation),
            ``allow_private_image_hosts`` and ``allowed_image_networks`` (the URL guard).
        check_remote_images: Also read and check ``s3://`` images (validate). http(s) images are never
            fetched at plan time (a million rows would be a million requests): only their syntax,
            scheme and literal IP addresses are checked.
    """

    pipeline: Pipeline
    input_key: str | None = None
    image_key: str | None = None
    id_key: str | None = None
    image_root: str | None = None
    stage_to: object | None = None
    endpoint_url: str | None = None
    check_remote_images: bool = False
    blob_store: object | None = None
    options: dict = field(default_factory=dict)
    _image_cache: dict = field(default_factory=dict)
    _seen_ids: SeenIds = field(default_factory=lambda: SeenIds())
    _staged: set = field(default_factory=set)
    #: Width and height of each image of the row last checked (None: not opened), for the cost estimate,
    #: and their file sizes (0: not opened), for batch-mode shard limits.
    last_sizes: list = field(default_factory=list)
    last_turns: list | None = None  # the conversation check() read (the cost tally reuses it)
    last_bytes: list = field(default_factory=list)
    _sizes: dict = field(default_factory=dict)

    def __post_init__(self):
        from dfk8s.fetch import AddressGuard

        self.prompt = self.options.get("prompt")
        self.provider_fetch = self.options.get("image_fetch") == "provider"
        self.guard = AddressGuard.from_options(self.options)

    def check(self, item: ManifestItem) -> tuple[dict, list[Problem]]:
        """Return the shard row for a manifest item and the problems found (empty if the row is good)."""
        self.last_turns = None
        if item.row is None:
            shard_row = {"id": str(item.pos), "pos": item.pos, "row": {}, "images": [],
                         "error": {"type": "BadRow", "message": f"{item.where}: {item.error}",
                                   "raw": item.raw}}
            return shard_row, [Problem(item.where, item.error or "bad row")]
        row = item.row
        problems: list[Problem] = []
        try:
            rid = rows.row_id(row, item.pos, self.id_key)
        except rows.RowProblem as exc:
            rid = str(item.pos)
            problems.append(Problem(item.where, str(exc)))
        else:
            if self.id_key:
                if self._seen_ids.seen(rid):
                    problems.append(Problem(item.where, f"duplicate id {rid!r} (key {self.id_key!r})"))
        resolved: list[str] = []
        self.last_sizes, self.last_bytes, self.last_turns = [], [], None
        try:
            self.last_turns = self.pipeline.check_row(row, self.input_key, self.prompt)
            refs = self.pipeline.image_refs(row, self.image_key)
        except rows.RowProblem as exc:
            problems.append(Problem(item.where, str(exc)))
            refs = []
        inline: dict[int, str] = {}
        for ref in refs:
            try:
                resolved.append(self._image(ref))
                found = self._sizes.get(resolved[-1])
                self.last_sizes.append(found[:2] if found else None)
                self.last_bytes.append(found[2] if found else 0)
            except ImageProblem as exc:
                # A plain bad image is a BadRow as ever; a refused URL says BlockedAddress.
                kind = "BadRow" if exc.type == "BadImage" else exc.type
                problems.append(Problem(item.where, str(exc), kind))
                continue
            if isinstance(ref, bytes):
                inline[id(ref)] = self._inline_url(resolved[-1])
        if item.binary:
            row = self._json_row(row, inline)
        error = None
        if problems:
            error = {"type": problems[0].type if len({p.type for p in problems}) == 1 else "BadRow",
                     "message": "; ".join(str(p) for p in problems)}
        return {"id": rid, "pos": item.pos, "row": row, "images": resolved, "error": error}, problems

    def close(self) -> None:
        """Release what the checker keeps (the ids seen)."""
        self._seen_ids.close()

    def _inline_url(self, resolved: str) -> str:
        """Where an image that came as bytes is now, for the output row."""
        if self.blob_store is not None and resolved.startswith(layout.RUN_REF_SCHEME):
            return self.blob_store.url(resolved[len(layout.RUN_REF_SCHEME):])
        return resolved

    def _json_row(self, row: dict, inline: dict[int, str]) -> dict:
        """A row with bytes: image bytes become their staged image's URL, other bytes base64 text."""
        from dfk8s.parquet import json_safe

        def swap(value):
            if isinstance(value, bytes) and id(value) in inline:
                return inline[id(value)]
            if isinstance(value, dict):
                if isinstance(value.get("bytes"), bytes) and id(value["bytes"]) in inline:
                    return {**value, "bytes": None, "path": value.get("path") or inline[id(value["bytes"])]}
                return {k: swap(v) for k, v in value.items()}
            if isinstance(value, list):
                return [swap(v) for v in value]
            return value

        return json_safe(swap(row))

    def _image(self, ref: str | bytes) -> str:
        if isinstance(ref, bytes) or is_data_uri(ref):
            return self._inline_image(ref)
        if is_http_url(ref):
            return self._url(ref)
        path = resolve_ref(ref, self.image_root)
        if path in self._image_cache:
            cached = self._image_cache[path]
            if isinstance(cached, ImageProblem):
                raise cached
            return cached
        is_local = "://" not in path and not path.startswith(layout.RUN_REF_SCHEME)
        size = None
        try:
            if is_local or self.check_remote_images:
                data = read_ref_bytes(path, endpoint_url=self.endpoint_url)
                checked = check_image(data, ref)
                size = (checked.width, checked.height, len(data))
                if is_local and self.stage_to is not None:
                    path = layout.RUN_REF_SCHEME + self._stage(self.stage_to, data, checked.extension)
        except ImageProblem as exc:
            # Say what the manifest said, and where we looked, in one line.
            problem = ImageProblem(str(exc).replace(f"image {path}", f"image {ref!r} ({path})", 1)
                                   if ref != path else str(exc), exc.type, exc.details)
            self._remember(path, problem)
            raise problem from None
        self._remember(path, path)
        if size is not None:
            self._sizes[path] = size
        return path

    def _remember(self, key: str, value) -> None:
        if len(self._image_cache) > 100_000:  # bound memory on manifests with millions of distinct images
            self._image_cache.clear()
            self._sizes.clear()
        self._image_cache[key] = value

    def _stage(self, storage, data: bytes, extension: str) -> str:
        key = layout.staged_key(sha256_hex(data), extension)
        if key not in self._staged:
            if not storage.exists(key):
                storage.write_bytes(key, data)
            if len(self._staged) > 100_000:
                self._staged.clear()
            self._staged.add(key)
        return key

    def _inline_image(self, ref: str | bytes) -> str:
        """Bytes or a data: URI: checked now, then staged in the run (workers have nowhere else to read)."""
        label = short_ref(ref)
        if isinstance(ref, bytes):
            if len(ref) > DEFAULT_MAX_BYTES:
                raise ImageProblem(f"image {label} is over the {DEFAULT_MAX_BYTES} byte limit")
            data = ref
        else:
            data = decode_data_uri(ref)
        checked = check_image(data, label)
        if self.blob_store is None:
            return label
        return layout.RUN_REF_SCHEME + self._stage(self.blob_store, data, checked.extension)

    def _url(self, ref: str) -> str:
        """An http(s) image: syntax, scheme and literal addresses only; the worker fetches it."""
        host = url_host(ref)
        if not self.provider_fetch:  # else the provider's network fetches it
            self.guard.check_literal(host, ref)
        return ref


def default_image_root(manifest: str, image_root: str | None, endpoint_url: str | None = None) -> str | None:
    """Relative image paths are taken from ``--image-root``, else from the manifest's folder.

    For a folder or glob of manifests (or of images) that is the folder named.
    """
    if image_root:
        return image_root
    if manifest.startswith("s3://") and not manifest.endswith("/") and not any(c in manifest for c in "*?["):
        if manifest.lower().endswith(MANIFEST_SUFFIXES):
            return manifest.rsplit("/", 1)[0]  # s3://bucket/dir: relative images live beside the manifest
    try:
        return expand_source(manifest, endpoint_url=endpoint_url).root
    except ManifestError:
        if manifest.startswith("s3://"):
            return manifest.rsplit("/", 1)[0]
        return str(Path(manifest).expanduser().absolute().parent)


def iter_problems(manifest: str, pipeline: str, counts: dict, *, input_key=None, image_key=None,
                  id_key=None, image_root=None, endpoint_url=None, options: dict | None = None,
                  limit: int | None = None, sample: int | None = None, seed: int = 0) -> Iterator[Problem]:
    """Yield every problem in a manifest (bad JSON, missing keys, duplicate ids, bad images).

    ``counts`` is filled with ``rows`` and ``good`` as the stream is consumed. ``options`` are the run
    options that change what a good row is (``prompt``, the URL guard's allowances).
    """
    checker = RowChecker(get_pipeline(pipeline), input_key, image_key, id_key,
                         default_image_root(manifest, image_root, endpoint_url), endpoint_url=endpoint_url,
                         check_remote_images=True, options=options or {})
    counts.update(rows=0, good=0)
    for item in Manifest(manifest, endpoint_url=endpoint_url, image_key=image_key, limit=limit,
                         sample=sample, seed=seed):
        counts["rows"] += 1
        _, problems = checker.check(item)
        if not problems:
            counts["good"] += 1
        yield from problems
    checker.close()


def plan(spec: RunSpec, run_storage, *, rows_per_shard: int | None = None, shards: int | None = None,
         image_root: str | None = None, stage_images: bool = False, endpoint_url: str | None = None,
         on_row: Callable[[int], None] | None = None, count_only: bool = False, tally=None,
         executor: str = "local") -> RunSpec:
    """Write a run's shards and then its run.json (whose presence means the plan is complete).

    Args:
        spec: The spec to complete; ``input``, pipeline, serving, keys and options are set.
        run_storage: The run's storage (``<output>/<run_id>``).
        rows_per_shard: Rows per shard (default: :func:`default_shard_size` for the run's serving,
            options, parallelism and executor); ignored when ``shards`` is set.
        shards: At most this many shards instead, ``ceil(rows / shards)`` rows each (costs one extra
            counting pass).
        image_root: Folder relative image paths are taken from.
        stage_images: Upload local images into the run (cluster runs: pods cannot see this disk).
        endpoint_url: S3 endpoint for s3:// manifests and images.
        on_row: Called with the number of rows planned so far (progress).
        count_only: Read and check every row as planning does, but write nothing (``--dry-run``): the
            returned spec has the shard and row counts a real plan would give.
        tally: A :class:`dfk8s.cost.Tally` that counts what each row's request will carry (the estimate).
        executor: ``local`` or ``kubernetes``: what the default shard size is sized for.

    Returns:
        The completed spec, also saved as run.json (unless ``count_only``).
    """
    if spec.option("image_fetch") == "provider" and spec.serving != "openai-chat":
        raise SpecError(f"--image-fetch provider works with the openai-chat serving only, not {spec.serving}")
    selection = {"image_key": spec.image_key, "limit": spec.limit, "sample": spec.sample, "seed": spec.seed}
    if shards:
        total = count_rows(spec.input, endpoint_url=endpoint_url, **selection)
        rows_per_shard = max(1, math.ceil(total / shards)) if total else 1
    elif not rows_per_shard:
        total = estimate_rows(spec.input, endpoint_url=endpoint_url)
        sized = default_shard_size(total, spec.serving, spec.options, spec.parallelism, executor)
        rows_per_shard = sized.rows_per_shard
        log.info("default shard size %d rows (~%.0f s per shard): %s", sized.rows_per_shard,
                 sized.seconds_per_shard, sized.rule)
    byte_cap = None
    if spec.option("api_mode") == "batch":  # one shard is one provider batch: keep it within its limits
        from dfk8s.batch import request_bytes, shard_limits

        max_requests, byte_cap = shard_limits(spec.serving)
        rows_per_shard = min(rows_per_shard, max_requests)
    checker = RowChecker(get_pipeline(spec.pipeline), spec.input_key, spec.image_key, spec.id_key,
                         default_image_root(spec.input, image_root, endpoint_url),
                         stage_to=run_storage if stage_images and not count_only else None,
                         endpoint_url=endpoint_url, blob_store=None if count_only else run_storage,
                         options=spec.options)
    manifest = Manifest(spec.input, endpoint_url=endpoint_url, **selection)
    shard_index, in_shard, total_rows, bad, shard_bytes = 0, 0, 0, 0, 0
    unusable = _Unusable()
    with tempfile.TemporaryDirectory(prefix="dfk8s-plan-") as tmp:
        buffer_path = os.path.join(tmp, "shard.jsonl")
        buffer = open(buffer_path, "w", encoding="utf-8")
        try:
            for item in manifest:
                shard_row, problems = checker.check(item)
                bad += bool(problems)
                if problems:
                    unusable.count(item, problems)
                if byte_cap is not None:
                    row_bytes = request_bytes(shard_row, checker.last_bytes)
                    if in_shard and shard_bytes + row_bytes > byte_cap:  # the batch file would be too big
                        buffer.close()
                        if not count_only:
                            run_storage.write_file(layout.shard_input_key(shard_index), buffer_path)
                        shard_index, in_shard, shard_bytes = shard_index + 1, 0, 0
                        buffer = open(buffer_path, "w", encoding="utf-8")
                    shard_bytes += row_bytes
                if tally is not None:
                    texts = row_texts(checker.pipeline, shard_row["row"], spec.input_key,
                                      spec.option("system_prompt"), spec.option("prompt"),
                                      turns=checker.last_turns) if checker.last_turns is not None else []
                    tally.add(shard_row, checker.last_sizes, texts)
                if not count_only:
                    buffer.write(json.dumps(shard_row, ensure_ascii=False, separators=(",", ":")) + "\n")
                in_shard += 1
                total_rows += 1
                if in_shard == rows_per_shard:
                    buffer.close()
                    if not count_only:
                        run_storage.write_file(layout.shard_input_key(shard_index), buffer_path)
                    shard_index, in_shard, shard_bytes = shard_index + 1, 0, 0
                    buffer = open(buffer_path, "w", encoding="utf-8")
                if on_row is not None and total_rows % 1000 == 0:
                    on_row(total_rows)
            buffer.close()
            if in_shard:
                if not count_only:
                    run_storage.write_file(layout.shard_input_key(shard_index), buffer_path)
                shard_index += 1
        finally:
            buffer.close()
    checker.close()
    if on_row is not None:
        on_row(total_rows)
    unusable.refuse(spec.input, manifest.format, total_rows, image_root)
    spec.shards = shard_index
    spec.rows = total_rows
    spec.rows_per_shard = rows_per_shard
    # A --limit that stopped early read only part of the input: no digest then.
    spec.input_digest = f"sha256:{manifest.digest}" if manifest.digest else ""
    spec.input_bytes = manifest.nbytes
    if count_only:
        return spec
    spec.save(run_storage)
    log.info("planned %d rows (%d with problems) into %d shards", total_rows, bad, shard_index)
    return spec


@dataclass
class _Unusable:
    """Counts the rows that say the whole manifest is wrong, not one row (before run.json is written)."""

    not_json: int = 0
    missing_images: int = 0
    first: str = ""
    first_bad_pos: int | None = None
    first_raw: str = ""

    def count(self, item: ManifestItem, problems: list[Problem]) -> None:
        if not self.first:
            self.first, self.first_bad_pos, self.first_raw = str(problems[0]), item.pos, item.raw or ""
        if item.row is None and (item.error or "").startswith("bad JSON"):
            self.not_json += 1
        elif all(" not found" in p.message and p.message.startswith("image ") for p in problems):
            self.missing_images += 1

    def refuse(self, source: str, fmt: str | None, rows: int, image_root: str | None) -> None:
        """Raise when no row can work: not JSON at all, a JSON object, or every image missing."""
        from dfk8s.errors import ManifestError, SpecError

        if not rows:
            return
        if self.not_json == rows:
            raise ManifestError("is neither JSON nor JSONL (a CSV?): no line is a JSON object; expected a "
                                "JSON array of rows or one JSON object a line", source=source)
        if fmt == "jsonl" and self.first and (rows == 1 and source.endswith(".json") or (
                self.first_bad_pos == 0 and self.first_raw.strip() == "{" and _is_json_object(source))):
            raise ManifestError("is one JSON object, not a JSON array of rows (or JSONL)", source=source)
        if self.missing_images == rows:
            where = f"--image-root {image_root}" if image_root else "the manifest's folder"
            raise SpecError(f"no image of any row was found (first: {self.first}); relative paths are "
                            f"read from {where}: pass --image-root DIR")


def _is_json_object(source: str, limit: int = 64 << 20) -> bool:
    """Whether a local manifest is, as a whole, one (pretty-printed) JSON object."""
    if "://" in source:
        return False
    try:
        if os.path.getsize(source) > limit:
            return False
        with open(source, "rb") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False
