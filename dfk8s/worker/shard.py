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
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from dfk8s.cost.budget import Budget, BudgetExceeded, read_cost_record
from dfk8s.cost.usage import Usage
from dfk8s.errors import (
    NotFound,
    ServingUnavailable,
    ShardError,
    SpecError,
    StorageError,
    SystematicFailure,
    WorkerStopped,
)
from dfk8s.inputs import rows
from dfk8s.inputs.images import (
    CheckedImage,
    ImageProblem,
    is_data_uri,
    is_http_url,
    read_ref_bytes,
    sniff_image,
)
from dfk8s.inputs.resize import shrink_image
from dfk8s.pipelines import Pipeline, get_pipeline
from dfk8s.run import breaker, layout
from dfk8s.run.progress import PLAIN_LINE_SECONDS, describe_facts, progress_facts
from dfk8s.run.spec import RunSpec
from dfk8s.servings import Response, RowError, Serving
from dfk8s.servings.base import ImageInput
from dfk8s.worker.lifecycle import grace_seconds
from dfk8s.worker.session import WorkerSession

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
    #: A self-hosted engine's share: ``{"engine", "gpus", "startup_seconds", "images"}`` (None for others).
    engine: dict | None = None
    #: FLUX's speed settings and this worker's compile (:meth:`dfk8s.servings.flux_speed.Compiled.report`).
    flux: dict | None = None


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
        self.budget = Budget(storage, index, read_cost_record(storage), run_rows=spec.rows,
                             options=spec.options, output_images=self.pipeline.output_kind == "images")
        #: Set when a request did not fit the shard's share of --max-cost: no new rows are sent.
        self.over_budget: BudgetExceeded | None = None
        self.max_image_side = spec.option("max_image_side")
        self.rows = 0
        self.ok = 0
        self.failed = 0
        self._published: tuple | None = None
        self.fetcher = None  # an inputs.fetch.ImageFetcher, made on the loop when a row has an http(s) image
        #: Called once every row of the shard has been sent (only the answers in flight are left): a
        #: long-lived worker then takes its next shard, whose rows fill the slots this one frees.
        self.on_draining: Callable[[], None] | None = None

    # -- records -------------------------------------------------------------------------------------

    def failed_record(self, shard_row: dict, error: dict) -> dict:
        """Build a failed row's output record: its input row with ``error`` and without the output key."""
        row = self.located_row(shard_row)
        row.pop(self.output_key, None)  # a placeholder like "images": [""] is not an output
        row["error"] = error
        return {"pos": shard_row["pos"], "id": shard_row["id"], "ok": False, "row": row}

    def ok_record(self, shard_row: dict, value) -> dict:
        """Build a finished row's output record: its input row, ``value`` under the output key, no error."""
        row = self.located_row(shard_row)
        row.pop("error", None)
        row[self.output_key] = value
        return {"pos": shard_row["pos"], "id": shard_row["id"], "ok": True, "row": row}

    def located_row(self, shard_row: dict) -> dict:
        """The input row with its image paths made to resolve from anywhere (a copy; the rest unchanged).

        A path relative to the manifest means nothing next to result.jsonl: it becomes the absolute path
        the plan resolved (a local run), or the ``s3://`` URI of the image staged into the run (a
        cluster run). URIs, ``data:`` images, image bytes and empty placeholders stay as they are.
        """
        row = dict(shard_row["row"])
        resolved = shard_row.get("images") or []
        if not resolved or not self.pipeline.uses_images:
            return row
        key = rows.image_key_of(row, self.spec.image_key)
        value = row.get(key) if key else None
        values = value if isinstance(value, list) else [value]
        wanted = [v for v in values if v not in (None, "") and not (isinstance(v, str) and not v.strip())]
        if key is None or len(wanted) != len(resolved):
            return row  # a plan-time problem left the refs unresolved: keep the row as written
        refs = iter(resolved)
        located = []
        for item in values:
            if item in (None, "") or (isinstance(item, str) and not item.strip()):
                located.append(item)
                continue
            ref = next(refs)
            if isinstance(item, str) and "://" not in item and not is_data_uri(item):  # a path
                item = self.output_ref(ref[len(layout.RUN_REF_SCHEME):]) \
                    if ref.startswith(layout.RUN_REF_SCHEME) else ref
            located.append(item)
        row[key] = located if isinstance(value, list) else located[0]
        return row

    def output_ref(self, key: str) -> str:
        """How result.jsonl names an object of the run: its ``s3://`` URI, or its path in the run's folder.

        A local run's path is relative to that folder, so it resolves wherever the folder is copied.
        """
        return self.storage.url(key) if "://" in self.storage.uri else key

    def store_images(self, shard_row: dict, images: list[bytes]) -> list[str]:
        """Write a row's output images under deterministic names; returns how result.jsonl names them."""
        urls = []
        for k, data in enumerate(images):
            key = layout.image_key(shard_row["id"], k)
            self.storage.write_bytes(key, _as_png(data))
            urls.append(self.output_ref(key))
        return urls

    def finish(self, shard_row: dict, result: Response | RowError, request=None) -> dict:
        """Turn a serving result into the row's output record (errors never escape).

        ``request`` (what was sent) prices an answer that came without the provider's usage.
        """
        if isinstance(result, RowError):
            usage = result.details.pop("usage", None)  # a refused answer is paid for as well
            self.budget.add(usage)
            record = self.failed_record(shard_row, result.to_record())
            if usage:
                record["usage"] = usage
            return record
        usage = self.budget.fill_missing(result.meta.get("usage"), request, result)
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
        """Fetch the batch's http(s) images on the event loop (inputs.fetch): ref -> image or ImageProblem."""
        if self.spec.option("image_fetch") == "provider":
            return {}
        urls = list(dict.fromkeys(ref for r in batch for ref in r["images"] if is_http_url(ref)))
        if not urls:
            return {}
        if self.fetcher is None:
            from dfk8s.inputs.fetch import ImageFetcher

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
            prompt=self.spec.option("prompt"), own_text=self.spec.own_text)

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
        reserved = 0.0
        if ready:
            if self.budget.enforced:  # the most these requests can cost must fit the shard's share
                reserved = sum(self.budget.most(p) for _, p in ready)
                try:
                    await self.budget.reserve(reserved)
                except BudgetExceeded as exc:
                    self.over_budget = self.over_budget or exc
                    return  # not sent: these rows stay unprocessed (a resume with a higher budget sends them)
            try:
                answers = await self.serving.run([p for _, p in ready])
            except (SpecError, ServingUnavailable):
                self.budget.release(reserved)
                raise  # the shard stops: 42 for a bad spec, a retryable exit for a serving that is down
            except Exception as exc:  # a serving bug fails its batch's rows, never the shard
                log.exception("serving failed a batch of %d rows", len(ready))
                answers = [RowError(type(exc).__name__, str(exc)[:500]) for _ in ready]
            if len(answers) != len(ready):
                answers = [RowError("ServingError", "the serving returned the wrong number of results")
                           for _ in ready]
            results.update({r["pos"]: a for (r, _), a in zip(ready, answers, strict=True)})
        sent = {r["pos"]: p for r, p in ready}
        if self.pipeline.output_kind == "images":
            records = await asyncio.to_thread(
                lambda: [self.finish(r, results[r["pos"]], sent.get(r["pos"])) for r in batch])
        else:
            records = [self.finish(r, results[r["pos"]], sent.get(r["pos"])) for r in batch]
        self.budget.release(reserved)  # counted as spent now
        await self.add(records)

    # -- live progress -------------------------------------------------------------------------------

    def publish_progress(self) -> None:
        """Write the shard's live counts (progress/NNNNN.json) and spend, if they changed; failures warn."""
        try:
            self.budget.write()  # the live spend `dfk8s status` shows
        except StorageError as exc:
            log.warning("shard %d: cannot publish its spend: %s", self.index, exc)
        note = getattr(self.serving, "status_note", None)
        counts = (self.ok, self.failed, note)
        if counts == self._published:
            return
        live = {"shard": self.index, "rows": self.rows, "done": self.ok + self.failed, "ok": self.ok,
                "failed": self.failed, "updated_at": round(time.time(), 3)}
        if note:  # what the serving is doing before its first rows (compiling, loading a compile cache)
            live["note"] = note
        try:
            self.storage.write_json(layout.progress_key(self.index), live)
            self._published = counts
        except StorageError as exc:
            log.warning("shard %d: cannot publish progress: %s", self.index, exc)

    async def _publish_every(self, seconds: float) -> None:
        started, base, last_line = time.monotonic(), self.ok + self.failed, time.monotonic()
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(self.publish_progress)
            if time.monotonic() - last_line >= PLAIN_LINE_SECONDS:  # a pod's log tells its progress too
                last_line = time.monotonic()
                done = self.ok + self.failed
                rate = (done - base) / max(1e-6, last_line - started)
                facts = progress_facts(done, self.rows, self.ok, self.failed, rate,
                                       self.budget.spent if self.budget.price else None,
                                       getattr(self.serving, "status_note", None))
                log.info("shard %d: %s", self.index, describe_facts(facts), extra={"facts": {
                    "shard": self.index, **facts}})

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
            if self.over_budget is not None:  # the report says the budget stopped the run
                await asyncio.to_thread(self.budget.write, stopped=True)
            await asyncio.to_thread(self.publish_progress)

    async def _run(self, pending: list[dict]) -> None:
        stop = self.session.stop
        planned_bad = [r for r in pending if r.get("error")]
        await self.add(self.failed_record(r, {**r["error"], "attempts": 0}) for r in planned_bad)
        todo = [r for r in pending if not r.get("error")]
        if not todo:
            return
        if self.spec.option("api_mode") == "batch":
            from dfk8s.servings.batch_mode import (
                BatchShard,  # one provider batch per shard, at the batch price
            )

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
            if self.over_budget is not None:  # like SIGTERM: no new rows, requests in flight finish
                slots.release()
                break
            task = asyncio.create_task(one(todo[start:start + size]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if self.on_draining is not None and not (fatal or self.over_budget or stopping.is_set()):
            self.on_draining()
        await self._drain(tasks, stopping)
        if fatal:
            raise fatal[0]
        if self.over_budget is not None:
            raise self.over_budget
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
        from dfk8s.servings.api import worker_rpm

        log.info("--rpm %g for the run: %g a minute for this worker (%d workers)", float(spec.option("rpm")),
                 worker_rpm(spec), min(spec.parallelism, spec.shards))
    done_key = layout.shard_done_key(index)
    if await asyncio.to_thread(storage.exists, done_key):
        log.info("shard %d is already done", index)
        return ShardStats(**await asyncio.to_thread(storage.read_json, done_key))
    tripped = await asyncio.to_thread(breaker.tripped, storage)
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
    runner.rows = runner.budget.rows = len(shard_rows)
    runner.ok = sum(1 for r in finished.values() if r["ok"])
    runner.failed = len(finished) - runner.ok
    try:
        await runner.run(pending)
    except SystematicFailure as exc:
        # The finished rows are checkpointed (runner.run flushed them); the unsent ones stay unprocessed,
        # and so do those that failed with the very error the breaker stopped on: the one command that
        # fixes the cause (a resume, or `dfk8s retry --api-url ...`) sends them all.
        await asyncio.to_thread(breaker.trip, storage, index, exc)
        await asyncio.to_thread(_forget_failures_like, storage, index, exc)
        log.error("shard %d: circuit breaker: %s", index, exc)
        raise
    report = getattr(runner.serving, "engine_report", None)
    speed = getattr(runner.serving, "speed_report", None)
    return await asyncio.to_thread(_assemble, storage, index, shard_rows, time.monotonic() - started,
                                   len(finished), runner.budget, report() if report else None,
                                   speed() if speed else None)


def _forget_failures_like(storage, index: int, failure: SystematicFailure) -> None:
    """Drop from the shard's checkpoints the rows that failed with ``failure`` (they become unprocessed).

    The kept records go to one new part before the old parts are removed: a crash in between leaves
    duplicates that read_parts merges by position, never a lost row.
    """
    finished, next_part = read_parts(storage, index)
    dropped = {pos for pos, record in finished.items() if not record["ok"]
               and (record["row"].get("error") or {}).get("type") == failure.type
               and failure.message in str((record["row"].get("error") or {}).get("message", ""))}
    if not dropped:
        return
    old = [key for key in storage.list(layout.part_prefix(index)) if key.endswith(".jsonl")]
    kept = [record for pos, record in sorted(finished.items()) if pos not in dropped]
    if kept:
        data = "".join(_dumps(r) + "\n" for r in kept).encode()
        storage.write_bytes(layout.part_key(index, next_part), data)
    for key in old:
        storage.delete(key)
    log.info("shard %d: %d rows that failed with %s go back to unprocessed", index, len(dropped),
             failure.type)


def _assemble(storage, index: int, shard_rows: list[dict], seconds: float, resumed: int,
              budget: Budget | None = None, engine: dict | None = None,
              flux: dict | None = None) -> ShardStats:
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
                       resumed_rows=resumed, flux=flux)
    if engine is not None:  # images the engine read: those of the rows it answered
        failed = set(failed_offsets)
        images = sum(len(r.get("images") or []) for k, r in enumerate(shard_rows) if k not in failed)
        stats.engine = {**engine, "images": images}
    if budget is not None:  # usage is counted whether or not a price is known (cost None then)
        usage.add(budget.prior)
        stats.usage = usage.to_dict()
        if budget.price is not None:
            stats.cost_usd = round(budget.price.cost(usage, batch=budget.batch), 6)
    storage.write_json(layout.shard_done_key(index), asdict(stats))
    if budget is not None:
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
        from dfk8s.inputs.images import check_image

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
