"""Load job profiles: the per-pipeline, per-serving Kubernetes defaults under ``jobs/<pipeline>.yaml``.

A profile says what a worker pod of one pipeline asks the cluster for with one serving (image, GPU,
resources, scheduling, volumes) and the serving parameters used when no flag overrides them. The
files are meant to be edited by users, so every shape error names the file and the field.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfk8s.errors import SpecError

__all__ = [
    "JOBS_DIR_ENV",
    "ModelCache",
    "Profile",
    "load_profile",
    "profile_search_path",
]

#: Environment variable naming a folder of profiles searched before the built-in ones.
JOBS_DIR_ENV = "DFK8S_JOBS_DIR"

#: Where the Helm chart's ConfigMap of profiles is mounted in a launcher pod.
SYSTEM_JOBS_DIR = Path("/etc/dfk8s/jobs")

# Pipeline and serving names become file names and label values: keep them to DNS-label characters
# so a name can never escape the jobs folder or make an invalid label.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_TOP_KEYS = {"pipeline", "default_serving", "servings"}
_SERVING_KEYS = {
    "image",
    "gpu",
    "resources",
    "node_selector",
    "tolerations",
    "shm_size",
    "model_cache",
    "defaults",
    "batch_resources",
    "engine",
}
_ENGINE_KEYS = {"image", "resources"}
_RESOURCE_KEYS = {"requests", "limits"}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class EngineProfile:
    """The engine sidecar of a self-hosted serving (``vllm``, ``transformers``): its image and resources.

    Attributes:
        image: the engine's image, with a pinned tag (vLLM's official ``vllm/vllm-openai``).
        resources: the engine container's ``resources``; the GPU limit is here, the worker stays small.
    """

    image: str
    resources: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCache:
    """Where the Hugging Face cache (HF_HOME) of a worker pod lives.

    Exactly one of ``size`` and ``pvc`` is set.

    Attributes:
        size: ``sizeLimit`` of a per-pod emptyDir (e.g. ``"100Gi"``).
        pvc: name of an existing PersistentVolumeClaim shared by the pods, filled once by
            ``dfk8s model pull --pvc``; workers mount it read-only and load offline.
        subpath: folder inside the claim to mount (``subPath``), only with ``pvc``.

    """

    size: str | None = None
    pvc: str | None = None
    subpath: str | None = None


@dataclass(frozen=True)
class Profile:
    """The Kubernetes defaults for one pipeline with one serving.

    Attributes:
        pipeline: pipeline name (``caption``, ``text2image``, ...).
        serving: serving name (``openai-chat``, ``diffusers``, ...).
        image: worker container image, with a pinned tag.
        gpu: whether the worker pod needs a GPU.
        resources: container ``resources`` (``requests`` / ``limits``), values as strings.
        node_selector: node labels the worker pods must match.
        tolerations: taints the worker pods tolerate.
        shm_size: ``sizeLimit`` of the in-memory ``/dev/shm`` volume, or None for none.
        model_cache: the Hugging Face cache volume, or None for none.
        defaults: serving parameters used when no flag overrides them: the serving's registered
            defaults (what ``dfk8s run`` uses), under the file's ``defaults``.
        source: the file the profile was read from.
        batch_resources: container ``resources`` with ``--api-mode batch`` (the pod only uploads a
            file and polls, for hours): empty to keep ``resources``.
        engine: the engine sidecar of a self-hosted serving, or None; it holds the GPUs.

    """

    pipeline: str
    serving: str
    image: str
    gpu: bool
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    shm_size: str | None = None
    model_cache: ModelCache | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)
    batch_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    engine: EngineProfile | None = None

    def for_api_mode(self, api_mode: str | None) -> Profile:
        """This profile for ``api_mode``: batch mode swaps in ``batch_resources`` when it has them."""
        import dataclasses

        if api_mode != "batch" or not self.batch_resources:
            return self
        return dataclasses.replace(self, resources=self.batch_resources)

    @property
    def gpu_count(self) -> int:
        """GPUs per worker pod, read from the ``nvidia.com/gpu`` limit (the engine's, if it has one)."""
        resources = self.engine.resources if self.engine is not None else self.resources
        return int(resources.get("limits", {}).get(GPU_RESOURCE, 0))


def profile_search_path() -> list[Path]:
    """Return the folders searched for ``<pipeline>.yaml``; the first match wins.

    Returns:
        ``$DFK8S_JOBS_DIR`` when set, the ``jobs/`` folder next to the package (a source checkout),
        ``/etc/dfk8s/jobs`` (where the images and the Helm chart's ConfigMap put them), then
        ``<sys.prefix>/share/dfk8s/jobs`` (where a wheel installs them as data files).

    """
    folders: list[Path] = []
    env_dir = os.environ.get(JOBS_DIR_ENV)
    if env_dir:
        folders.append(Path(env_dir))
    folders.append(Path(__file__).resolve().parents[2] / "jobs")
    folders.append(SYSTEM_JOBS_DIR)
    folders.append(Path(sys.prefix) / "share" / "dfk8s" / "jobs")
    return folders


def load_profile(pipeline: str, serving: str | None = None) -> Profile:
    """Load the profile of ``pipeline`` with ``serving`` (its default serving when None).

    Args:
        pipeline: pipeline name; the file read is ``<pipeline>.yaml``.
        serving: serving name, or None for the file's ``default_serving``.

    Returns:
        The validated profile.

    Raises:
        SpecError: no file for the pipeline in any searched folder, the file is malformed, or it has
            no entry for the serving.

    """
    if not isinstance(pipeline, str) or not _NAME_RE.match(pipeline):
        raise SpecError(f"invalid pipeline name {pipeline!r}: use lowercase letters, digits and '-'")
    folders = profile_search_path()
    candidates = (folder / f"{pipeline}.yaml" for folder in folders)
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        searched = ", ".join(str(folder) for folder in folders)
        raise SpecError(
            f"no job profile for pipeline {pipeline!r}: {pipeline}.yaml not found in {searched} "
            f"(set {JOBS_DIR_ENV} to a folder holding it)"
        )
    document = _read_yaml(path)
    return _profile_from_document(document, pipeline, serving, path)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from exc


def _profile_from_document(document: Any, pipeline: str, serving: str | None, path: Path) -> Profile:
    where = str(path)
    _require_mapping(document, where, "the file")
    _reject_unknown(document, _TOP_KEYS, where, "the file")
    if document.get("pipeline") != pipeline:
        raise SpecError(f"{where}: `pipeline` is {document.get('pipeline')!r}, expected {pipeline!r}")
    servings = document.get("servings")
    _require_mapping(servings, where, "servings")
    if not servings:
        raise SpecError(f"{where}: `servings` is empty")
    default_serving = document.get("default_serving")
    if default_serving not in servings:
        raise SpecError(
            f"{where}: `default_serving` {default_serving!r} is not one of the servings: "
            f"{', '.join(sorted(servings))}"
        )
    chosen = serving or default_serving
    if chosen not in servings:
        raise SpecError(
            f"{where}: pipeline {pipeline!r} has no profile for serving {chosen!r}; "
            f"available: {', '.join(sorted(servings))}"
        )
    return _serving_profile(servings[chosen], pipeline, chosen, path)


def _serving_profile(entry: Any, pipeline: str, serving: str, path: Path) -> Profile:
    where = f"{path}: servings.{serving}"
    _require_mapping(entry, where, "the entry")
    _reject_unknown(entry, _SERVING_KEYS, where, "the entry")
    for required in ("image", "gpu"):
        if required not in entry:
            raise SpecError(f"{where}: `{required}` is required")

    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise SpecError(f"{where}.image: must be a non-empty string")
    _check_pinned_image(image, f"{where}.image")

    gpu = entry["gpu"]
    if not isinstance(gpu, bool):
        raise SpecError(f"{where}.gpu: must be true or false, got {gpu!r}")

    resources = _resources(entry.get("resources") or {}, f"{where}.resources")
    batch_resources = _resources(entry.get("batch_resources") or {}, f"{where}.batch_resources")
    engine = _engine(entry.get("engine"), f"{where}.engine")
    if engine is not None and GPU_RESOURCE in resources.get("limits", {}):
        raise SpecError(f"{where}.resources: the engine holds the GPUs; put {GPU_RESOURCE!r} under "
                        "engine.resources.limits")
    gpu_resources = engine.resources if engine is not None else resources
    has_gpu_limit = GPU_RESOURCE in gpu_resources.get("limits", {})
    # A GPU profile without the limit would schedule on a GPU node yet see no device (and the
    # reverse would hold a GPU idle), so the flag and the limit must agree.
    if gpu and not has_gpu_limit:
        raise SpecError(f"{where}: gpu is true but resources.limits has no {GPU_RESOURCE!r}")
    if not gpu and has_gpu_limit:
        raise SpecError(f"{where}: gpu is false but resources.limits asks for {GPU_RESOURCE!r}")
    if has_gpu_limit and not gpu_resources["limits"][GPU_RESOURCE].isdigit():
        raise SpecError(f"{where}.resources.limits: {GPU_RESOURCE!r} must be a whole number")

    node_selector = entry.get("node_selector") or {}
    _require_mapping(node_selector, where, "node_selector")
    for key, value in node_selector.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError(
                f'{where}.node_selector: keys and values must be strings (quote "true"), '
                f"got {key!r}: {value!r}"
            )

    tolerations = _tolerations(entry.get("tolerations") or [], f"{where}.tolerations")

    shm_size = entry.get("shm_size")
    if shm_size is not None and not isinstance(shm_size, str):
        raise SpecError(f"{where}.shm_size: must be a quantity string like '16Gi' or null")

    model_cache = _model_cache(entry.get("model_cache"), f"{where}.model_cache")

    defaults = entry.get("defaults") or {}
    _require_mapping(defaults, where, "defaults")
    # The serving's own defaults (the ones `dfk8s run` uses), under what this cluster's file sets.
    from dfk8s.servings import SERVINGS

    registered = SERVINGS[serving].defaults_for(pipeline) if serving in SERVINGS else {}
    defaults = {**registered, **defaults}

    return Profile(
        pipeline=pipeline,
        serving=serving,
        image=image,
        gpu=gpu,
        resources=resources,
        node_selector=dict(node_selector),
        tolerations=tolerations,
        shm_size=shm_size,
        model_cache=model_cache,
        defaults=dict(defaults),
        source=path,
        batch_resources=batch_resources,
        engine=engine,
    )


def _engine(value: Any, where: str) -> EngineProfile | None:
    if value is None:
        return None
    _require_mapping(value, where, "engine")
    _reject_unknown(value, _ENGINE_KEYS, where, "engine")
    image = value.get("image")
    if not isinstance(image, str) or not image.strip():
        raise SpecError(f"{where}.image: must be a non-empty string")
    _check_pinned_image(image, f"{where}.image")
    resources = _resources(value.get("resources") or {}, f"{where}.resources")
    return EngineProfile(image=image, resources=resources)


def _check_pinned_image(image: str, where: str) -> None:
    # A moving tag makes two pods of one run (or a re-run) execute different code.
    if "@" in image:
        return  # pinned by digest
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        raise SpecError(f"{where}: {image!r} has no tag; pin a version (e.g. ':0.1.0')")
    if last.rsplit(":", 1)[1] == "latest":
        raise SpecError(f"{where}: {image!r} uses 'latest'; pin a version (e.g. ':0.1.0')")


def _resources(value: Any, where: str) -> dict[str, dict[str, str]]:
    _require_mapping(value, where, "resources")
    _reject_unknown(value, _RESOURCE_KEYS, where, "resources")
    result: dict[str, dict[str, str]] = {}
    for section, amounts in value.items():
        amounts = amounts or {}
        _require_mapping(amounts, where, section)
        converted: dict[str, str] = {}
        for name, amount in amounts.items():
            # Quantities are strings in the API; YAML turns `cpu: 1` into an int, which is fine here,
            # but a list or a float like 0.5 with a unit typo is not.
            if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
                raise SpecError(f"{where}.{section}.{name}: must be a quantity like '2' or '4Gi'")
            converted[str(name)] = str(amount)
        result[section] = converted
    return result


def _tolerations(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: must be a list")
    result = []
    for position, toleration in enumerate(value):
        item_where = f"{where}[{position}]"
        _require_mapping(toleration, item_where, "the toleration")
        _reject_unknown(toleration, _TOLERATION_KEYS, item_where, "the toleration")
        result.append(dict(toleration))
    return tuple(result)


def _model_cache(value: Any, where: str) -> ModelCache | None:
    if value is None:
        return None
    _require_mapping(value, where, "model_cache")
    _reject_unknown(value, {"size", "pvc", "subpath"}, where, "model_cache")
    size, pvc, subpath = value.get("size"), value.get("pvc"), value.get("subpath")
    if (size is None) == (pvc is None):
        raise SpecError(f"{where}: set exactly one of `size` (an emptyDir) or `pvc` (an existing claim)")
    for name, item in (("size", size), ("pvc", pvc), ("subpath", subpath)):
        if item is not None and (not isinstance(item, str) or not item):
            raise SpecError(f"{where}.{name}: must be a non-empty string")
    if subpath is not None and pvc is None:
        raise SpecError(f"{where}.subpath: only a `pvc` cache has a subpath")
    return ModelCache(size=size, pvc=pvc, subpath=subpath)


def _require_mapping(value: Any, where: str, what: str) -> None:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: {what} must be a mapping, got {type(value).__name__}")


def _reject_unknown(value: Mapping, allowed: set[str], where: str, what: str) -> None:
    # Unknown keys are almost always typos (`nodeSelector` for `node_selector`) that would otherwise
    # be ignored without a word.
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) in {what}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
