"""The budget during a run (``--max-cost``): a ceiling, kept by each shard without talking to the others.

The run's pricing and budget live in ``cost.json`` (written at plan time, rewritten on a resume with a new
``--max-cost``); each worker reports its shard's spend in ``spend/00000.json`` (every few seconds and at
each checkpoint), and in its done marker when it finishes.

The ceiling: before a request is sent, the most it can cost (its input tokens as estimated, plus
``--max-tokens`` or the table's cap, or its images at the per-image price) is reserved against the shard's
share of the budget, and a request the share cannot cover is not sent. Shard ``i``'s share is

    (budget - spend of the finished shards) x rows of shard i / rows of the unfinished shards

Over the unfinished shards the shares add up to what the finished ones left, so the run's spend stays
within the budget, however many workers or pods run at once and however stale their view of each other.
A share only grows as shards finish (a finished shard spent at most its share), so reading the done
markers late only makes a worker more careful. A shard whose share is used up stops, its unsent rows
unprocessed (resume with a higher ``--max-cost``).
"""

from __future__ import annotations

import asyncio
import time

from dfk8s.cost.pricing import Estimate, ModelPrice, PriceTable, request_usage, run_model, usd
from dfk8s.cost.usage import Usage
from dfk8s.errors import EXIT_DO_NOT_RETRY, Dfk8sError, NotFound, SpecError
from dfk8s.run import layout

#: Seconds between reads of the finished shards' spend (a list of output/ and the new done markers), when
#: a request does not fit the shard's share.
SHARE_POLL_SECONDS = 2.0


class BudgetExceeded(Dfk8sError):
    """The run's spend passed ``--max-cost``: the shard stopped with what it finished kept (resumable)."""

    exit_code = EXIT_DO_NOT_RETRY


def write_cost_record(storage, *, prices: PriceTable, est: Estimate | None, serving: str, options: dict,
                      max_cost: float | None) -> dict:
    """Write the run's cost.json: the price of its model, the estimate and the budget."""
    model = run_model(serving, options)
    price = prices.price(model).to_dict() if model else None
    record = {"table": prices.describe(), "date": prices.date, "model": model, "price": price,
              "api_mode": options.get("api_mode") or "sync", "max_cost": max_cost,
              "estimate": est.to_dict() if est else None}
    storage.write_json(layout.COST_KEY, record)
    return record


def read_cost_record(storage) -> dict | None:
    """The run's cost.json, or None (runs planned before it existed, or serving without a price)."""
    try:
        return storage.read_json(layout.COST_KEY)
    except NotFound:
        return None


def set_budget(storage, max_cost: float | None) -> dict | None:
    """Change a planned run's ``--max-cost`` (a resume with a new budget); returns the new record."""
    record = read_cost_record(storage)
    if record is None or record.get("max_cost") == max_cost:
        return record
    record["max_cost"] = max_cost
    storage.write_json(layout.COST_KEY, record)
    return record


def check_estimate(est: Estimate | None, max_cost: float | None) -> None:
    """Refuse a run whose estimate is over ``--max-cost``.

    Raises:
        SpecError: The estimate is over the budget (nothing has been sent).
    """
    if max_cost is None or est is None or est.no_cost:
        return
    if est.usd > max_cost:
        raise SpecError(f"the estimated cost {usd(est.usd)} ({est.api_mode} mode, {est.model}) is over "
                        f"--max-cost {usd(max_cost)}; nothing was sent (raise --max-cost, or use "
                        "--api-mode batch, --max-image-side or --max-tokens to spend less)")


def shard_cost(storage, index: int) -> dict | None:
    """A shard's spend so far: its done marker's, else its live spend object; None if it spent nothing."""
    for key in (layout.shard_done_key(index), layout.spend_key(index)):
        try:
            data = storage.read_json(key)
        except NotFound:
            continue
        if "cost_usd" in data or data.get("usage"):
            cost = data.get("cost_usd")
            return {"usage": data.get("usage") or {}, "cost_usd": None if cost is None else float(cost),
                    "stopped": bool(data.get("stopped_by_budget"))}
    return None


class Budget:
    """A shard's spend and its share of ``--max-cost``: the requests it sends stay within the share.

    Attributes:
        rows: Rows of this shard (its share is in proportion); set once the shard is read.
        reserved: The most the requests in flight can still cost.
    """

    def __init__(self, storage, index: int, record: dict | None, *, run_rows: int = 0, options=None,
                 output_images: bool = False):
        self.storage = storage
        self.index = index
        self.record = record or {}
        price = self.record.get("price")
        self.price = ModelPrice.from_dict(price["name"], {k: v for k, v in price.items() if k != "name"}) \
            if price else None
        self.batch = self.record.get("api_mode") == "batch"
        self.max_cost = self.record.get("max_cost")
        self.options = options or {}
        self.output_images = output_images
        self.run_rows = run_rows
        self.rows = 0
        self.usage = Usage()
        self.reserved = 0.0
        self.in_flight = 0
        #: Spend of the shard's earlier, finished life: a shard reopened by ``dfk8s retry`` starts from
        #: its final ledger (its kept rows carry no usage any more), so nothing paid is forgotten.
        self.prior = Usage()
        try:
            ledger = storage.read_json(layout.spend_key(index))
        except NotFound:
            ledger = {}
        if ledger.get("final"):
            self.prior = Usage.from_dict(ledger.get("usage"))
            self.usage.add(self.prior)
        self._finished: dict[int, tuple[int, float]] = {}  # shard -> (rows, cost): immutable once done
        self._share: float | None = None
        self._share_read = -1e18
        self._freed: asyncio.Event | None = None
        self._written: float | None = None

    @property
    def enforced(self) -> bool:
        """Whether requests are reserved against a share (a budget and a price)."""
        return self.max_cost is not None and self.price is not None

    @property
    def spent(self) -> float:
        """This shard's spend in USD."""
        return self.price.cost(self.usage, batch=self.batch) if self.price else 0.0

    def add(self, usage: dict | Usage | None) -> None:
        """Count one answered request's usage."""
        if usage:
            self.usage.add(usage if isinstance(usage, Usage) else Usage.from_dict(usage))

    # -- what a request costs ------------------------------------------------------------------------

    def _request_usage(self, request, *, most: bool, response=None) -> Usage:
        return request_usage(
            self.price, text_chars=sum(len(m.text or "") for m in request.messages),
            messages=len(request.messages),
            image_sizes=[(i.width or 1024, i.height or 1024) for i in request.images], options=self.options,
            output_images=self.output_images, most=most,
            answer_chars=len(response.text or "") if response is not None else None,
            images_out=len(response.images) if response is not None else None)

    def most(self, request) -> float:
        """The most ``request`` can cost (USD): what is reserved before it is sent."""
        if self.price is None:
            return 0.0
        return self.price.cost(self._request_usage(request, most=True), batch=self.batch)

    def fill_missing(self, usage: dict | None, request, response) -> dict | None:
        """The usage to count for an answer: the provider's, else what was asked, marked ``estimated``.

        An answer without usage (or with only an image count, as dall-e's) is priced from the request
        (its tokens as estimated, the images asked for or returned): never counted as free.
        """
        if self.price is None or request is None:
            return usage
        given = Usage.from_dict(usage) if usage else None
        if given is not None and self.price.cost(given) > 0:
            return usage
        estimated = self._request_usage(request, most=False, response=response)
        estimated.estimated = 1
        return estimated.to_dict()

    # -- the share -----------------------------------------------------------------------------------

    def _read_share(self) -> float:
        """This shard's share from storage (blocking): the budget left by the finished shards, by rows."""
        for key in self.storage.list(layout.OUTPUT_PREFIX):
            index = layout.done_index(key)
            if index is None or index == self.index or index in self._finished:
                continue
            try:
                done = self.storage.read_json(key)
            except NotFound:
                continue
            self._finished[index] = (int(done.get("rows") or 0), float(done.get("cost_usd") or 0.0))
        left = float(self.max_cost) - sum(cost for _, cost in self._finished.values())
        rows_left = max(self.rows, self.run_rows - sum(rows for rows, _ in self._finished.values()))
        return left * self.rows / rows_left if rows_left else left

    async def reserve(self, amount: float) -> None:
        """Reserve ``amount`` (the most the next requests can cost) within this shard's share.

        Waits while requests in flight may free room; re-reads the share (finished shards free theirs).

        Raises:
            BudgetExceeded: Nothing in flight, and the share cannot cover it: the shard stops here.
        """
        if not self.enforced:
            return
        if self._freed is None:
            self._freed = asyncio.Event()
        while True:
            if self._share is None or (self.spent + self.reserved + amount > self._share
                                       and time.monotonic() - self._share_read >= SHARE_POLL_SECONDS):
                self._share = await asyncio.to_thread(self._read_share)
                self._share_read = time.monotonic()
            if self.spent + self.reserved + amount <= self._share:
                self.reserved += amount
                self.in_flight += 1
                return
            if not self.in_flight:
                raise BudgetExceeded(f"shard {self.index}: {self.describe(amount)}")
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), SHARE_POLL_SECONDS)
            except TimeoutError:
                pass

    def release(self, amount: float) -> None:
        """The requests reserved with ``amount`` were answered (their usage is counted): free the room."""
        if not self.enforced:
            return
        self.reserved = max(0.0, self.reserved - amount)
        self.in_flight = max(0, self.in_flight - 1)
        if self._freed is not None:
            self._freed.set()

    def describe(self, amount: float = 0.0) -> str:
        """One line for the stop."""
        hint = ("" if self.output_images or self.options.get("max_tokens") else
                "; --max-tokens makes each request reserve less")
        return (f"the next request (up to {usd(amount)}) does not fit this shard's share of --max-cost "
                f"{usd(self.max_cost)} (spent {usd(self.spent)} of {usd(self._share or 0.0)}){hint}; "
                "finished rows are kept; resume with --run-id and a higher --max-cost")

    # -- on storage ----------------------------------------------------------------------------------

    def report(self) -> dict:
        """This shard's usage and cost, for spend/ and the done marker (cost None without a price)."""
        return {"usage": self.usage.to_dict(), "cost_usd": round(self.spent, 6) if self.price else None}

    def write(self, *, final: bool = False, stopped: bool = False) -> None:
        """Publish this shard's spend so ``status`` and the reducer see it.

        ``final``: the shard finished; ``stopped``: its share of ``--max-cost`` stopped it.
        """
        if self.price is None and not final:
            return
        spent = self.spent
        if not final and not stopped and spent == self._written:
            return
        report = self.report()
        if final:
            report["final"] = True
        if stopped:
            report["stopped_by_budget"] = True
        self.storage.write_json(layout.spend_key(self.index), report)
        self._written = spent


def run_spend(storage, shards: int) -> float | None:
    """The run's spend so far (finished shards and the live ones), or None when no price is known."""
    if (read_cost_record(storage) or {}).get("price") is None:
        return None
    return sum((shard_cost(storage, index) or {}).get("cost_usd") or 0.0 for index in range(shards))


def describe_spend(storage, shards: int) -> list[str]:
    """``spent: $X (of --max-cost $Y), estimate $Z`` for ``dfk8s status``; empty for unpriced runs."""
    record = read_cost_record(storage)
    if record is None:
        return []
    spent = sum((shard_cost(storage, index) or {}).get("cost_usd") or 0.0 for index in range(shards))
    line = f"  spent: {usd(spent)}"
    if record.get("max_cost") is not None:
        line += f" of --max-cost {usd(record['max_cost'])}"
    estimate = record.get("estimate") or {}
    if estimate.get("api_mode"):
        mode = estimate["api_mode"]
        line += f"; estimate {usd(estimate['batch_usd' if mode == 'batch' else 'sync_usd'])} ({mode})"
    return [line]
