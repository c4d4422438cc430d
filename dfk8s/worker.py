"""The worker: process one shard through one pipeline and serving, resumable at any moment.

The same entrypoint runs as a local process (``dfk8s run``) and as a pod of an Indexed Job; it learns
everything from ``run.json`` and its shard index, never from who started it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from dfk8s import layout
from dfk8s.budget import Budget, BudgetExceeded, read_cost_record
from dfk8s.errors import (
    EXIT_DO_NOT_RETRY,
    Dfk8sError,
    NotFound,
    ServingUnavailable,
    ShardError,
    SpecError,
    StorageError,
    SystematicFailure,
    WorkerStopped,
)
from dfk8s.images import CheckedImage, ImageProblem, is_http_url, read_ref_bytes, sniff_image
from dfk8s.lifecycle import StopToken, grace_seconds
from dfk8s.pipelines import Pipeline, get_pipeline
from dfk8s.resize import shrink_image
from dfk8s.servings import Response, RowError, Serving, build_serving
from dfk8s.servings.base import ImageInput
from dfk8s.spec import RunSpec
from dfk8s.usage import Usage

log = logging.getLogger(__name__)


@dataclass
class ShardStats:
    """What a finished shard reports in its done marker."""

    index: int
    rows: int
    ok: int
    failed: int
    seconds: float
    failed_offsets: list[int]
    resumed_rows: int = 0
    usage: dict | None = None
    cost_usd: float | None = None


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def read_shard(storage, index: int) -> list[dict]:
    """Read a shard's planned rows.

    Raises:
        ShardError: The shard is missing or corrupt (retrying cannot help).
    """
    key = layout.shard_input_key(index)
    try:
        return [json.loads(line) for line in storage.open_lines(key) if line.strip()]
    except NotFound:
        raise ShardError(f"shard {index} has no input at {storage.url(key)}") from None
    except ValueError as exc:
        raise ShardError(f"shard {index} input {storage.url(key)} is corrupt: {exc}") from None


def read_parts(storage, index: int) -> tuple[dict[int, dict], int]:
    """Read the checkpoint parts a previous attempt wrote.

    Returns:
        Finished records by global position, and the number the next part gets.
    """
    finished: dict[int, dict] = {}
    next_part = 0
    for key in storage.list(layout.part_prefix(index)):
        name = key.rsplit("/", 1)[-1]
        if not name.endswith(".jsonl"):
            continue
        next_part = max(next_part, int(name.split(".")[0]) + 1)
        for line in storage.open_lines(key):
            if line.strip():
                record = json.loads(line)
                finished[record["pos"]] = record
    return finished, next_part


class ShardRunner:
    """Runs the pending rows of one shard with a serving, writing a part every ``save_interval`` rows."""

    def __init__(self, spec: RunSpec, storage, index: int, serving: Serving | None,
                 *, endpoint_url: str | None = None, session: WorkerSession | None = None):
        self.spec = spec
        self.storage = storage
        self.index = index
        self.session = session or WorkerSession(serving)
        self.serving = serving
        self.endpoint_url = endpoint_url
        self.pipeline: Pipeline = get_pipeline(spec.pipeline)
        self.output_key = spec.output_key or self.pipeline.output_key
        self.buffer: list[dict] = []
        self.next_part = 0
        self.pending_writes: set[asyncio.Task] = set()
        self.budget = Budget(storage, index, read_cost_record(storage))
        self.max_image_side = spec.option("max_image_side")
        self.rows = 0
        self.ok = 0
        self.failed = 0
        self._published: tuple[int, int] | None = None
        self.fetcher = None  # dfk8s.fetch.ImageFetcher, made on the loop when a row has an http(s) image
        #: Called once every row of the shard has been sent (only the answers in flight are left): a
        #: long-lived worker then takes its next shard, whose rows fill the slots this one frees.
        self.on_draining: Callable[[], None] | None = None

    # -- records -------------------------------------------------------------------------------------

    def failed_record(self, shard_row: dict, error: dict) -> dict:
        """Build a failed row's output record: its input row with ``error`` and without the output key."""
        row = dict(shard_row["row"])
        row.pop(self.output_key, None)  # a placeholder like "images": [""] is not an output
        row["error"] = error
        return {"pos": shard_row["pos"], "id": shard_row["id"], "ok": False, "row": row}

    def ok_record(self, shard_row: dict, value) -> dict:
        """Build a finished row's output record: its input row, ``value`` under the output key, no error."""
        row = dict(shard_row["row"])
        row.pop("error", None)
        row[self.output_key] = value
        return {"pos": shard_row["pos"], "id": shard_row["id"], "ok": True, "row": row}

    def store_images(self, shard_row: dict, images: list[bytes]) -> list[str]:
        """Write a row's output images under deterministic names; returns their URLs."""
        urls = []
        for k, data in enumerate(images):
            key = layout.image_key(shard_row["id"], k)
            self.storage.write_bytes(key, _as_png(data))
            urls.append(self.storage.url(key))
        return urls

    def finish(self, shard_row: dict, result: Response | RowError) -> dict:
        """Turn a serving result into the row's output record (errors never escape)."""
        if isinstance(result, RowError):
            usage = result.details.pop("usage", None)  # a refused answer is paid for as well
            self.budget.add(usage)
            record = self.failed_record(shard_row, result.to_record())
            if usage:
                record["usage"] = usage
            return record
        usage = result.meta.get("usage")
        self.budget.add(usage)
        record = self._finish(shard_row, result)
        if usage:
            record["usage"] = usage  # what this row cost, summed into the done marker and summary.json
        return record

    def _finish(self, shard_row: dict, result: Response) -> dict:
        try:
            if self.pipeline.output_kind == "images":
                if not result.images:
                    return self.failed_record(shard_row, {"type": "NoImage", "attempts": result.attempts,
                                                          "message": "the serving returned no image"})
                return self.ok_record(shard_row, self.store_images(shard_row, result.images))
            return self.ok_record(shard_row, result.text)
        except ImageProblem as exc:
            return self.failed_record(shard_row, {"type": "BadImage", "message": str(exc),
                                                  "attempts": result.attempts})

    # -- checkpoints ---------------------------------------------------------------------------------

    async def add(self, records: Iterable[dict]) -> None:
        """Buffer ``records``; write a part once ``save_interval`` records are waiting."""
        records = list(records)
        self.buffer.extend(records)
        for record in records:
            if record["ok"]:
                self.ok += 1
            else:
                self.failed += 1
        if len(self.buffer) >= self.spec.save_interval:
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered records as the shard's next checkpoint part, if there are any."""
        if not self.buffer:
            return
        records, self.buffer = self.buffer, []
        key = layout.part_key(self.index, self.next_part)
        self.next_part += 1
        data = "".join(_dumps(r) + "\n" for r in records).encode()
        # Off the event loop, so requests in flight keep flowing while the part uploads.
        await asyncio.to_thread(self.storage.write_bytes, key, data)
        await asyncio.to_thread(self.budget.write)  # the spend other workers check --max-cost against

    # -- the loop ------------------------------------------------------------------------------------

    async def fetch_images(self, batch: list[dict]) -> dict:
        """Fetch the batch's http(s) images on the event loop (dfk8s.fetch): ref -> image or ImageProblem."""
        if self.spec.option("image_fetch") == "provider":
            return {}
        urls = list(dict.fromkeys(ref for r in batch for ref in r["images"] if is_http_url(ref)))
        if not urls:
            return {}
        if self.fetcher is None:
            from dfk8s.fetch import ImageFetcher

            self.fetcher = ImageFetcher.from_spec(self.spec)
        results = await asyncio.gather(*(self.fetcher.fetch(u) for u in urls), return_exceptions=True)
        return dict(zip(urls, results, strict=True))

    def read_image_ref(self, ref: str, fetched: dict) -> CheckedImage:
        """One resolved image reference as checked bytes (an http(s) one was fetched already).

        Raises:
            ImageProblem: The image is missing, refused, too big or undecodable.
        """
        if is_http_url(ref):
            if self.spec.option("image_fetch") == "provider":  # the API fetches it: pass the URL on
                return CheckedImage(b"", "", 0, 0, ref)
            result = fetched.get(ref)
            if isinstance(result, BaseException):
                raise result
            if result is None:
                raise ImageProblem(f"image {ref} was not fetched", type="ImageFetchError")
            return result
        # The plan checked the image (a full integrity check): read its bytes once, parse only its header.
        data = read_ref_bytes(ref, run_storage=self.storage, endpoint_url=self.endpoint_url)
        return sniff_image(data, ref)

    def request_for(self, shard_row: dict, fetched: dict | None = None):
        """Load a row's images and build its request; a RowError if an image is bad.

        The plan checked each image (a full integrity check); here its bytes are read once and only
        its header is parsed again, for the type and size the request needs.
        """
        images = []
        for ref in shard_row["images"]:
            try:
                checked = self.read_image_ref(ref, fetched or {})
            except ImageProblem as exc:
                return RowError(exc.type, str(exc), 0, dict(exc.details))
            image = ImageInput(checked.data, checked.mime, ref, checked.width, checked.height)
            # An unfetched URL (--image-fetch provider) has no bytes to shrink: the provider gets the URL.
            images.append(shrink_image(image, self.max_image_side) if self.max_image_side and checked.data
                          else image)
        return self.pipeline.build_request(
            shard_row["row"], images, row_id=shard_row["id"], input_key=self.spec.input_key,
            system_prompt=self.spec.option("system_prompt"), seed=self.spec.seed,
            prompt=self.spec.option("prompt"))

    async def run_batch(self, batch: list[dict]) -> None:
        """Serve one batch and buffer its records; bad images and serving bugs become failed rows.

        Raises:
            SpecError: The serving rejected the spec (the shard stops, exit 42).
            ServingUnavailable: The serving is down (the shard stops with a retryable exit).
        """
        fetched = await self.fetch_images(batch)
        # Remote images are read off the event loop; a local file in the page cache is read faster
        # than a thread hop takes (fetched http(s) images are in memory already).
        remote = any(not ref.startswith("/") and not is_http_url(ref) for r in batch for ref in r["images"])
        prepared = await asyncio.to_thread(lambda: [self.request_for(r, fetched) for r in batch]) \
            if remote else [self.request_for(r, fetched) for r in batch]
        ready = [(r, p) for r, p in zip(batch, prepared, strict=True) if not isinstance(p, RowError)]
        results: dict[int, Response | RowError] = {
            r["pos"]: p for r, p in zip(batch, prepared, strict=True) if isinstance(p, RowError)}
        if ready:
            try:
                answers = await self.serving.run([p for _, p in ready])
            except (SpecError, ServingUnavailable):
                raise  # the shard stops: 42 for a bad spec, a retryable exit for a serving that is down
            except Exception as exc:  # a serving bug fails its batch's rows, never the shard
                log.exception("serving failed a batch of %d rows", len(ready))
                answers = [RowError(type(exc).__name__, str(exc)[:500]) for _ in ready]
            if len(answers) != len(ready):
                answers = [RowError("ServingError", "the serving returned the wrong number of results")
                           for _ in ready]
            results.update({r["pos"]: a for (r, _), a in zip(ready, answers, strict=True)})
        if self.pipeline.output_kind == "images":
            records = await asyncio.to_thread(lambda: [self.finish(r, results[r["pos"]]) for r in batch])
        else:
            records = [self.finish(r, results[r["pos"]]) for r in batch]
        await self.add(records)

    # -- live progress -------------------------------------------------------------------------------

    def publish_progress(self) -> None:
        """Write the shard's live counts (progress/NNNNN.json), if they changed; a failure only warns."""
        counts = (self.ok, self.failed)
        if counts == self._published:
            return
        try:
            self.storage.write_json(layout.progress_key(self.index), {
                "shard": self.index, "rows": self.rows, "done": self.ok + self.failed, "ok": self.ok,
                "failed": self.failed, "updated_at": round(time.time(), 3)})
            self._published = counts
        except StorageError as exc:
            log.warning("shard %d: cannot publish progress: %s", self.index, exc)

    async def _publish_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.publish_progress)

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, pending: list[dict]) -> None:
        """Process ``pending`` rows, keeping ``serving.concurrency`` batches in flight.

        Raises:
            WorkerStopped: A stop was requested; what finished is checkpointed, the rest is not sent.
        """
        publisher = asyncio.create_task(self._publish_every(PROGRESS_SECONDS))
        try:
            await self._run(pending)
        finally:
            publisher.cancel()
            if self.fetcher is not None:  # nothing is fetched any more: release its connections first
                await self.fetcher.close()
            await self.flush()  # keep what finished, even when the shard stops on a fatal error
            await asyncio.to_thread(self.publish_progress)

    async def _run(self, pending: list[dict]) -> None:
        stop = self.session.stop
        planned_bad = [r for r in pending if r.get("error")]
        await self.add(self.failed_record(r, {**r["error"], "attempts": 0}) for r in planned_bad)
        todo = [r for r in pending if not r.get("error")]
        if not todo:
            return
        if self.spec.option("api_mode") == "batch":
            from dfk8s.batch import BatchShard  # one provider batch per shard, at the batch price

            await BatchShard(self).run(todo)
            return
        if stop.requested:
            raise WorkerStopped(f"shard {self.index}: stopped before it started ({stop.reason})",
                                reason=stop.reason)
        if self.serving is None:
            self.serving = self.session.serving_for(self.spec)
        size = max(1, self.serving.batch_size)
        slots = self.session.slots(self.serving)  # shared by the shards this worker runs at once
        stopping = stop.event()
        tasks: set[asyncio.Task] = set()
        fatal: list[BaseException] = []
        over_budget = False

        async def one(batch):
            try:
                await self.run_batch(batch)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # bad credentials, storage down: stop the shard
                fatal.append(exc)
            finally:
                slots.release()

        for start in range(0, len(todo), size):
            if slots.locked():  # wait for a free slot, or for a stop request, whichever comes first
                acquire = asyncio.ensure_future(slots.acquire())
                halt = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({acquire, halt}, return_when=asyncio.FIRST_COMPLETED)
                halt.cancel()
                if not acquire.done():
                    acquire.cancel()
                    break
                if stopping.is_set():
                    slots.release()
                    break
            else:
                await slots.acquire()
            if fatal or stopping.is_set():
                slots.release()
                break
            if self.budget.due():
                await asyncio.to_thread(self.budget.refresh)
            if self.budget.exceeded():  # like SIGTERM: no new rows, requests in flight finish
                over_budget = True
                slots.release()
                break
            task = asyncio.create_task(one(todo[start:start + size]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if self.on_draining is not None and not (fatal or over_budget or stopping.is_set()):
            self.on_draining()
        await self._drain(tasks, stopping)
        if fatal:
            raise fatal[0]
        if over_budget:
            raise BudgetExceeded(f"shard {self.index}: {self.budget.describe()}")
        if stopping.is_set():
            raise WorkerStopped(f"shard {self.index}: stopped ({stop.reason}); finished rows are "
                                "checkpointed", reason=stop.reason)

    async def _drain(self, tasks: set[asyncio.Task], stopping: asyncio.Event) -> None:
        """Wait for the batches in flight; after a stop request, give them the grace period, then cancel."""
        waiting = set(tasks)
        halt = asyncio.ensure_future(stopping.wait())
        try:
            while waiting and not stopping.is_set():
                _, waiting = await asyncio.wait(waiting | {halt}, return_when=asyncio.FIRST_COMPLETED)
                waiting.discard(halt)
        finally:
            halt.cancel()
        if waiting:
            grace = grace_seconds()
            log.warning("shard %d: letting %d requests in flight finish (up to %.0fs)", self.index,
                        len(waiting), grace)
            _, late = await asyncio.wait(waiting, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("shard %d: %d requests did not finish within the grace period; their rows "
                            "stay pending", self.index, len(late))
                await asyncio.gather(*late, return_exceptions=True)


#: Seconds between live progress writes of a running shard.
PROGRESS_SECONDS = float(os.environ.get("DFK8S_PROGRESS_SECONDS", "2"))


class WorkerSession:
    """What a worker process keeps from shard to shard: one event loop, one serving, one stop token.

    A long-lived local worker processes many shards in one session, so imports, the HTTP session and a
    FLUX load happen once; a pod (or a plain ``process_shard`` call) uses a session for one shard.
    """

    def __init__(self, serving: Serving | None = None, *, stop: StopToken | None = None):
        self._serving = serving
        self.owns_serving = serving is None
        self.stop = stop or StopToken()
        self._runner: asyncio.Runner | None = None
        self._slots: dict[int, asyncio.Semaphore] = {}

    def slots(self, serving: Serving) -> asyncio.Semaphore:
        """The in-flight slots of ``serving`` (its ``concurrency``), shared by every shard the session runs.

        A long-lived worker starts its next shard while the last answers of the current one are in flight:
        with one limit for both, the new shard's rows take exactly the slots the old one frees.
        """
        slots = self._slots.get(id(serving))
        if slots is None:
            slots = self._slots[id(serving)] = asyncio.Semaphore(max(1, serving.concurrency))
        return slots

    def serving_for(self, spec: RunSpec) -> Serving:
        """The session's serving, built from ``spec`` on first use."""
        if self._serving is None:
            loading = time.monotonic()
            self._serving = build_serving(spec)
            # bench/end_to_end.py counts these lines: model loads per worker process.
            log.info("loaded serving %s in %.2fs (pid %d)", spec.serving, time.monotonic() - loading,
                     os.getpid())
        return self._serving

    def run(self, coroutine):
        """Run ``coroutine`` on the session's event loop (the same loop for every shard)."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coroutine)

    def close(self) -> None:
        """Close the serving (if the session built it) and the event loop."""
        serving, self._serving = self._serving, None
        try:
            if serving is not None:
                if self._runner is not None:
                    self.run(serving.aclose())  # per-loop clients (HTTP sessions) close on their loop
                if self.owns_serving:
                    serving.close()
        finally:
            if self._runner is not None:
                self._runner.close()
                self._runner = None


def quiet_gc() -> None:
    """Fewer, cheaper garbage collections in a worker: the event loop stalls less at hundreds in flight.

    What is loaded by now (modules, the serving's classes) lives as long as the process: frozen out of
    every collection. Young objects are collected every 10,000 allocations instead of 700: a request's
    objects are mostly freed by reference counting anyway; the collector only finds their cycles.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def process_shard(storage, index: int, *, serving: Serving | None = None,
                  endpoint_url: str | None = None, session: WorkerSession | None = None) -> ShardStats:
    """Process shard ``index`` of the run in ``storage`` to its done marker; skip what is done.

    Args:
        storage: The run's storage.
        index: Shard index.
        serving: A serving to use instead of the one the spec names (tests, benchmarks).
        endpoint_url: S3 endpoint for s3:// image references.
        session: The worker's session (event loop, serving, stop token) when it processes many shards;
            by default one is made for this shard and closed after it.

    Returns:
        The shard's stats (also written as its done marker).

    Raises:
        SpecError / ShardError: The shard cannot succeed.
        WorkerStopped: A stop was requested; finished rows are checkpointed (a retry resumes).
    """
    own_session = session is None
    if own_session:
        session = WorkerSession(serving)
    try:
        return session.run(run_shard(storage, index, session=session, serving=serving,
                                     endpoint_url=endpoint_url))
    finally:
        if own_session:
            session.close()


async def run_shard(storage, index: int, *, session: WorkerSession, serving: Serving | None = None,
                    endpoint_url: str | None = None, on_draining: Callable[[], None] | None = None,
                    parallelism: int | None = None) -> ShardStats:
    """:func:`process_shard` on the session's running loop, so that one worker can run shards side by side.

    Storage calls run in threads: another shard's requests keep flowing meanwhile. ``on_draining`` is
    called once every row of the shard is sent (see :attr:`ShardRunner.on_draining`). ``parallelism``
    (the launcher's, sent with the shard) wins over ``$DFK8S_PARALLELISM``.
    """
    spec = await asyncio.to_thread(RunSpec.load, storage)
    if not 0 <= index < spec.shards:
        raise ShardError(f"shard index {index} is out of range: the run has {spec.shards} shards")
    given = str(parallelism or os.environ.get("DFK8S_PARALLELISM", ""))
    if given.isdigit() and int(given) > 0:
        spec.parallelism = int(given)  # the launcher's real parallelism, not the first run's
    if spec.option("rpm"):
        from dfk8s.servings.api import ApiOptions

        log.info("--rpm %g for the run: %g a minute for this worker (%d workers)", float(spec.option("rpm")),
                 ApiOptions.from_spec(spec, "").rpm, min(spec.parallelism, spec.shards))
    done_key = layout.shard_done_key(index)
    if await asyncio.to_thread(storage.exists, done_key):
        log.info("shard %d is already done", index)
        return ShardStats(**await asyncio.to_thread(storage.read_json, done_key))
    tripped = await asyncio.to_thread(read_breaker, storage)
    if tripped is not None:  # another shard's breaker tripped: this one would fail the same way
        raise tripped
    started = time.monotonic()
    shard_rows = await asyncio.to_thread(read_shard, storage, index)
    finished, next_part = await asyncio.to_thread(read_parts, storage, index)
    pending = [r for r in shard_rows if r["pos"] not in finished]
    log.info("shard %d: %d rows, %d already finished, %d to do", index, len(shard_rows), len(finished),
             len(pending))
    runner = await asyncio.to_thread(ShardRunner, spec, storage, index, serving, endpoint_url=endpoint_url,
                                     session=session)
    runner.next_part = next_part
    runner.on_draining = on_draining
    for record in finished.values():
        runner.budget.add(record.get("usage"))  # spent by earlier attempts: it counts against --max-cost
    runner.rows = len(shard_rows)
    runner.ok = sum(1 for r in finished.values() if r["ok"])
    runner.failed = len(finished) - runner.ok
    try:
        await runner.run(pending)
    except SystematicFailure as exc:
        # The finished rows are checkpointed (runner.run flushed them); the unsent ones stay unprocessed.
        if not await asyncio.to_thread(_exists, storage, layout.BREAKER_KEY):
            await asyncio.to_thread(storage.write_json, layout.BREAKER_KEY, {"shard": index, **exc.to_dict()})
        log.error("shard %d: circuit breaker: %s", index, exc)
        raise
    return await asyncio.to_thread(_assemble, storage, index, shard_rows, time.monotonic() - started,
                                   len(finished), runner.budget)


def read_breaker(storage) -> SystematicFailure | None:
    """The failure a tripped circuit breaker recorded in the run (``breaker.json``), or None."""
    if not _exists(storage, layout.BREAKER_KEY):
        return None
    try:
        found = storage.read_json(layout.BREAKER_KEY)
    except (NotFound, ValueError):
        return None
    return SystematicFailure(str(found.get("type", "SystematicFailure")), str(found.get("message", "")),
                             str(found.get("hint", "")))


def _assemble(storage, index: int, shard_rows: list[dict], seconds: float, resumed: int,
              budget: Budget | None = None) -> ShardStats:
    """Merge the parts into the shard output, in shard order, then write the done marker last."""
    finished, _ = read_parts(storage, index)
    missing = [r["pos"] for r in shard_rows if r["pos"] not in finished]
    if missing:
        raise RuntimeError(f"shard {index}: {len(missing)} rows have no result (first: {missing[0]})")
    lines, failed_offsets = [], []
    usage = Usage()
    for offset, shard_row in enumerate(shard_rows):
        record = finished[shard_row["pos"]]
        usage.add(Usage.from_dict(record.get("usage")))
        if not record["ok"]:
            failed_offsets.append(offset)
        lines.append(_dumps(record["row"]) + "\n")
    storage.write_bytes(layout.shard_output_key(index), "".join(lines).encode())
    stats = ShardStats(index=index, rows=len(shard_rows), ok=len(shard_rows) - len(failed_offsets),
                       failed=len(failed_offsets), seconds=round(seconds, 3), failed_offsets=failed_offsets,
                       resumed_rows=resumed)
    if budget is not None and budget.price is not None:
        usage.add(budget.prior)
        stats.usage = usage.to_dict()
        stats.cost_usd = round(budget.price.cost(usage, batch=budget.batch), 6)
    storage.write_json(layout.shard_done_key(index), asdict(stats))
    if budget is not None and budget.price is not None:
        budget.usage = usage
        budget.write(final=True)  # the ledger a reopened (retried) shard starts from
    for key in list(storage.list(layout.part_prefix(index))):
        storage.delete(key)  # the output holds them now; parts were only checkpoints
    storage.delete(layout.progress_key(index))
    log.info("shard %d done: %d ok, %d failed in %.1fs", index, stats.ok, stats.failed, seconds)
    return stats


def _as_png(data: bytes) -> bytes:
    """Output images are stored as PNG (deterministic names end in .png); re-encode anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        from dfk8s.images import check_image

        check_image(data, "output image")
        return data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            return buf.getvalue()
    except Exception as exc:
        raise ImageProblem(f"the serving returned an image that does not decode: {type(exc).__name__}") \
            from None


def shard_index_from_env(index: int | None) -> int:
    """The shard index: ``--index`` or Kubernetes' ``JOB_COMPLETION_INDEX``."""
    if index is not None:
        return index
    value = os.environ.get("JOB_COMPLETION_INDEX")
    if value is None or not value.isdigit():
        raise SpecError("no shard index: pass --index or set JOB_COMPLETION_INDEX")
    return int(value)


#: Shards a long-lived worker runs at once: the current one, and the next one while the current one's
#: last answers are in flight (it is only sent once the current one is draining).
SHARDS_AT_ONCE = 2


def serve(storage, *, endpoint_url: str | None = None, commands=None, replies=None,
          stop: StopToken | None = None) -> int:
    """A long-lived worker: take shard indexes from ``commands`` (one a line) until EOF or a stop.

    All shards run on one session (one event loop, one serving built once, one in-flight limit), each as
    soon as its index arrives. Each is answered with one JSON line on ``replies``:
    ``{"index", "code", "message", "ok", "failed"}``; ``code`` has the meaning of a worker's exit code:
    0 done, 42 cannot succeed, else retry. Before that, ``{"index", "event": "draining"}`` says that every
    row of the shard is sent: the launcher may then send the next index, which fills the slots the
    draining shard frees (no idle tail between shards). After a retryable failure or a stop the worker
    takes no new shard, lets the others finish and exits with that code (a fresh process takes over);
    after 42 it goes on, unless the run's circuit breaker tripped.

    Returns:
        The process exit code.
    """
    stop = stop or StopToken()
    commands = commands if commands is not None else sys.stdin
    session = WorkerSession(stop=stop)
    code = 0
    try:
        code = session.run(_serve(storage, session, endpoint_url, commands, replies))
    finally:
        if code != WorkerStopped.exit_code:
            session.close()  # a stopped worker may have a model call still running in a thread: skip
    return code


async def _serve(storage, session: WorkerSession, endpoint_url: str | None, commands, replies) -> int:
    import threading

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def put(line) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, line)
        except RuntimeError:  # the loop is closed: the worker is exiting
            pass

    def read_commands() -> None:
        for line in commands:
            put(line)
        put(None)  # EOF: the launcher closed the pipe (or is gone)

    def reply(message: dict) -> None:
        replies.write(_dumps(message) + "\n")
        replies.flush()

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    stopping = session.stop.event()
    active: set[asyncio.Task] = set()
    getter: asyncio.Future | None = None
    accepting, code = True, 0
    while True:
        if accepting and getter is None and not stopping.is_set():
            getter = asyncio.ensure_future(inbox.get())
        waiting = set(active) | ({getter} if getter is not None else set())
        if not waiting:
            break
        halt = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait(waiting | {halt}, return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if getter is not None and getter in done:
            line, getter = getter.result(), None
            if line is None or not line.strip():
                accepting = False
            else:
                index, *rest = (int(word) for word in line.split())  # "INDEX [PARALLELISM]"
                active.add(asyncio.create_task(_serve_one(
                    storage, index, session, endpoint_url,
                    lambda index=index: reply({"index": index, "event": "draining"}),
                    parallelism=rest[0] if rest else None)))
        for task in done & active:
            active.discard(task)
            shard_code, message = task.result()
            reply(message)
            if shard_code not in (0, EXIT_DO_NOT_RETRY) or message.get("breaker"):
                accepting = False  # the others finish; then a fresh process takes over
                code = code or shard_code
        if stopping.is_set():
            accepting = False
            if getter is not None:
                getter.cancel()
                getter = None
    return code


async def _serve_one(storage, index: int, session: WorkerSession, endpoint_url: str | None,
                     on_draining: Callable[[], None] | None = None,
                     parallelism: int | None = None) -> tuple[int, dict]:
    """Process one shard for :func:`serve`; returns the exit code it stands for and the reply."""
    reply: dict = {"index": index, "code": 0, "message": ""}
    try:
        stats = await run_shard(storage, index, session=session, endpoint_url=endpoint_url,
                                on_draining=on_draining, parallelism=parallelism)
        reply.update(ok=stats.ok, failed=stats.failed, message=f"shard {index}: {stats.ok} ok, "
                     f"{stats.failed} failed")
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, Dfk8sError) else 1
        if not isinstance(exc, Dfk8sError):
            log.exception("shard %d failed", index)
        else:
            log.error("shard %d: %s", index, exc)
        reply.update(code=code, message=f"{type(exc).__name__}: {exc}"[:1000])
        tripped = type(exc).__name__ == "SystematicFailure"
        if tripped and not await asyncio.to_thread(_exists, storage, layout.BREAKER_KEY):
            try:  # the breaker contract: breaker.json names the cause for the launcher's one line
                await asyncio.to_thread(storage.write_json, layout.BREAKER_KEY, {
                    "shard": index, "type": str(getattr(exc, "type", "") or getattr(exc, "kind", "")),
                    "message": str(getattr(exc, "message", "") or exc),
                    "hint": str(getattr(exc, "hint", ""))})
            except StorageError as write_error:
                log.warning("could not write %s: %s", layout.BREAKER_KEY, write_error)
        if code == EXIT_DO_NOT_RETRY and (tripped or await asyncio.to_thread(_exists, storage,
                                                                               layout.BREAKER_KEY)):
            reply["breaker"] = True
    return reply["code"], reply


def _exists(storage, key: str) -> bool:
    try:
        return storage.exists(key)
    except StorageError:
        return False
