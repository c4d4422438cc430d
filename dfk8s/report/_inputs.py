"""Find the resolved input image references of the sampled rows in the run's input shards.

result.jsonl keeps each row as the user wrote it (relative image paths); the shard rows carry the refs the
planner resolved (absolute paths, ``s3://`` URIs, ``run:staged/...``). Shard ``k`` holds positions
``k * rows_per_shard`` onwards, so only the shards with a sampled row are read, each up to its last
sampled row.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from dfk8s.errors import NotFound, StorageError
from dfk8s.run import layout

log = logging.getLogger(__name__)


def input_refs(
    storage, rows_per_shard: int, positions: list[int], *, threads: int = 8
) -> dict[int, list[str]]:
    """Map each position in ``positions`` to its resolved input image refs (missing shards are skipped)."""
    if rows_per_shard <= 0 or not positions:
        return {}
    by_shard: dict[int, set[int]] = defaultdict(set)
    for pos in positions:
        by_shard[pos // rows_per_shard].add(pos % rows_per_shard)

    def read_shard(item) -> dict[int, list[str]]:
        shard, offsets = item
        found: dict[int, list[str]] = {}
        last = max(offsets)
        try:
            lines = storage.open_lines(layout.shard_input_key(shard))
            try:
                for offset, line in enumerate(lines):
                    if offset in offsets:
                        record = json.loads(line)
                        pos = record.get("pos", shard * rows_per_shard + offset)
                        found[pos] = [
                            ref for ref in record.get("images") or () if isinstance(ref, str) and ref
                        ]
                    if offset >= last:
                        break
            finally:
                lines.close()
        except (NotFound, StorageError, ValueError) as exc:
            log.warning("input shard %d unreadable (%s): its rows show no input images", shard, exc)
        return found

    refs: dict[int, list[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(by_shard)))) as pool:
        for found in pool.map(read_shard, sorted(by_shard.items())):
            refs.update(found)
    return refs
