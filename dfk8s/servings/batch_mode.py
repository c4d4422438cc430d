"""``--api-mode batch``: a shard becomes one provider batch (OpenAI Batch API, Gemini Batch Mode).

Batches cost half the synchronous price.

The worker writes the request file from its pending rows (``custom_id`` = row id), uploads it, creates
the batch and records it in ``batches/00000.json`` before anything else. It then polls with backoff,
downloads the result files and maps every line back to its row: succeeded lines become
results, failed lines error records with the provider's message, and lines that never ran (an expired
or cancelled batch) become ``NotProcessed`` records that ``dfk8s retry`` can send again.

Exactly once in money: a worker that restarts reads the record and resumes polling the same batch. The
record is written twice around the create: first with a token (``creating``), which also goes into the
batch's metadata, then with the batch id. A worker killed between the two finds its batch by that token
in the provider's batch list instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid

from dfk8s.errors import NotFound, SpecError, UsageError
from dfk8s.run import layout
from dfk8s.servings import SERVINGS, serving_info
from dfk8s.servings.base import RowError
from dfk8s.servings.batch_providers import (
    PROVIDERS,
    GeminiBatchProvider,
    OpenAIBatchProvider,
)

log = logging.getLogger(__name__)

#: Provider limits per batch input file (the planner keeps shards within them): OpenAI 50,000 requests
#: and 200 MB; Gemini 2 GB per file (dfk8s always sends a file: inline requests stop at 20 MB).
OPENAI_MAX_REQUESTS = 50_000
OPENAI_MAX_BYTES = 200 * 1024 * 1024
GEMINI_MAX_REQUESTS = 1_000_000
GEMINI_MAX_BYTES = 2 * 1024 * 1024 * 1024
TERMINAL = OpenAIBatchProvider.terminal + GeminiBatchProvider.terminal
DEFAULT_POLL_SECONDS = 60.0



def check_batch_mode(pipeline: str, serving: str) -> None:
    """Refuse ``--api-mode batch`` where the provider has no batch endpoint for the work.

    Raises:
        SpecError: Not batchable (one line naming what is).
    """
    if pipeline not in serving_info(serving).batch_pipelines:
        what = "; ".join(f"{name}: {', '.join(info.batch_pipelines)}" for name, info in SERVINGS.items()
                         if info.batch_pipelines)
        raise UsageError(f"--api-mode batch is not available for {pipeline} with {serving} "
                        f"(batchable: {what})")


def shard_limits(serving: str) -> tuple[int, int]:
    """(requests, bytes) one shard may hold in batch mode."""
    if serving == "gemini-images":
        return GEMINI_MAX_REQUESTS, GEMINI_MAX_BYTES
    return OPENAI_MAX_REQUESTS, OPENAI_MAX_BYTES


def request_bytes(shard_row: dict, image_bytes: list[int]) -> int:
    """About how many bytes a row adds to a batch input file (its images as base64 data URLs)."""
    text = len(json.dumps(shard_row["row"], ensure_ascii=False)) + 400
    return text + sum(n * 4 // 3 + 64 for n in image_bytes)


# ----- the shard -----------------------------------------------------------------------------------


class BatchShard:
    """Runs the pending rows of one shard as one provider batch, resumable at any point."""

    def __init__(self, runner):
        self.runner = runner
        self.spec = runner.spec
        self.storage = runner.storage
        self.index = runner.index
        check_batch_mode(self.spec.pipeline, self.spec.serving)
        self.poll_seconds = float(self.spec.option("batch_poll_seconds", DEFAULT_POLL_SECONDS))
        self.provider = PROVIDERS[self.spec.serving](self.spec)
        self.display = f"dfk8s-{self.spec.run_id}-{self.index:05d}"

    # -- the record --------------------------------------------------------------------------------

    def read_record(self) -> dict | None:
        """This shard's batch record, or None."""
        try:
            return self.storage.read_json(layout.batch_key(self.index))
        except NotFound:
            return None

    def write_record(self, record: dict) -> None:
        """Write the record whole (every reader sees the old or the new one)."""
        record["updated_at"] = time.time()
        self.storage.write_json(layout.batch_key(self.index), record)

    async def _save(self, record: dict, state) -> dict:
        record.update(batch_id=state.batch_id, status=state.status, done=state.done, counts=state.counts,
                      files=state.files)
        if state.errors:
            record["errors"] = state.errors[:5]
        await asyncio.to_thread(self.write_record, record)
        return record

    # -- the flow ----------------------------------------------------------------------------------

    async def run(self, todo: list[dict]) -> None:
        """Send ``todo`` as one batch (or resume the recorded one), then map its answers to rows."""
        try:
            record = await asyncio.to_thread(self.read_record)
            if record is None or (record.get("done") and record.get("mapped")):
                record = await self._create(todo, (record or {}).get("history", []))
            elif record.get("status") == "creating":
                record = await self._adopt_or_create(record)
            if record is None:
                return
            record = await self._wait(record)
            await self._map(record, todo)
        finally:
            await self.provider.aclose()

    async def _create(self, todo: list[dict], history: list) -> dict | None:
        with tempfile.TemporaryDirectory(prefix="dfk8s-batch-") as tmp:
            path = os.path.join(tmp, f"{self.display}.jsonl")
            count, most = await self._write_requests(todo, path)
            if not count:
                return None
            # A batch is sent whole: the most all its requests can cost must fit the shard's share of
            # --max-cost (BudgetExceeded leaves its rows unprocessed, sent nowhere).
            await self.runner.budget.reserve(most)
            size = os.path.getsize(path)
            max_requests, max_bytes = shard_limits(self.spec.serving)
            if count > max_requests or size > max_bytes:
                raise SpecError(f"shard {self.index}: {count} requests, {size} bytes: over the batch limits "
                                f"({max_requests} requests, {max_bytes} bytes); re-plan with fewer "
                                "--rows-per-shard")
            file_id = await self.provider.upload(path, self.display)
        record = {"provider": self.provider.name, "token": uuid.uuid4().hex, "input_file": file_id,
                  "status": "creating", "done": False, "requests": count, "created_at": time.time(),
                  "history": history}
        await asyncio.to_thread(self.write_record, record)
        return await self._create_batch(record)

    async def _write_requests(self, todo: list[dict], path: str) -> tuple[int, float]:
        """Write the request file a few rows at a time (memory stays flat).

        Returns the lines written, and the most their requests can cost (USD; 0 without a budget).

        Rows that cannot be sent (a bad image, no prompt) fail now, as in sync mode.
        """
        from dfk8s.servings.api import RowFailure

        count, most = 0, 0.0
        budget = self.runner.budget
        with open(path, "w", encoding="utf-8") as out:
            for start in range(0, len(todo), 64):
                chunk = todo[start:start + 64]
                prepared = await asyncio.to_thread(lambda c=chunk: [self.runner.request_for(r) for r in c])
                bad = []
                for row, request in zip(chunk, prepared, strict=True):
                    if isinstance(request, RowError):
                        bad.append((row, request))
                        continue
                    try:
                        out.write(self.provider.line(str(row["id"]), request) + "\n")
                        count += 1
                        most += budget.most(request) if budget.enforced else 0.0
                    except RowFailure as exc:
                        bad.append((row, RowError(exc.kind, str(exc), 0)))
                if bad:
                    await self.runner.add(self.runner.failed_record(r, e.to_record()) for r, e in bad)
        await self.runner.flush()
        return count, most

    async def _create_batch(self, record: dict) -> dict:
        state = await self.provider.create(record["input_file"], record["token"], self.display)
        record = await self._save(record, state)  # the batch id is on storage before anything else
        log.info("shard %d: created batch %s (%d requests)", self.index, state.batch_id, record["requests"])
        return record

    async def _adopt_or_create(self, record: dict) -> dict:
        """A worker died between uploading and recording the batch: find it by token, else create it."""
        state = await self.provider.find(record["token"], record["created_at"])
        if state is None:
            return await self._create_batch(record)
        log.info("shard %d: found batch %s created before a restart", self.index, state.batch_id)
        return await self._save(record, state)

    async def _wait(self, record: dict) -> dict:
        wait = min(1.0, self.poll_seconds)
        while not record.get("done"):
            await asyncio.sleep(wait)
            wait = min(self.poll_seconds, wait * 2)
            state = await self.provider.get(record["batch_id"])
            if (state.status, state.counts) != (record.get("status"), record.get("counts")) or state.done:
                record = await self._save(record, state)
                log.info("shard %d: batch %s %s %s", self.index, state.batch_id, state.status, state.counts)
        return record

    async def _map(self, record: dict, todo: list[dict]) -> None:
        from dfk8s.servings.batch_providers import BatchState

        state = BatchState(record["batch_id"], record["status"], True, record.get("counts") or {},
                           record.get("files") or [])
        answers = await self.provider.results(state)
        records, missing = [], 0
        for row in todo:
            result = answers.get(str(row["id"]))
            if result is None:
                missing += 1
                why = (record.get("errors") or [f"the batch ended {record.get('status')} before this request "
                                                 "ran"])[0]
                result = RowError("NotProcessed", f"batch {record.get('batch_id')}: {why}", 0,
                                  {"batch": record.get("batch_id")})
            records.append(await asyncio.to_thread(self.runner.finish, row, result))
        await self.runner.add(records)
        await self.runner.flush()
        record.update(mapped=True, not_processed=missing)
        record.setdefault("history", []).append(
            {k: record.get(k) for k in ("batch_id", "status", "counts", "requests", "not_processed")})
        await asyncio.to_thread(self.write_record, record)
        log.info("shard %d: batch %s mapped: %d rows, %d not processed", self.index, record.get("batch_id"),
                 len(records), missing)


def describe_batches(storage, shards: int) -> list[str]:
    """One line per shard with a batch: its id, state and request counts (for ``dfk8s status``)."""
    out = []
    for key in storage.list(layout.BATCHES_PREFIX):
        try:
            record = storage.read_json(key)
        except (NotFound, ValueError):
            continue
        index = int(key.rsplit("/", 1)[-1].split(".")[0])
        counts = record.get("counts") or {}
        out.append(f"  batch shard {index}: {record.get('batch_id') or '(creating)'} {record.get('status')}"
                   f" ({counts.get('completed', 0)}/{counts.get('total', record.get('requests', 0))} done, "
                   f"{counts.get('failed', 0)} failed)" + (" mapped" if record.get("mapped") else ""))
    return out


async def cancel_batches(storage, spec) -> list[str]:
    """Cancel the run's provider batches that are still running; returns their ids.

    What completed stays: a resumed worker maps the cancelled batch's output like any other.
    """
    provider = PROVIDERS[spec.serving](spec)
    cancelled = []
    try:
        for key in list(storage.list(layout.BATCHES_PREFIX)):
            record = storage.read_json(key)
            if record.get("batch_id") and not record.get("done"):
                await provider.cancel(record["batch_id"])
                cancelled.append(record["batch_id"])
    finally:
        await provider.aclose()
    return cancelled
