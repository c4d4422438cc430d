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
from dfk8s.images import ImageProblem, check_image, read_ref_bytes, resolve_ref, sha256_hex
from dfk8s.manifest import Manifest, ManifestItem, count_rows
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


@dataclass
class Problem:
    """One problem found in a manifest row, with where it is."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RowChecker:
    """Checks rows against a pipeline, resolving and checking their images once per distinct file.

    Attributes:
        stage_to: When set, local images are uploaded into this run storage (content-addressed) and
            rows refer to them as ``run:staged/<sha>.<ext>``; otherwise rows carry absolute paths.
    """

    pipeline: Pipeline
    input_key: str | None = None
    image_key: str | None = None
    id_key: str | None = None
    image_root: str | None = None
    stage_to: object | None = None
    endpoint_url: str | None = None
    check_remote_images: bool = False
    _image_cache: dict = field(default_factory=dict)
    _seen_ids: set = field(default_factory=set)
    _staged: set = field(default_factory=set)
    #: Width and height of each image of the row last checked (None: not opened), for the cost estimate,
    #: and their file sizes (0: not opened), for batch-mode shard limits.
    last_sizes: list = field(default_factory=list)
    last_bytes: list = field(default_factory=list)
    _sizes: dict = field(default_factory=dict)

    def check(self, item: ManifestItem) -> tuple[dict, list[Problem]]:
        """Return the shard row for a manifest item and the problems found (empty if the row is good)."""
        if item.row is None:
            shard_row = {"id": str(item.pos), "pos": item.pos, "row": {}, "images": [],
                         "error": {"type": "BadRow", "message": f"{item.where}: {item.error}",
                                   "raw": item.raw}}
            return shard_row, [Problem(item.where, item.error or "bad row")]
        problems: list[Problem] = []
        try:
            rid = rows.row_id(item.row, item.pos, self.id_key)
        except rows.RowProblem as exc:
            rid = str(item.pos)
            problems.append(Problem(item.where, str(exc)))
        else:
            if self.id_key:
                if rid in self._seen_ids:
                    problems.append(Problem(item.where, f"duplicate id {rid!r} (key {self.id_key!r})"))
                self._seen_ids.add(rid)
        resolved: list[str] = []
        self.last_sizes, self.last_bytes = [], []
        try:
            self.pipeline.check_row(item.row, self.input_key)
            refs = self.pipeline.image_refs(item.row, self.image_key)
        except rows.RowProblem as exc:
            problems.append(Problem(item.where, str(exc)))
            refs = []
        for ref in refs:
            try:
                resolved.append(self._image(ref))
                found = self._sizes.get(resolved[-1])
                self.last_sizes.append(found[:2] if found else None)
                self.last_bytes.append(found[2] if found else 0)
            except ImageProblem as exc:
                problems.append(Problem(item.where, str(exc)))
        error = None
        if problems:
            error = {"type": "BadRow", "message": "; ".join(str(p) for p in problems)}
        return {"id": rid, "pos": item.pos, "row": item.row, "images": resolved, "error": error}, problems

    def _image(self, ref: str) -> str:
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
                    key = layout.staged_key(sha256_hex(data), checked.extension)
                    if key not in self._staged:
                        if not self.stage_to.exists(key):
                            self.stage_to.write_bytes(key, data)
                        self._staged.add(key)
                    path = layout.RUN_REF_SCHEME + key
        except ImageProblem as exc:
            # Say what the manifest said, and where we looked, in one line.
            problem = ImageProblem(str(exc).replace(f"image {path}", f"image {ref!r} ({path})", 1)
                                   if ref != path else str(exc))
            self._image_cache[path] = problem
            raise problem from None
        if len(self._image_cache) > 100_000:  # bound memory on manifests with millions of distinct images
            self._image_cache.clear()
            self._sizes.clear()
        self._image_cache[path] = path
        if size is not None:
            self._sizes[path] = size
        return path


def default_image_root(manifest: str, image_root: str | None) -> str | None:
    """Relative image paths are taken from ``--image-root``, else from the manifest's folder."""
    if image_root:
        return image_root
    if manifest.startswith("s3://"):
        return manifest.rsplit("/", 1)[0]  # s3://bucket/dir: relative images live beside the manifest
    return str(Path(manifest).expanduser().absolute().parent)


def iter_problems(manifest: str, pipeline: str, counts: dict, *, input_key=None, image_key=None,
                  id_key=None, image_root=None, endpoint_url=None) -> Iterator[Problem]:
    """Yield every problem in a manifest (bad JSON, missing keys, duplicate ids, bad images).

    ``counts`` is filled with ``rows`` and ``good`` as the stream is consumed.
    """
    checker = RowChecker(get_pipeline(pipeline), input_key, image_key, id_key,
                         default_image_root(manifest, image_root), endpoint_url=endpoint_url,
                         check_remote_images=True)
    counts.update(rows=0, good=0)
    for item in Manifest(manifest, endpoint_url=endpoint_url):
        counts["rows"] += 1
        _, problems = checker.check(item)
        if not problems:
            counts["good"] += 1
        yield from problems


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
    if shards:
        total = count_rows(spec.input, endpoint_url=endpoint_url)
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
                         default_image_root(spec.input, image_root),
                         stage_to=run_storage if stage_images and not count_only else None,
                         endpoint_url=endpoint_url)
    manifest = Manifest(spec.input, endpoint_url=endpoint_url)
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
                    tally.add(shard_row, checker.last_sizes, row_texts(checker.pipeline, shard_row["row"],
                                                                       spec.input_key,
                                                                       spec.option("system_prompt")))
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
    if on_row is not None:
        on_row(total_rows)
    unusable.refuse(spec.input, manifest.format, total_rows, image_root)
    spec.shards = shard_index
    spec.rows = total_rows
    spec.rows_per_shard = rows_per_shard
    spec.input_digest = f"sha256:{manifest.digest}"
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
