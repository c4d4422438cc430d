"""The report's sampling rule: failed rows first up to half of --rows, the rest evenly over the input."""

from __future__ import annotations

import math
import re

import pytest

from dfk8s.report import Counts, sample_rows, shares, write_report
from dfk8s.report._sample import even_ranks, type_quotas
from dfk8s.storage import open_storage
from tests.helpers.synthetic_run import write_synthetic_run


@pytest.mark.parametrize(
    "counts, k, want",
    [
        ({"A": 5, "B": 3000}, 250, {"A": 5, "B": 245}),  # a small type shows every row
        ({"A": 197, "B": 3000}, 250, {"A": 125, "B": 125}),
        ({"A": 10, "B": 10, "C": 1}, 20, {"A": 9, "B": 10, "C": 1}),
        ({"A": 7}, 3, {"A": 3}),
        ({"A": 2, "B": 2, "C": 2}, 5, {"A": 1, "B": 2, "C": 2}),
    ],
)
def test_type_quotas(counts, k, want):
    from collections import Counter

    quotas = type_quotas(Counter(counts), k)
    assert quotas == want and sum(quotas.values()) == k


@pytest.mark.parametrize(
    "n, ok, failed, want",
    [
        (500, 1000, 0, (0, 500)),  # no failures: all ok, spread
        (500, 1000, 120, (120, 380)),  # every failed row, the rest ok
        (500, 1000, 4000, (250, 250)),  # failed capped at half
        (500, 10, 4000, (490, 10)),  # too few ok rows: failed rows fill the rest
        (500, 30, 40, (40, 30)),  # a small run: everything
        (501, 1000, 4000, (250, 251)),
        (1, 5, 5, (0, 1)),
    ],
)
def test_shares(n, ok, failed, want):
    assert shares(n, Counts(ok=ok, failed=failed)) == want


def test_even_ranks_are_distinct_spread_and_start_at_the_first():
    ranks = even_ranks(1_000_000, 250)
    assert len(set(ranks)) == 250 and ranks[0] == 0 and ranks == sorted(ranks)
    assert max(b - a for a, b in zip(ranks, ranks[1:], strict=False)) == 4000
    assert even_ranks(3, 10) == [0, 1, 2] and even_ranks(0, 5) == [] and even_ranks(5, 0) == []


def _positions_in_html(html: str) -> list[int]:
    return [int(p) for p in re.findall(r'<article class="card [a-z]+"[^>]* data-pos="(\d+)"', html)]


def _max_gap(ranks: list[int]) -> int:
    return max(b - a for a, b in zip(ranks, ranks[1:], strict=False))


def test_generated_run_sample_follows_the_rule(tmp_path):
    # 200k rows: every 997th failed, plus a 3000-row shard that never finished: 3,197 failed > 250.
    run = write_synthetic_run(
        tmp_path, 200_000, fail_every=997, lost_shard=(120_000, 3000), distinct_images=4, image_px=32
    )
    failed = set(run.failed_positions)
    ok_positions_rank = {}  # position -> rank among ok rows, computed here independently
    result = write_report(open_storage(str(run.root)), rows_wanted=500)
    html = (run.root / "report.html").read_text()
    positions = _positions_in_html(html)
    assert result.shown == 500 and len(positions) == 500 and positions == sorted(set(positions))
    chosen_failed = [p for p in positions if p in failed]
    chosen_ok = [p for p in positions if p not in failed]
    assert len(chosen_failed) == 250 and len(chosen_ok) == 250
    # 197 RateLimited and 3,000 NotProcessed rows: the failed half is shared between the two types, each
    # spread evenly over its own rows.
    by_type = {
        "RateLimited": [p for p in sorted(failed) if not 120_000 <= p < 123_000],
        "NotProcessed": list(range(120_000, 123_000)),
    }
    assert len(by_type["RateLimited"]) == 197
    for rows_of_type in by_type.values():
        rank = {p: i for i, p in enumerate(rows_of_type)}
        ranks = [rank[p] for p in chosen_failed if p in rank]
        assert len(ranks) == 125
        assert ranks[0] == 0 and _max_gap(ranks) <= math.ceil(len(rows_of_type) / 125)
    ok_total = run.ok
    for pos in range(run.rows):
        if pos not in failed:
            ok_positions_rank[pos] = len(ok_positions_rank)
    ok_ranks = [ok_positions_rank[p] for p in chosen_ok]
    assert ok_ranks[0] == 0 and _max_gap(ok_ranks) <= math.ceil(ok_total / 250)
    assert ok_ranks[-1] >= ok_total - math.ceil(ok_total / 250)  # reaches the end of the input
    # The header counts the whole run, not the sample.
    assert ">200,000</b><span>rows" in html and ">3,000</b><span>not processed" in html
    assert len(failed) == 3197
    assert "Showing 500 of 200,000 rows: 250 of the 3,197 failed rows first (shared" in html


def test_few_failures_are_all_shown(tmp_path):
    run = write_synthetic_run(tmp_path, 50_000, fail_every=500, distinct_images=2, image_px=16)
    assert len(run.failed_positions) == 100
    write_report(open_storage(str(run.root)), rows_wanted=300)
    positions = _positions_in_html((run.root / "report.html").read_text())
    assert len(positions) == 300 and set(run.failed_positions) <= set(positions)


def test_counts_from_the_file_when_there_is_no_summary(tmp_path):
    run = write_synthetic_run(tmp_path, 5_000, fail_every=10, distinct_images=2, image_px=16)
    (run.root / "summary.json").unlink()
    result = write_report(open_storage(str(run.root)), rows_wanted=100)
    assert (result.rows, result.shown, result.shown_failed) == (5_000, 100, 50)


def test_sample_rows_streams_and_keeps_only_the_sample():
    import json

    def lines():
        for pos in range(100_000):
            row = {"p": pos} if pos % 7 else {"p": pos, "error": {"type": "T", "message": "m"}}
            yield json.dumps(row).encode()

    ok, failed = 100_000 - len(range(0, 100_000, 7)), len(range(0, 100_000, 7))
    sample = sample_rows(lines(), 40, Counts(ok=ok, failed=failed))
    assert len(sample.rows) == 40 and sample.seen.rows == 100_000 and sample.error_types == {"T": failed}
    assert [pos for pos, row in sample.rows] == [row["p"] for _, row in sample.rows]


def test_cost_and_usage_are_shown_when_the_run_recorded_them(tmp_path):
    import json

    run = write_synthetic_run(tmp_path, 100, fail_every=0, distinct_images=1, image_px=16)
    summary = json.loads((run.root / "summary.json").read_text())
    summary["usage"] = {"requests": 100, "input_tokens": 12_345, "output_tokens": 678, "images": 100}
    summary["cost_usd"] = 0.0123
    (run.root / "summary.json").write_text(json.dumps(summary))
    write_report(open_storage(str(run.root)))
    html = (run.root / "report.html").read_text()
    panel = html[html.index('id="cost"') : html.index('id="errors"')]
    # Money in dollars, usage with names a reader knows (not the raw keys).
    assert "<dt>spent</dt><dd>$0.0123</dd>" in panel
    assert "<dt>input tokens</dt><dd>12,345</dd>" in panel and "<dt>images</dt><dd>100</dd>" in panel
    assert "not recorded" not in panel and "input_tokens" not in panel
    (run.root / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k not in ("usage", "cost_usd")})
    )
    write_report(open_storage(str(run.root)))
    assert "not recorded by this run" in (run.root / "report.html").read_text()
