"""Row checks of the plan: each row normalised and checked once, its problems named with their line."""

from __future__ import annotations

from dataclasses import dataclass, field

from dfk8s.inputs import rows
from dfk8s.inputs.images import (
    DEFAULT_MAX_BYTES,
    ImageProblem,
    check_image,
    decode_data_uri,
    is_data_uri,
    is_http_url,
    read_ref_bytes,
    resolve_ref,
    sha256_hex,
    short_ref,
    url_host,
)
from dfk8s.inputs.manifest import ManifestItem
from dfk8s.pipelines import Pipeline
from dfk8s.run import layout


class SeenIds:
    """The row ids seen so far, to flag duplicates, in flat memory however many rows there are.

    The first ``in_memory`` ids live in a set; past that they move to a private temporary SQLite
    database on disk (deleted when closed), so a plan of 100 million ids does not hold them all in RAM.
    """

    def __init__(self, in_memory: int = 50_000):
        self.in_memory = in_memory
        self.ids: set[str] | None = set()
        self.db = None

    def seen(self, row_id: str) -> bool:
        """Record ``row_id``; return whether it was seen before."""
        if self.ids is not None:
            if row_id in self.ids:
                return True
            self.ids.add(row_id)
            if len(self.ids) > self.in_memory:
                self._spill()
            return False
        cursor = self.db.execute("INSERT OR IGNORE INTO ids VALUES (?)", (row_id,))
        return cursor.rowcount == 0

    def _spill(self) -> None:
        import sqlite3

        self.db = sqlite3.connect("")  # "": a private temporary database on disk, removed on close
        self.db.execute("PRAGMA cache_size = -4000")  # 4 MB of pages in memory, the rest on disk
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY) WITHOUT ROWID")
        self.db.executemany("INSERT INTO ids VALUES (?)", ((i,) for i in self.ids))
        self.ids = None

    def close(self) -> None:
        """Drop what was recorded (and the temporary database)."""
        if self.db is not None:
            self.db.close()
            self.db = None
        self.ids = set()


@dataclass
class Problem:
    """One problem found in a manifest row, with where it is."""

    where: str
    message: str
    type: str = "BadRow"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ProblemGroups:
    """Identical problems of many rows, told once: ``150 rows: missing key 'images' (lines 1-150)``."""

    def __init__(self):
        self._groups: dict[str, list[str]] = {}

    def add(self, problem: Problem) -> None:
        """Count ``problem`` with the others of the same message."""
        self._groups.setdefault(problem.message, []).append(problem.where)

    def __len__(self) -> int:
        return sum(len(wheres) for wheres in self._groups.values())

    def lines(self) -> list[str]:
        """One line a message, in the order the messages first appear (a manifest reads top down)."""
        out = []
        for message, wheres in self._groups.items():
            if len(wheres) == 1:
                out.append(f"{wheres[0]}: {message}")
            else:
                out.append(f"{len(wheres):,} rows: {message} ({_ranges(wheres)})")
        return out

    def most_common(self) -> tuple[str, int]:
        """The message most rows have, and how many."""
        message, wheres = max(self._groups.items(), key=lambda item: len(item[1]))
        return message, len(wheres)


def _ranges(wheres: list[str], most: int = 8) -> str:
    """``lines 1-150, 152`` from ``["line 1", ..., "line 150", "line 152"]`` (places of other kinds as is)."""
    runs: list[list] = []  # [kind, first, last]
    for where in wheres:
        kind, _, number = where.rpartition(" ")
        if number.isdigit() and runs and runs[-1][0] == kind and runs[-1][2] + 1 == int(number):
            runs[-1][2] = int(number)
        elif number.isdigit():
            runs.append([kind, int(number), int(number)])
        else:
            runs.append([where, None, None])
    parts = []
    for kind, first, last in runs[:most]:
        if first is None:
            parts.append(kind)
        else:
            parts.append(f"{kind}s {first}-{last}" if last > first else f"{kind} {first}")
    return ", ".join(parts) + (f", and {len(runs) - most} more places" if len(runs) > most else "")


@dataclass
class RowChecker:
    """Checks rows against a pipeline, resolving and checking their images once per distinct file.

    Attributes:
        stage_to: When set, local images are uploaded into this run storage (content-addressed) and
            rows refer to them as ``run:staged/<sha>.<ext>``; otherwise rows carry absolute paths.
        blob_store: The run's storage: inline images (a Parquet binary column, ``data:`` URIs) are always
            staged there, since a worker cannot read them from anywhere else. None when only checking.
        options: The run's options: ``prompt`` (the user turn of rows without a conversation),
            ``allow_private_image_hosts`` and ``allowed_image_networks`` (the URL guard).
        check_remote_images: Also read and check ``s3://`` images (validate). http(s) images are never
            fetched at plan time (a million rows would be a million requests): only their syntax,
            scheme and literal IP addresses are checked.
    """

    pipeline: Pipeline
    input_key: str | None = None
    image_key: str | None = None
    id_key: str | None = None
    image_root: str | None = None
    stage_to: object | None = None
    endpoint_url: str | None = None
    check_remote_images: bool = False
    blob_store: object | None = None
    options: dict = field(default_factory=dict)
    #: False when the rows come from a finished run: their conversation was the previous stage's.
    own_text: bool = True
    _image_cache: dict = field(default_factory=dict)
    _seen_ids: SeenIds = field(default_factory=lambda: SeenIds())
    _staged: set = field(default_factory=set)
    #: Width and height of each image of the row last checked (None: not opened), for the cost estimate,
    #: and their file sizes (0: not opened), for batch-mode shard limits.
    last_sizes: list = field(default_factory=list)
    last_turns: list | None = None  # the conversation check() read (the cost tally reuses it)
    last_bytes: list = field(default_factory=list)
    _sizes: dict = field(default_factory=dict)

    def __post_init__(self):
        from dfk8s.inputs.fetch import AddressGuard

        self.prompt = self.options.get("prompt")
        self.provider_fetch = self.options.get("image_fetch") == "provider"
        self.guard = AddressGuard.from_options(self.options)

    def check(self, item: ManifestItem) -> tuple[dict, list[Problem]]:
        """Return the shard row for a manifest item and the problems found (empty if the row is good)."""
        self.last_turns = None
        if item.row is None:
            shard_row = {"id": str(item.pos), "pos": item.pos, "row": {}, "images": [],
                         "error": {"type": "BadRow", "message": f"{item.where}: {item.error}",
                                   "raw": item.raw}}
            return shard_row, [Problem(item.where, item.error or "bad row")]
        row = item.row
        problems: list[Problem] = []
        try:
            rid = rows.row_id(row, item.pos, self.id_key)
        except rows.RowProblem as exc:
            rid = str(item.pos)
            problems.append(Problem(item.where, str(exc)))
        else:
            if self.id_key:
                if self._seen_ids.seen(rid):
                    problems.append(Problem(item.where, f"duplicate id {rid!r} (key {self.id_key!r})"))
        resolved: list[str] = []
        self.last_sizes, self.last_bytes, self.last_turns = [], [], None
        try:
            self.last_turns = self.pipeline.check_row(row, self.input_key, self.prompt,
                                                      own_text=self.own_text)
            refs = self.pipeline.image_refs(row, self.image_key)
        except rows.RowProblem as exc:
            problems.append(Problem(item.where, str(exc)))
            refs = []
        inline: dict[int, str] = {}
        for ref in refs:
            try:
                resolved.append(self._image(ref))
                found = self._sizes.get(resolved[-1])
                self.last_sizes.append(found[:2] if found else None)
                self.last_bytes.append(found[2] if found else 0)
            except ImageProblem as exc:
                # A plain bad image is a BadRow as ever; a refused URL says BlockedAddress.
                kind = "BadRow" if exc.type == "BadImage" else exc.type
                problems.append(Problem(item.where, str(exc), kind))
                continue
            if isinstance(ref, bytes):
                inline[id(ref)] = self._inline_url(resolved[-1])
        if item.binary:
            row = self._json_row(row, inline)
        error = None
        if problems:
            error = {"type": problems[0].type if len({p.type for p in problems}) == 1 else "BadRow",
                     "message": "; ".join(str(p) for p in problems)}
        return {"id": rid, "pos": item.pos, "row": row, "images": resolved, "error": error}, problems

    def close(self) -> None:
        """Release what the checker keeps (the ids seen)."""
        self._seen_ids.close()

    def _inline_url(self, resolved: str) -> str:
        """Where an image that came as bytes is now, for the output row."""
        if self.blob_store is not None and resolved.startswith(layout.RUN_REF_SCHEME):
            return self.blob_store.url(resolved[len(layout.RUN_REF_SCHEME):])
        return resolved

    def _json_row(self, row: dict, inline: dict[int, str]) -> dict:
        """A row with bytes: image bytes become their staged image's URL, other bytes base64 text."""
        from dfk8s.inputs.parquet import json_safe

        def swap(value):
            if isinstance(value, bytes) and id(value) in inline:
                return inline[id(value)]
            if isinstance(value, dict):
                if isinstance(value.get("bytes"), bytes) and id(value["bytes"]) in inline:
                    return {**value, "bytes": None, "path": value.get("path") or inline[id(value["bytes"])]}
                return {k: swap(v) for k, v in value.items()}
            if isinstance(value, list):
                return [swap(v) for v in value]
            return value

        return json_safe(swap(row))

    def _image(self, ref: str | bytes) -> str:
        if isinstance(ref, bytes) or is_data_uri(ref):
            return self._inline_image(ref)
        if is_http_url(ref):
            return self._url(ref)
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
                    path = layout.RUN_REF_SCHEME + self._stage(self.stage_to, data, checked.extension)
        except ImageProblem as exc:
            # Say what the manifest said, and where we looked, in one line.
            problem = ImageProblem(str(exc).replace(f"image {path}", f"image {ref!r} ({path})", 1)
                                   if ref != path else str(exc), exc.type, exc.details)
            self._remember(path, problem)
            raise problem from None
        self._remember(path, path)
        if size is not None:
            self._sizes[path] = size
        return path

    def _remember(self, key: str, value) -> None:
        if len(self._image_cache) > 100_000:  # bound memory on manifests with millions of distinct images
            self._image_cache.clear()
            self._sizes.clear()
        self._image_cache[key] = value

    def _stage(self, storage, data: bytes, extension: str) -> str:
        key = layout.staged_key(sha256_hex(data), extension)
        if key not in self._staged:
            if not storage.exists(key):
                storage.write_bytes(key, data)
            if len(self._staged) > 100_000:
                self._staged.clear()
            self._staged.add(key)
        return key

    def _inline_image(self, ref: str | bytes) -> str:
        """Bytes or a data: URI: checked now, then staged in the run (workers have nowhere else to read)."""
        label = short_ref(ref)
        if isinstance(ref, bytes):
            if len(ref) > DEFAULT_MAX_BYTES:
                raise ImageProblem(f"image {label} is over the {DEFAULT_MAX_BYTES} byte limit")
            data = ref
        else:
            data = decode_data_uri(ref)
        checked = check_image(data, label)
        if self.blob_store is None:
            return label
        return layout.RUN_REF_SCHEME + self._stage(self.blob_store, data, checked.extension)

    def _url(self, ref: str) -> str:
        """An http(s) image: syntax, scheme and literal addresses only; the worker fetches it."""
        host = url_host(ref)
        if not self.provider_fetch:  # else the provider's network fetches it
            self.guard.check_literal(host, ref)
        return ref
