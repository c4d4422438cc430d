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

from dfk8s.cost.pricing import row_texts
from dfk8s.errors import Dfk8sError, ManifestError, UsageError
from dfk8s.inputs.manifest import MANIFEST_SUFFIXES, Manifest, ManifestItem, count_rows, expand_source
from dfk8s.pipelines import get_pipeline
from dfk8s.plan.checks import Problem, ProblemGroups, RowChecker
from dfk8s.plan.sizing import default_shard_size, estimate_rows
from dfk8s.run import layout
from dfk8s.run.spec import RunSpec

log = logging.getLogger(__name__)

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
        tally: A :class:`dfk8s.cost.pricing.Tally` that counts what each row's request will carry
            (the estimate).
        executor: ``local`` or ``kubernetes``: what the default shard size is sized for.

    Returns:
        The completed spec, also saved as run.json (unless ``count_only``).
    """
    if spec.option("image_fetch") == "provider" and spec.serving != "openai-chat":
        raise UsageError(f"--image-fetch provider works with the openai-chat serving only, not "
                         f"{spec.serving}")
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
        from dfk8s.servings.batch_mode import request_bytes, shard_limits

        max_requests, byte_cap = shard_limits(spec.serving)
        rows_per_shard = min(rows_per_shard, max_requests)
    checker = RowChecker(get_pipeline(spec.pipeline), spec.input_key, spec.image_key, spec.id_key,
                         default_image_root(spec.input, image_root, endpoint_url),
                         stage_to=run_storage if stage_images and not count_only else None,
                         endpoint_url=endpoint_url, blob_store=None if count_only else run_storage,
                         options=spec.options, own_text=spec.own_text)
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
                unusable.seen(item)
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
    try:
        unusable.refuse(spec.input, manifest.format, total_rows, image_root)
    except Dfk8sError:
        if not count_only:  # no run.json: the run does not exist; leave no shards behind either
            for index in range(shard_index):
                run_storage.delete(layout.shard_input_key(index))
        raise
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
    bad: int = 0
    groups: ProblemGroups = field(default_factory=ProblemGroups)
    #: Keys the rows have (the first rows'), to name when a key is missing from all of them.
    keys: dict = field(default_factory=dict)

    def seen(self, item: ManifestItem) -> None:
        if len(self.keys) < 50 and isinstance(item.row, dict) and item.pos < 1000:
            self.keys.update(dict.fromkeys(item.row))

    def count(self, item: ManifestItem, problems: list[Problem]) -> None:
        self.bad += 1
        if self.bad <= 100_000:  # what one line names: the problem most rows have
            self.groups.add(problems[0])
        if not self.first:
            self.first, self.first_bad_pos, self.first_raw = str(problems[0]), item.pos, item.raw or ""
        if item.row is None and (item.error or "").startswith("bad JSON"):
            self.not_json += 1
        elif all(" not found" in p.message and p.message.startswith("image ") for p in problems):
            self.missing_images += 1

    def refuse(self, source: str, fmt: str | None, rows: int, image_root: str | None) -> None:
        """Raise when no row can work: not JSON at all, a JSON object, or every image missing."""
        from dfk8s.errors import ManifestError

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
            raise UsageError(f"no image of any row was found (first: {self.first}); relative paths are "
                             f"read from {where}: pass --image-root DIR")
        if self.bad == rows:
            message, count = self.groups.most_common()
            keys = ", ".join(repr(k) for k in self.keys) or "none"
            raise UsageError(f"every row has a problem, so nothing would run: {count} rows: {message}; "
                             f"the rows have the keys {keys}")


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
