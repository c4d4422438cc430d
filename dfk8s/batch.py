"""``--api-mode batch``: a shard becomes one provider batch (OpenAI Batch API), at half the sync price.

The worker writes the request file from its pending rows (``custom_id`` = row id), uploads it, creates
the batch and records it in ``batches/00000.json`` before anything else. It then polls with backoff,
downloads the output and error files and maps every line back to its row: succeeded lines become
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
import time
import uuid
from contextlib import contextmanager
from typing import Any

from dfk8s.errors import NotFound, SpecError
from dfk8s.servings.base import Request, Response, RowError

log = logging.getLogger(__name__)

BATCHES_PREFIX = "batches"
#: Provider limits per batch input file (the planner keeps shards within them).
OPENAI_MAX_REQUESTS = 50_000
OPENAI_MAX_BYTES = 200 * 1024 * 1024
#: Batchable servings and the endpoint each posts to.
BATCH_SERVINGS = {"openai-chat": "/v1/chat/completions", "openai-images": "/v1/images/generations"}
BATCH_PIPELINES = {"openai-chat": ("caption", "vqa"), "openai-images": ("text2image",)}
TERMINAL = ("completed", "failed", "expired", "cancelled")
DEFAULT_POLL_SECONDS = 60.0


def batch_key(index: int) -> str:
    """Key of shard ``index``'s batch record."""
    return f"{BATCHES_PREFIX}/{index:05d}.json"


def check_batch_mode(pipeline: str, serving: str) -> None:
    """Refuse ``--api-mode batch`` where the provider has no batch endpoint for the work.

    Raises:
        SpecError: Not batchable (one line naming what is).
    """
    if pipeline not in BATCH_PIPELINES.get(serving, ()):
        what = "; ".join(f"{s}: {', '.join(p)}" for s, p in BATCH_PIPELINES.items())
        raise SpecError(f"--api-mode batch is not available for {pipeline} with {serving} "
                        f"(batchable: {what})")


def shard_limits(serving: str) -> tuple[int, int]:
    """(requests, bytes) one shard may hold in batch mode."""
    return OPENAI_MAX_REQUESTS, OPENAI_MAX_BYTES


def request_bytes(shard_row: dict, image_bytes: list[int]) -> int:
    """About how many bytes a row adds to a batch input file (its images as base64 data URLs)."""
    text = len(json.dumps(shard_row["row"], ensure_ascii=False)) + 400
    return text + sum(n * 4 // 3 + 64 for n in image_bytes)


# ----- the request file ----------------------------------------------------------------------------


def _chat_body(spec, request: Request) -> dict:
    from dfk8s.servings.openai_chat import DEFAULT_MODEL, chat_messages

    body: dict[str, Any] = {"model": spec.option("model") or DEFAULT_MODEL,
                            "messages": chat_messages(request.messages)}
    if spec.option("temperature") is not None:
        body["temperature"] = spec.option("temperature")
    if spec.option("max_tokens") is not None:
        body["max_tokens"] = spec.option("max_tokens")
    return body


def _images_body(serving, request: Request) -> dict:
    serving._check_prompt(request.prompt)
    return {"prompt": request.prompt, **serving._common()}


# ----- answers back to rows ------------------------------------------------------------------------


def _chat_response(body: dict) -> Response:
    """A batch line's chat completion as the sync serving would answer it (same checks, same errors)."""
    from openai.types.chat import ChatCompletion

    from dfk8s.cost import usage_from_openai_chat
    from dfk8s.servings.api import RowFailure

    completion = ChatCompletion.model_validate(body)
    if not completion.choices:
        raise RowFailure("EmptyResponse", "the response has no choices")
    message = completion.choices[0].message
    if getattr(message, "refusal", None):
        raise RowFailure("Refusal", message.refusal)
    if not message.content:
        raise RowFailure("EmptyResponse", "the model returned no text",
                         {"finish_reason": completion.choices[0].finish_reason})
    meta: dict[str, Any] = {"finish_reason": completion.choices[0].finish_reason}
    usage = usage_from_openai_chat(completion.usage)
    if usage is not None:
        meta["usage"] = usage.to_dict()
    return Response(text=message.content, meta=meta)


async def _to_result(kind: str, serving, line: dict) -> Response | RowError | None:
    """One output or error line as a row result; None for a line that never ran (not processed)."""
    from dfk8s.servings.api import RetryableError, RowFailure

    response = line.get("response")
    if response is None:
        error = line.get("error") or {}
        if error.get("code") in ("batch_expired", "batch_cancelled"):
            return None
        return RowError("BatchLineFailed", str(error.get("message") or error.get("code") or "failed"), 1,
                        {"code": error.get("code")})
    body = response.get("body") or {}
    status = int(response.get("status_code") or 0)
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        error = error or {}
        code = error.get("code") or error.get("type")
        kind_ = "Refusal" if code == "content_policy_violation" else (
            "ServerError" if status >= 500 or status == 429 else "BadRequest")
        return RowError(kind_, f"HTTP {status}: {error.get('message') or 'failed'}", 1,
                        {"status": status, "code": code})
    try:
        if kind == "openai-chat":
            return _chat_response(body)
        from openai.types import ImagesResponse

        return await serving._response(ImagesResponse.model_validate(body))
    except (RowFailure, RetryableError) as exc:
        return RowError(exc.kind, str(exc), 1, dict(getattr(exc, "details", {}) or {}))
    except Exception as exc:  # a line we cannot read fails its row, never the shard
        return RowError("MalformedResponse", f"{type(exc).__name__}: {exc}"[:300], 1)


# ----- the shard -----------------------------------------------------------------------------------


class BatchShard:
    """Runs the pending rows of one shard as one provider batch, resumable at any point."""

    def __init__(self, runner):
        from dfk8s.servings.api import ApiOptions
        from dfk8s.servings.openai_common import make_client

        self.runner = runner
        self.spec = runner.spec
        self.storage = runner.storage
        self.index = runner.index
        self.kind = self.spec.serving
        check_batch_mode(self.spec.pipeline, self.kind)
        self.poll_seconds = float(self.spec.option("batch_poll_seconds", DEFAULT_POLL_SECONDS))
        self.options = ApiOptions.from_spec(self.spec, "")
        self.client = make_client(self.options)
        self.serving = None
        if self.kind == "openai-images":
            from dfk8s.servings.openai_images import OpenAIImagesServing

            self.serving = OpenAIImagesServing.from_spec(self.spec)

    # -- the record --------------------------------------------------------------------------------

    def read_record(self) -> dict | None:
        """This shard's batch record, or None."""
        try:
            return self.storage.read_json(batch_key(self.index))
        except NotFound:
            return None

    def write_record(self, record: dict) -> None:
        """Write the record whole (every reader sees the old or the new one)."""
        record["updated_at"] = time.time()
        self.storage.write_json(batch_key(self.index), record)

    # -- the flow ----------------------------------------------------------------------------------

    async def run(self, todo: list[dict]) -> None:
        """Send ``todo`` as one batch (or resume the recorded one), then map its answers to rows."""
        try:
            record = await asyncio.to_thread(self.read_record)
            if record is None or (record.get("status") in TERMINAL and record.get("mapped")):
                record = await self._create(todo)
                if record is None:
                    return
            elif record.get("status") == "creating":
                record = await self._adopt_or_create(record, todo)
                if record is None:
                    return
            record = await self._wait(record)
            await self._map(record, todo)
        finally:
            await self.client.close()
            if self.serving is not None:
                await self.serving.aclose()

    async def _lines(self, todo: list[dict]) -> tuple[list[str], list[tuple[dict, RowError]]]:
        endpoint = BATCH_SERVINGS[self.kind]
        lines, bad = [], []
        prepared = await asyncio.to_thread(lambda: [self.runner.request_for(r) for r in todo])
        for row, request in zip(todo, prepared, strict=True):
            if isinstance(request, RowError):
                bad.append((row, request))
                continue
            try:
                body = _chat_body(self.spec, request) if self.kind == "openai-chat" else \
                    _images_body(self.serving, request)
            except Exception as exc:  # RowFailure for a row without a prompt
                bad.append((row, RowError(getattr(exc, "kind", "BadInput"), str(exc), 0)))
                continue
            lines.append(json.dumps({"custom_id": str(row["id"]), "method": "POST", "url": endpoint,
                                     "body": body}, ensure_ascii=False, separators=(",", ":")))
        return lines, bad

    async def _create(self, todo: list[dict]) -> dict | None:
        lines, bad = await self._lines(todo)
        if bad:  # rows that cannot be sent fail now, as in sync mode
            await self.runner.add(self.runner.failed_record(r, e.to_record()) for r, e in bad)
            await self.runner.flush()
        if not lines:
            return None
        data = ("\n".join(lines) + "\n").encode()
        if len(lines) > OPENAI_MAX_REQUESTS or len(data) > OPENAI_MAX_BYTES:
            raise SpecError(f"shard {self.index}: {len(lines)} requests, {len(data)} bytes: over the batch "
                            f"limits ({OPENAI_MAX_REQUESTS} requests, {OPENAI_MAX_BYTES} bytes); re-plan "
                            "with fewer --rows-per-shard")
        token = uuid.uuid4().hex
        with _errors():
            upload = await self.client.files.create(
                file=(f"{self.spec.run_id}-{self.index:05d}.jsonl", data), purpose="batch")
        record = {"provider": "openai", "endpoint": BATCH_SERVINGS[self.kind], "token": token,
                  "input_file_id": upload.id, "status": "creating", "requests": len(lines),
                  "created_at": time.time(), "history": (await asyncio.to_thread(self.read_record) or {})
                  .get("history", [])}
        await asyncio.to_thread(self.write_record, record)
        return await self._create_batch(record)

    async def _create_batch(self, record: dict) -> dict:
        with _errors():
            batch = await self.client.batches.create(
                input_file_id=record["input_file_id"], endpoint=record["endpoint"], completion_window="24h",
                metadata={"dfk8s_run": self.spec.run_id, "dfk8s_shard": str(self.index),
                          "dfk8s_token": record["token"]})
        record.update(batch_id=batch.id, status=batch.status, counts=_counts(batch))
        await asyncio.to_thread(self.write_record, record)  # before anything else
        log.info("shard %d: created batch %s (%d requests)", self.index, batch.id, record["requests"])
        return record

    async def _adopt_or_create(self, record: dict, todo: list[dict]) -> dict | None:
        """A worker died between uploading and recording the batch: find it by token, else create it."""
        with _errors():
            async for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get("dfk8s_token") == record["token"]:
                    record.update(batch_id=batch.id, status=batch.status, counts=_counts(batch))
                    await asyncio.to_thread(self.write_record, record)
                    log.info("shard %d: found batch %s created before a restart", self.index, batch.id)
                    return record
                if batch.created_at < record["created_at"] - 3600:
                    break  # the list is newest first: ours would be newer than this
        return await self._create_batch(record)

    async def _wait(self, record: dict) -> dict:
        wait = min(1.0, self.poll_seconds)
        while record.get("status") not in TERMINAL:
            with _errors():
                batch = await self.client.batches.retrieve(record["batch_id"])
            changed = batch.status != record.get("status") or _counts(batch) != record.get("counts")
            record.update(status=batch.status, counts=_counts(batch), output_file_id=batch.output_file_id,
                          error_file_id=batch.error_file_id)
            if batch.errors and batch.errors.data:
                record["errors"] = [e.message for e in batch.errors.data][:5]
            if changed:
                await asyncio.to_thread(self.write_record, record)
                log.info("shard %d: batch %s %s %s", self.index, record["batch_id"], batch.status,
                         record["counts"])
            if batch.status in TERMINAL:
                break
            await asyncio.sleep(wait)
            wait = min(self.poll_seconds, wait * 2)
        return record

    async def _map(self, record: dict, todo: list[dict]) -> None:
        answers: dict[str, dict] = {}
        for key in ("output_file_id", "error_file_id"):
            if record.get(key):
                with _errors():
                    content = await self.client.files.content(record[key])
                for raw in content.content.splitlines():
                    if raw.strip():
                        line = json.loads(raw)
                        answers[str(line.get("custom_id"))] = line
        rows = {str(r["id"]): r for r in todo}
        records, missing = [], 0
        for row_id, row in rows.items():
            line = answers.get(row_id)
            result = await _to_result(self.kind, self.serving, line) if line is not None else None
            if result is None:
                missing += 1
                why = record.get("errors") or [f"the batch {record.get('status')} before this request ran"]
                result = RowError("NotProcessed", f"batch {record.get('batch_id')}: {why[0]}", 0,
                                  {"batch": record.get("batch_id")})
            records.append(await asyncio.to_thread(self.runner.finish, row, result))
        await self.runner.add(records)
        await self.runner.flush()
        record.update(mapped=True, not_processed=missing)
        history = record.setdefault("history", [])
        history.append({k: record.get(k) for k in ("batch_id", "status", "counts", "requests")})
        await asyncio.to_thread(self.write_record, record)
        log.info("shard %d: batch %s mapped: %d rows, %d not processed", self.index, record.get("batch_id"),
                 len(records), missing)


def _counts(batch) -> dict:
    counts = batch.request_counts
    return {"total": counts.total, "completed": counts.completed, "failed": counts.failed} if counts else {}


@contextmanager
def _errors(mapper=None):
    """SDK errors mapped as the sync servings map them; a row-level failure here is a shard-level retry."""
    from dfk8s.errors import ServingUnavailable
    from dfk8s.servings.api import RetryableError, RowFailure
    from dfk8s.servings.openai_common import openai_errors

    try:
        with openai_errors():
            yield
    except (RetryableError, RowFailure) as err:
        raise ServingUnavailable(f"batch API: {err}") from None


def describe_batches(storage, shards: int) -> list[str]:
    """One line per shard with a batch: its id, state and request counts (for ``dfk8s status``)."""
    out = []
    for key in storage.list(BATCHES_PREFIX):
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
    from dfk8s.servings.api import ApiOptions
    from dfk8s.servings.openai_common import make_client

    client = make_client(ApiOptions.from_spec(spec, ""))
    cancelled = []
    try:
        for key in list(storage.list(BATCHES_PREFIX)):
            record = storage.read_json(key)
            if record.get("batch_id") and record.get("status") not in TERMINAL:
                import openai

                try:
                    await client.batches.cancel(record["batch_id"])
                    cancelled.append(record["batch_id"])
                except openai.ConflictError:
                    pass  # it ended meanwhile
    finally:
        await client.close()
    return cancelled
