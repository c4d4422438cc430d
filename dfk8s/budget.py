"""The budget during a run (``--max-cost``): the run's cost record and every shard's spend, on storage.

The run's pricing and budget live in ``cost.json`` (written at plan time, rewritten on a resume with a new
``--max-cost``); each worker reports its shard's spend in ``spend/00000.json`` as it checkpoints, and in
its done marker when it finishes. A worker stops taking rows once the run's spend passes the budget.
"""

from __future__ import annotations

import math
import time

from dfk8s.cost import Estimate, ModelPrice, PriceTable, run_model, usd
from dfk8s.errors import EXIT_DO_NOT_RETRY, Dfk8sError, NotFound, SpecError
from dfk8s.usage import Usage

COST_KEY = "cost.json"
SPEND_PREFIX = "spend"
#: Seconds between reads of the other shards' spend (each read lists spend/ and the done markers).
BUDGET_POLL_SECONDS = 5.0
BUDGET_NEAR_POLL_SECONDS = 0.5


def spend_key(index: int) -> str:
    """Key of shard ``index``'s live spend."""
    return f"{SPEND_PREFIX}/{index:05d}.json"


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
    storage.write_json(COST_KEY, record)
    return record


def read_cost_record(storage) -> dict | None:
    """The run's cost.json, or None (runs planned before it existed, or serving without a price)."""
    try:
        return storage.read_json(COST_KEY)
    except NotFound:
        return None


def set_budget(storage, max_cost: float | None) -> dict | None:
    """Change a planned run's ``--max-cost`` (a resume with a new budget); returns the new record."""
    record = read_cost_record(storage)
    if record is None or record.get("max_cost") == max_cost:
        return record
    record["max_cost"] = max_cost
    storage.write_json(COST_KEY, record)
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
    from dfk8s import layout

    for key in (layout.shard_done_key(index), spend_key(index)):
        try:
            data = storage.read_json(key)
        except NotFound:
            continue
        if "cost_usd" in data:
            return {"usage": data.get("usage") or {}, "cost_usd": float(data.get("cost_usd") or 0.0)}
    return None


class Budget:
    """A worker's view of the run's spend: its own shard live, the others read every few seconds."""

    def __init__(self, storage, index: int, record: dict | None):
        self.storage = storage
        self.index = index
        self.record = record or {}
        price = self.record.get("price")
        self.price = ModelPrice.from_dict(price["name"], {k: v for k, v in price.items() if k != "name"}) \
            if price else None
        self.batch = self.record.get("api_mode") == "batch"
        self.max_cost = self.record.get("max_cost")
        self.usage = Usage()
        #: Spend of the shard's earlier, finished life: a shard reopened by ``dfk8s retry`` starts from
        #: its final ledger (its kept rows carry no usage any more), so nothing paid is forgotten.
        self.prior = Usage()
        if self.price is not None:
            try:
                ledger = storage.read_json(spend_key(index))
            except NotFound:
                ledger = {}
            if ledger.get("final"):
                self.prior = Usage.from_dict(ledger.get("usage"))
                self.usage.add(self.prior)
        self._others = 0.0
        self._others_read = -math.inf

    @property
    def spent(self) -> float:
        """This shard's spend in USD."""
        return self.price.cost(self.usage, batch=self.batch) if self.price else 0.0

    def add(self, usage: dict | Usage | None) -> None:
        """Count one answered request's usage."""
        if usage:
            self.usage.add(usage if isinstance(usage, Usage) else Usage.from_dict(usage))

    def report(self) -> dict:
        """This shard's usage and cost, for spend/ and the done marker."""
        return {"usage": self.usage.to_dict(), "cost_usd": round(self.spent, 6)}

    def write(self, *, final: bool = False) -> None:
        """Publish this shard's spend so other workers and the reducer see it (``final``: it finished)."""
        if self.price is not None:
            report = self.report()
            if final:
                report["final"] = True
            self.storage.write_json(spend_key(self.index), report)

    def _read_others(self) -> float:
        from dfk8s import layout

        total = 0.0
        indexes = set()
        for key in self.storage.list(SPEND_PREFIX):
            indexes.add(int(key.rsplit("/", 1)[-1].split(".")[0]))
        for key in self.storage.list(layout.OUTPUT_PREFIX):
            index = layout.done_index(key)
            if index is not None:
                indexes.add(index)
        for index in indexes - {self.index}:
            spent = shard_cost(self.storage, index)
            total += spent["cost_usd"] if spent else 0.0
        return total

    def due(self) -> bool:
        """Whether the other shards' spend should be read again (a budget is set, and it is time).

        Every 5 s while the run is far from its budget; every 0.5 s once it has spent half of it, so
        parallel workers overshoot by little.
        """
        if self.max_cost is None or self.price is None:
            return False
        near = self._others + self.spent >= 0.5 * float(self.max_cost)
        every = BUDGET_NEAR_POLL_SECONDS if near else BUDGET_POLL_SECONDS
        return time.monotonic() - self._others_read >= every

    def refresh(self) -> None:
        """Read the other shards' spend from storage (blocking: call it off the event loop)."""
        self._others, self._others_read = self._read_others(), time.monotonic()

    def exceeded(self) -> bool:
        """Whether the run's spend (this shard live, the others as last read) has passed ``--max-cost``."""
        if self.max_cost is None or self.price is None:
            return False
        return self._others + self.spent >= float(self.max_cost)

    def describe(self) -> str:
        """One line for the stop."""
        return (f"the run's spend {usd(self._others + self.spent)} passed --max-cost {usd(self.max_cost)}; "
                "finished rows are kept; resume with --run-id and a higher --max-cost")


def describe_spend(storage, shards: int) -> list[str]:
    """``spent: $X (of --max-cost $Y), estimate $Z`` for ``dfk8s status``; empty for unpriced runs."""
    record = read_cost_record(storage)
    if record is None:
        return []
    spent = sum((shard_cost(storage, index) or {}).get("cost_usd", 0.0) for index in range(shards))
    line = f"  spent: {usd(spent)}"
    if record.get("max_cost") is not None:
        line += f" of --max-cost {usd(record['max_cost'])}"
    estimate = record.get("estimate") or {}
    if estimate.get("api_mode"):
        mode = estimate["api_mode"]
        line += f"; estimate {usd(estimate['batch_usd' if mode == 'batch' else 'sync_usd'])} ({mode})"
    return [line]
