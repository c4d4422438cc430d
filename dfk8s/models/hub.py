"""Diffusers models in a Hugging Face cache: pull one once (only the files the pipeline loads), list a cache.

``dfk8s model pull`` runs :func:`pull_model` on this machine (``--to DIR``) or inside a Job that has the
shared cache PVC mounted (``--pvc``, see :mod:`dfk8s.kube.model_jobs`); the same code either way. The cache is
huggingface_hub's own layout (``DIR/hub/models--org--name/...``), so workers load the model by its Hub
name with ``HF_HOME=DIR`` and ``HF_HUB_OFFLINE=1``, exactly as the diffusers serving already does.

What is fetched: ``model_index.json``, and for each component it names (``transformer``, ``vae``,
``text_encoder``, ``tokenizer``, ``scheduler``, ...) its config and tokenizer files and its weights in
one format, the one diffusers picks: safetensors when the component has them (never also ``.bin``),
else ``.bin``; no fp16/bf16 variants, no ``.pth``/``.ckpt``/ONNX/Flax copies, and nothing at the top level
but the pipeline's own config files (FLUX.1-dev's 24 GB single-file ``flux1-dev.safetensors`` and its
``ae.safetensors`` are left out: the pipeline never reads them).

Resuming: files already in the cache are not fetched again, and a file a killed pull left half-written
goes on from its bytes on disk (``blobs/<etag>.dfk8s-partial``, fetched through huggingface_hub's
public client with a Range request; huggingface_hub 2.x alone would start such a file over). A dropped
connection resumes the same way within one pull. Files are written in 1 MiB chunks, so up to that much of
a file is fetched again after a kill.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dfk8s.errors import Dfk8sError, SpecError

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODEL_BYTES",
    "CachedModel",
    "PullResult",
    "format_bytes",
    "is_gated",
    "list_cache",
    "local_run_warnings",
    "pull_model",
    "select_pipeline_files",
]

#: Download size of the files :func:`select_pipeline_files` picks, for warnings before any download.
#: FLUX.1 [dev], [schnell] and Kontext [dev]: a 12B transformer (23.8 GB bf16), T5-XXL (9.5 GB), CLIP-L
#: and the VAE (0.4 GB) come to ~34 GB; the repos themselves hold ~58 GB with the single-file copies.
KNOWN_MODEL_BYTES: dict[str, int] = {
    "black-forest-labs/FLUX.1-dev": 34 * 10**9,
    "black-forest-labs/FLUX.1-schnell": 34 * 10**9,
    "black-forest-labs/FLUX.1-Kontext-dev": 34 * 10**9,
}

#: Hub organisations whose models are gated (a licence to accept, then a token to download).
GATED_ORGS = ("black-forest-labs/",)

#: Where :func:`pull_model` records a finished pull inside a cache (``HF_HOME``), beside ``hub/``.
MARKER_DIR = "dfk8s-pulled"

# diffusers loads weights by these names only (diffusers.pipelines.pipeline_loading_utils):
# `diffusion_pytorch_model[-00001-of-00003].safetensors`, `model.safetensors`, `pytorch_model.bin`, and
# their `.index.json`. Anything else in a component folder (variants, fp8 copies) it never reads.
_WEIGHT_NAME_RE = re.compile(
    r"^(?P<prefix>diffusion_pytorch_model|pytorch_model|model)(-\d{5}-of-\d{5})?\.(?P<fmt>safetensors|bin)$"
)
_WEIGHT_INDEX_RE = re.compile(
    r"^(diffusion_pytorch_model|pytorch_model|model)\.(?P<fmt>safetensors|bin)\.index\.json$"
)
_WEIGHT_EXTENSIONS = (
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".msgpack",
    ".h5",
    ".onnx",
    ".onnx_data",
    ".pb",
    ".gguf",
    ".ot",
    ".pkl",
    ".npz",
)
# Top-level files diffusers reads when a repo has them (pipeline_utils.download's allow patterns).
_TOP_LEVEL_FILES = (
    "model_index.json",
    "scheduler_config.json",
    "config.json",
    "pipeline.py",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
_FORMAT_PREFERENCE = ("safetensors", "bin")
_STALE_PARTIAL_SECONDS = 600


def is_gated(model: str) -> bool:
    """Tell whether ``model`` is a Hub name of a gated organisation (``black-forest-labs/...``)."""
    return model.startswith(GATED_ORGS)


def is_hub_name(model: str) -> bool:
    """Tell whether ``model`` names a Hub repo (``org/name``) rather than a local folder."""
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model))
        and not os.path.isdir(model)
        and not model.startswith((".", "/", "~"))
    )


def format_bytes(count: int | float) -> str:
    """``34000000000`` -> ``'34 GB'`` (decimal units, as the Hub shows sizes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{int(count)} B"


def _is_weight(name: str) -> bool:
    return (
        name.endswith(_WEIGHT_EXTENSIONS)
        or name.endswith(".index.json")
        and ".safetensors." in name
        or name.endswith(".index.json")
        and ".bin." in name
    )


def _standard_weight_format(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    match = _WEIGHT_NAME_RE.match(name) or _WEIGHT_INDEX_RE.match(name)
    return match["fmt"] if match else None


def select_pipeline_files(model_index: dict[str, Any], files: list[str]) -> list[str]:
    """Pick the files a diffusers pipeline loads from a repo listing (see the module docstring).

    Args:
        model_index: The repo's parsed ``model_index.json``.
        files: Every file path in the repo at the revision.

    Returns:
        The paths to fetch, sorted.

    Raises:
        SpecError: A component folder holds weights but none that diffusers loads without a variant.

    """
    # Every list-valued key is a component folder, even an unset one (`"image_encoder": [null, null]`):
    # diffusers' own offline check expects the files of every such folder the repo has.
    components = {name for name, value in model_index.items() if isinstance(value, (list, tuple))}
    by_folder: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.partition("/")
        if name and folder in components:
            by_folder.setdefault(folder, []).append(path)
    selected = [path for path in files if "/" not in path and path in _TOP_LEVEL_FILES]
    for folder, paths in sorted(by_folder.items()):
        weights = [p for p in paths if _is_weight(p.rsplit("/", 1)[1])]
        selected += [p for p in paths if p not in weights]
        if not weights:
            continue  # scheduler, tokenizers: configs only
        for fmt in _FORMAT_PREFERENCE:
            # Only weights directly in the component folder, by the names diffusers loads.
            chosen = [p for p in weights if p.count("/") == 1 and _standard_weight_format(p) == fmt]
            if any(not p.endswith(".index.json") for p in chosen):
                selected += chosen
                break
        else:
            names = ", ".join(sorted(w.rsplit("/", 1)[1] for w in weights)[:4])
            raise SpecError(
                f"component {folder} has weights ({names}) "
                "but none diffusers loads (diffusion_pytorch_model / model .safetensors or .bin)"
            )
    return sorted(selected)


# What vLLM and `transformers serve` load of a transformers model (a VLM): config, processor, tokenizer and
# chat template files at the top level, and the weights in one format.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)


def select_model_files(files: list[str]) -> list[str]:
    """Pick the files an engine loads from a transformers model repo (a VLM) listing.

    The top-level config, generation config, processor, tokenizer and chat template files, and the weights
    in one format: ``model[-0000k-of-0000n].safetensors`` (and its index) when there are any, else the
    ``.bin`` ones. No ``original/`` copies, GGUF, ONNX or sub-folder checkpoints.

    Raises:
        SpecError: The repo has weights but none by the names transformers loads.
    """
    top = [path for path in files if "/" not in path]
    selected = [path for path in top if path in _MODEL_FILES]
    for fmt in _FORMAT_PREFERENCE:
        chosen = [path for path in top if _standard_weight_format(path) == fmt]
        if any(not path.endswith(".index.json") for path in chosen):
            return sorted(selected + chosen)
    weights = [path for path in files if _is_weight(path.rsplit("/", 1)[-1])]
    names = ", ".join(sorted(weights)[:4]) or "none"
    raise SpecError("no weights transformers loads (model .safetensors or .bin) at the top level; "
                    f"found: {names}")


@dataclass
class PullResult:
    """What :func:`pull_model` did.

    Attributes:
        model: The Hub name.
        revision: The revision asked for (``main`` by default).
        commit: The commit it resolved to.
        snapshot: The snapshot folder (a local folder ``--model`` can name).
        files: Selected file -> size in bytes.
        skipped: Files of the repo left out -> size in bytes.
        fetched_bytes: Bytes not in the cache before this pull.

    """

    model: str
    revision: str
    commit: str
    snapshot: str
    files: dict[str, int]
    skipped: dict[str, int]
    fetched_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Total size of the selected files."""
        return sum(self.files.values())


def hub_cache(hf_home: str | os.PathLike) -> Path:
    """The hub cache inside a Hugging Face home folder (``HF_HOME/hub``)."""
    return Path(hf_home) / "hub"


def pull_model(
    model: str, hf_home: str | os.PathLike, *, revision: str | None = None, progress_seconds: float = 30.0
) -> PullResult:
    """Download the files ``model``'s diffusers pipeline loads into the cache ``hf_home``, resuming.

    The token is huggingface_hub's own (``$HF_TOKEN``); it is never logged or stored.

    Args:
        model: Hub name, e.g. ``black-forest-labs/FLUX.1-dev``.
        hf_home: Cache folder used as ``HF_HOME`` (the files go to ``hf_home/hub``).
        revision: Branch, tag or commit; default ``main``.
        progress_seconds: How often to log the bytes on disk so far (pod logs have no progress bar).

    Returns:
        The :class:`PullResult`.

    Raises:
        SpecError: Not a Hub name, offline mode, unknown repo or revision, a gated repo without access,
            or not a diffusers pipeline (retrying cannot help: exit 42).
        Dfk8sError: The Hub could not be reached or failed (exit 1: a Job retries and resumes).

    """
    try:
        from huggingface_hub import HfApi, hf_hub_download, is_offline_mode, snapshot_download
    except ImportError:
        raise SpecError(
            "dfk8s model pull needs the Hugging Face Hub client: pip install 'dfk8s[models]'"
        ) from None

    if not is_hub_name(model):
        raise SpecError(f"{model!r} is not a Hub model name (org/name): a local folder needs no pull")
    if is_offline_mode():
        raise SpecError("model pull downloads from the Hub, but HF_HUB_OFFLINE is set: unset it here")
    revision = revision or "main"
    cache = hub_cache(hf_home)
    cache.mkdir(parents=True, exist_ok=True)
    # huggingface_hub reads $HF_ENDPOINT (a mirror) once, at its import; a caller may set it later.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint)
    repo_dir = cache / ("models--" + model.replace("/", "--"))
    with _hub_errors(model, revision):
        # One call gives the commit and every file with its size (siblings with blobs metadata).
        info = api.model_info(model, revision=revision, files_metadata=True)
        commit = info.sha
        listing = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or ()}
        snapshot = repo_dir / "snapshots" / commit
        present = {path for path in listing if (snapshot / path).is_file()}
        if "model_index.json" in listing:  # a diffusers pipeline
            index_path = hf_hub_download(model, "model_index.json", revision=commit, cache_dir=cache,
                                         endpoint=endpoint)
        elif "config.json" not in listing:
            raise SpecError(f"{model} has neither model_index.json (a diffusers pipeline) nor config.json (a "
                            f"transformers model, e.g. a VLM) at {revision}")
    if "model_index.json" in listing:
        model_index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        selected = select_pipeline_files(model_index, sorted(listing))
    else:
        selected = select_model_files(sorted(listing))
    files = {path: listing[path] for path in selected}
    skipped = {path: size for path, size in listing.items() if path not in files}
    before = sum(listing[p] for p in selected if p in present)
    _remove_stale_partials(repo_dir / "blobs")
    total = sum(files.values())
    log.info(
        "pulling %s@%s (%s): %d files, %s (%s already here); leaving out %d files (%s) the pipeline does not "
        "load%s",
        model,
        revision,
        commit[:12],
        len(files),
        format_bytes(total),
        format_bytes(before),
        len(skipped),
        format_bytes(sum(skipped.values())),
        (": " + ", ".join(sorted(skipped, key=lambda p: -skipped[p])[:3])) if skipped else "",
    )
    stop = threading.Event()
    reporter = threading.Thread(
        target=_report_progress,
        # What is on disk now, model_index.json included: the reporter counts the bytes that come after.
        args=(
            repo_dir / "blobs",
            sum(files[p] for p in files if (snapshot / p).is_file()),
            total,
            stop,
            progress_seconds,
            model,
        ),
        daemon=True,
    )
    reporter.start()
    try:
        with _hub_errors(model, revision):
            absent = [p for p in selected if not (snapshot / p).is_file()]
            _fetch_blobs(model, commit, endpoint, repo_dir, absent)
            # The revision name (not the commit) so huggingface_hub records refs/<revision>: workers that
            # load the model by name offline resolve it through that ref.
            folder = snapshot_download(
                model,
                revision=revision,
                cache_dir=cache,
                endpoint=endpoint,
                allow_patterns=[_literal_pattern(p) for p in selected],
            )
    finally:
        stop.set()
        reporter.join()
    missing = [p for p in selected if not (Path(folder) / p).is_file()]
    if missing:
        raise Dfk8sError(
            f"pull of {model} ended with {len(missing)} files missing ({', '.join(missing[:3])})"
        )
    result = PullResult(
        model=model,
        revision=revision,
        commit=commit,
        snapshot=str(folder),
        files=files,
        skipped=skipped,
        fetched_bytes=total - before,
    )
    _write_marker(Path(hf_home), result)
    return result


def _fetch_blobs(model: str, commit: str, endpoint: str | None, repo_dir: Path, paths: list[str]) -> None:
    """Download missing files into the cache's blobs, resuming a partial file left by a killed pull.

    huggingface_hub 2.x writes each download to a temporary file of its own and never reuses one, so a
    pod killed mid-file would fetch all of it again. Here each file goes to ``blobs/<etag>.dfk8s-partial``
    through huggingface_hub's public client (:func:`~huggingface_hub.get_session`, its headers and file
    metadata) with a Range request from the bytes already there, then is renamed to the blob;
    ``snapshot_download`` afterwards finds every blob and only links the snapshot.
    """
    from concurrent.futures import ThreadPoolExecutor

    from filelock import FileLock  # huggingface_hub's own lock library
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    def fetch(path: str) -> None:
        url = hf_hub_url(model, path, revision=commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url, endpoint=endpoint)
        if not meta.etag:
            return  # snapshot_download will say what is wrong
        blob = blobs / meta.etag
        partial = blobs / f"{meta.etag}.dfk8s-partial"
        lock = blobs / f"{meta.etag}.dfk8s-lock"
        with FileLock(lock):
            if blob.exists():
                return
            _download_resuming(url, meta, partial, path)
            os.replace(partial, blob)
        lock.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, paths))


#: Attempts of one file within a pull: each resumes from the bytes on disk (a dropped connection).
_DOWNLOAD_ATTEMPTS = 5


def _download_resuming(url: str, meta, partial: Path, path: str) -> None:
    """Append the rest of the file at ``meta.location`` to ``partial`` (Range from its size), with retries."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def transient(exc: BaseException) -> bool:  # a dropped connection or a server error, not a 4xx
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429

    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    for attempt in Retrying(stop=stop_after_attempt(_DOWNLOAD_ATTEMPTS), wait=wait_exponential(max=10),
                            retry=retry_if_exception(transient), reraise=True):
        with attempt, open(partial, "ab") as handle:
            resume = handle.tell()
            if meta.size is not None and resume > meta.size:  # not this file's bytes: start over
                handle.truncate(0)
                resume = 0
            if meta.size is not None and resume == meta.size:
                return
            if resume:
                log.info("resuming %s at %s of %s", path, format_bytes(resume), format_bytes(meta.size or 0))
            ranged = {**headers, "Range": f"bytes={resume}-"} if resume else headers
            with get_session().stream("GET", meta.location, headers=ranged,
                                      follow_redirects=True) as response:
                response.raise_for_status()
                if resume and response.status_code != 206:  # the server sent the whole file
                    handle.truncate(0)
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
            if meta.size is not None and handle.tell() != meta.size:
                raise OSError(f"{path}: got {handle.tell()} of {meta.size} bytes")


def _literal_pattern(path: str) -> str:
    # allow_patterns are fnmatch patterns: brackets make the few glob characters a file name may hold literal.
    return re.sub(r"([*?\[])", r"[\1]", path)


def _remove_stale_partials(blobs: Path) -> None:
    # A killed download leaves `<etag>.<random>.incomplete` behind that nobody will reuse; an active one
    # (another pull into the same cache) keeps writing, so only files idle for a while are removed.
    if not blobs.is_dir():
        return
    now = time.time()
    for partial in blobs.glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                partial.unlink()
                log.info("removed %s, left by an interrupted download", partial.name)
        except OSError:
            pass


def _blob_bytes(blobs: Path) -> int:
    total = 0
    for path in blobs.glob("*") if blobs.is_dir() else ():
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def _report_progress(
    blobs: Path, on_disk: int, total: int, stop: threading.Event, every: float, model: str
) -> None:
    baseline = _blob_bytes(blobs) - on_disk
    while not stop.wait(every):
        done = min(total, _blob_bytes(blobs) - baseline)
        log.info("%s: %s of %s on disk", model, format_bytes(done), format_bytes(total))


class _hub_errors:  # noqa: N801 - used as a context manager, like contextlib's
    """Map huggingface_hub errors to dfk8s's: what retrying cannot fix is a SpecError (exit 42)."""

    def __init__(self, model: str, revision: str):
        self.model, self.revision = model, revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, Dfk8sError):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        line = " ".join(str(exc).split("\n")[0].split())[:200]
        if isinstance(exc, GatedRepoError):
            raise SpecError(
                f"{self.model} is gated: accept its licence on the Hub with your account, then pull with a "
                "token (HF_TOKEN here, --hf-token-secret NAME/KEY for --pvc)"
            ) from None
        if isinstance(exc, RevisionNotFoundError):
            raise SpecError(f"{self.model} has no revision {self.revision!r}") from None
        if isinstance(exc, RepositoryNotFoundError):
            raise SpecError(
                f"{self.model}: no such model on the Hub (or it is private and the token cannot read it)"
            ) from None
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, HfHubHTTPError) and status in (401, 403):
            raise SpecError(f"the Hub refused {self.model} ({status}): check the token") from None
        if isinstance(exc, OSError) and "disk" in str(exc).lower() and "space" in str(exc).lower():
            raise SpecError(f"not enough disk space for {self.model}: {line}") from None
        raise Dfk8sError(f"cannot download {self.model} now: {type(exc).__name__}: {line}") from exc


def _marker_path(hf_home: Path, model: str, commit: str) -> Path:
    return hf_home / MARKER_DIR / ("models--" + model.replace("/", "--")) / f"{commit}.json"


def _write_marker(hf_home: Path, result: PullResult) -> None:
    path = _marker_path(hf_home, result.model, result.commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": result.model,
        "revision": result.revision,
        "commit": result.commit,
        "files": result.files,
        "bytes": result.bytes,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(path)


@dataclass
class CachedModel:
    """One model revision in a cache, as ``dfk8s model list`` shows it.

    Attributes:
        model: Hub name.
        commit: Commit hash of the snapshot.
        refs: Branches/tags that point at it (``main``).
        bytes: Size of its files on disk.
        files: Number of files in the snapshot.
        complete: True when a pull finished (its marker is there and every file it listed is present).
        snapshot: The snapshot folder.
        pulled_at: When the pull finished (UTC), if it did.

    """

    model: str
    commit: str
    refs: list[str] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    complete: bool = False
    snapshot: str = ""
    pulled_at: str | None = None


def list_cache(hf_home: str | os.PathLike) -> list[CachedModel]:
    """List the model snapshots in the cache ``hf_home`` (``HF_HOME``), with whether each pull finished.

    Args:
        hf_home: The cache folder (as given to :func:`pull_model`).

    Returns:
        One entry per model revision, sorted by model name; empty when the cache is empty or absent.

    """
    from huggingface_hub import scan_cache_dir

    cache = hub_cache(hf_home)
    if not cache.is_dir():
        return []
    found = []
    for repo in scan_cache_dir(cache).repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            marker = _marker_path(Path(hf_home), repo.repo_id, rev.commit_hash)
            record = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
            complete = record is not None and all((rev.snapshot_path / p).is_file() for p in record["files"])
            found.append(
                CachedModel(
                    model=repo.repo_id,
                    commit=rev.commit_hash,
                    refs=sorted(rev.refs),
                    bytes=rev.size_on_disk,
                    files=len(rev.files),
                    complete=complete,
                    snapshot=str(rev.snapshot_path),
                    pulled_at=record.get("pulled_at") if record else None,
                )
            )
    return sorted(found, key=lambda item: (item.model, item.commit))


def cached_models_to_json(models: list[CachedModel]) -> str:
    """One line of JSON (what the list Job prints for ``dfk8s model list --pvc``)."""
    return json.dumps({"dfk8s_models": [asdict(item) for item in models]})


def cached_models_from_log(text: str) -> list[CachedModel]:
    """Read the models back from the list Job's log (the last line holding the JSON).

    Raises:
        Dfk8sError: No such line in the log.

    """
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith('{"dfk8s_models"'):
            return [CachedModel(**item) for item in json.loads(line)["dfk8s_models"]]
    tail = " | ".join(text.strip().splitlines()[-3:])
    raise Dfk8sError(f"the list pod printed no model list: {tail or 'empty log'}")


def is_cached(model: str) -> bool:
    """Whether Hub model ``model`` is in this machine's Hugging Face cache (False without huggingface_hub).

    A diffusers pipeline has its model_index.json there, a transformers model its config.json.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(model, name), str) for name in ("model_index.json",
                                                                                   "config.json"))


def local_run_warnings(model: str) -> list[str]:
    """One line per reason a ``dfk8s run`` on a GPU serving will fail to get ``model``.

    Checked before planning, so a run that cannot load its model is not planned and started first:
    offline with the model not cached, or a gated model not cached with no token to download it. The
    workers inherit this process's environment, so huggingface_hub's own view of it here (its cache,
    offline mode and token) is theirs.

    Args:
        model: The ``--model`` value (a Hub name or a local folder).

    Returns:
        The warning lines (empty for a local folder or a cached model, or without huggingface_hub).

    """
    if not is_hub_name(model):
        return []
    try:
        from huggingface_hub import constants, get_token, is_offline_mode
    except ImportError:  # the gpu extra brings it; without it the worker says what is missing
        return []
    if is_cached(model):
        return []
    cache = constants.HF_HUB_CACHE
    pull_hint = f"pull it first: dfk8s model pull {model} --to DIR, then HF_HOME=DIR"
    if is_offline_mode():
        return [
            f"HF_HUB_OFFLINE is set and {model} is not in the cache {cache}: every worker will fail; "
            f"{pull_hint}"
        ]
    if is_gated(model) and not get_token():
        return [
            f"{model} is a gated model, not cached here, and no Hugging Face token is set (HF_TOKEN or "
            f"`hf auth login`): its download will fail; accept its licence on the Hub and set HF_TOKEN, or "
            f"{pull_hint}"
        ]
    return []
