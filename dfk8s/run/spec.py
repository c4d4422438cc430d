"""The frozen run spec (``run.json``): everything a worker needs, and never a secret."""

from __future__ import annotations

import dataclasses
import platform
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from dfk8s.errors import NotFound, SpecError
from dfk8s.run.layout import RUN_SPEC_KEY

#: Option names that must never be written into run.json, even if a caller passes them.
SECRET_OPTION_NAMES = frozenset({"api_key", "aws_secret_access_key", "aws_access_key_id", "hf_token",
                                 "token", "password"})
SPEC_VERSION = 1
#: Finished rows per checkpoint part (``--save-interval``).
DEFAULT_SAVE_INTERVAL = 100

#: Flag names (click parameter names) that become options in run.json (``RunSpec.options``).
SERVING_OPTION_NAMES = ("model", "api_url", "system_prompt", "temperature", "max_tokens", "max_concurrency",
                        "rpm", "timeout", "max_retries", "steps", "guidance", "height", "width",
                        "batch_size", "images_per_prompt", "dtype", "cpu_offload", "size", "quality",
                        "aspect_ratio", "image_size", "response_format", "mask", "max_area",
                        "auto_resize", "max_sequence_length", "max_image_side", "api_mode",
                        "batch_poll_seconds", "prompt", "image_timeout", "allow_private_image_hosts",
                        "allowed_image_networks", "image_fetch", "client", "max_model_len",
                        "gpu_memory_utilization", "engine_args", "engine_timeout", "engine_hang_seconds",
                        "compile", "step_cache", "fp8")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex (``20261121-231500-3f9a2c``)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass
class RunSpec:
    """What a run is: written once by the planner, read by every worker and the reducer.

    Attributes:
        run_id: The run's id, also its folder name under ``--output``.
        pipeline: Pipeline name (``caption``, ``vqa``, ``text2image``, ``imageedit``).
        serving: Serving name (``openai-chat``, ``openai-images``, ``gemini-images``, ``diffusers``).
        options: Serving and pipeline parameters (model, api_url, concurrency, steps, ...); no secrets.
        input_key / image_key / output_key / id_key: Row keys; None means the pipeline's default.
        shards: Number of shards; rows: number of rows; rows_per_shard: planned shard size.
        parallelism: Workers expected to run at once (the ``--rpm`` budget is split between them).
        save_interval: Finished rows per checkpoint part.
        seed: Run seed; each row's seed derives from it and the row id (and ``sample`` is drawn with it).
        limit: Only the manifest's first ``limit`` rows were planned (``--limit``).
        sample: A uniform random sample of this many rows was planned (``--sample``).
        history: What happened to the run since it was planned (sessions, their seconds, retries and
            the options they changed).
        input_run: When ``--input`` was a finished run: its location, pipeline and keys (the stage
            before this one). Its rows' conversation was that stage's instruction, not this one's.
    """

    run_id: str
    pipeline: str
    serving: str
    options: dict[str, Any] = field(default_factory=dict)
    input: str = ""
    input_digest: str = ""
    input_bytes: int = 0
    input_key: str | None = None
    image_key: str | None = None
    output_key: str | None = None
    id_key: str | None = None
    shards: int = 0
    rows: int = 0
    rows_per_shard: int = 0
    parallelism: int = 1
    save_interval: int = DEFAULT_SAVE_INTERVAL
    seed: int = 0
    limit: int | None = None
    sample: int | None = None
    created_at: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION
    #: Launcher sessions and retries, oldest first: ``{"action", "at", "seconds", "changes", ...}``.
    history: list[dict[str, Any]] = field(default_factory=list)
    input_run: dict[str, Any] | None = None

    def __post_init__(self):
        leaked = SECRET_OPTION_NAMES.intersection(self.options)
        if leaked:
            raise SpecError(f"secrets do not belong in the run spec: {sorted(leaked)}")
        if not self.versions:
            from dfk8s import __version__

            self.versions = {"dfk8s": __version__, "python": platform.python_version()}

    def option(self, name: str, default: Any = None) -> Any:
        """Return an option: the run's, else the serving's registered default, else ``default``.

        The registered defaults (:class:`dfk8s.servings.ServingInfo`) are the one place a default lives:
        a new run's options hold them already, and a run planned before a default existed gets it here.
        """
        value = self.options.get(name)
        if value is None:
            from dfk8s.servings import SERVINGS

            info = SERVINGS.get(self.serving)
            value = info.defaults_for(self.pipeline).get(name) if info is not None else None
        return default if value is None else value

    @property
    def own_text(self) -> bool:
        """Whether the rows' own conversation is this run's instruction (not a previous stage's)."""
        return self.input_run is None or self.input_key is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to run.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """Parse run.json, ignoring unknown fields from newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise SpecError(f"bad run.json: {exc}") from None

    def save(self, storage) -> None:
        """Write run.json."""
        storage.write_json(RUN_SPEC_KEY, self.to_dict())

    @classmethod
    def load(cls, storage) -> RunSpec:
        """Read run.json from a run's storage.

        Raises:
            SpecError: run.json is missing or unreadable.
        """
        try:
            data = storage.read_json(RUN_SPEC_KEY)
        except NotFound:
            raise SpecError(f"no run spec at {storage.url(RUN_SPEC_KEY)}") from None
        except ValueError as exc:
            raise SpecError(f"run spec {storage.url(RUN_SPEC_KEY)} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
