"""dfk8s.kube.profiles: loading and validating the job profiles under jobs/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from dfk8s.errors import SpecError
from dfk8s.kube.profiles import ModelCache, Profile, load_profile, profile_search_path
from dfk8s.servings import serving_defaults

REPO_JOBS = Path(__file__).resolve().parents[1] / "jobs"

GPU_SERVING = {
    "image": "ghcr.io/dfk8s/dfk8s-gpu:1.2.3",
    "gpu": True,
    "resources": {
        "requests": {"cpu": 4, "memory": "16Gi"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": 1},
    },
    "node_selector": {"gpu": "yes"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "shm_size": "8Gi",
    "model_cache": {"pvc": "hf-cache"},
    "defaults": {"model": "m", "steps": 4},
}
CPU_SERVING = {
    "image": "ghcr.io/dfk8s/dfk8s-cpu:1.2.3",
    "gpu": False,
    "resources": {"limits": {"memory": "1Gi"}},
}


@pytest.fixture
def jobs_dir(tmp_path, monkeypatch):
    """An empty $DFK8S_JOBS_DIR, searched before the repo's jobs/."""
    monkeypatch.setenv("DFK8S_JOBS_DIR", str(tmp_path))
    return tmp_path


def write_profile(folder: Path, **overrides) -> Path:
    document = {
        "pipeline": "text2image",
        "default_serving": "diffusers",
        "servings": {"diffusers": GPU_SERVING, "openai-images": CPU_SERVING},
    }
    document.update(overrides)
    path = folder / "text2image.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("pipeline", "serving", "gpu"),
    [
        ("caption", "openai-chat", False),
        ("vqa", "openai-chat", False),
        ("text2image", "diffusers", True),
        ("text2image", "openai-images", False),
        ("text2image", "gemini-images", False),
        ("imageedit", "diffusers", True),
        ("imageedit", "openai-images", False),
        ("imageedit", "gemini-images", False),
    ],
)
def test_should_load_the_shipped_profile_when_pipeline_and_serving_are_given(
    monkeypatch, pipeline, serving, gpu
):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    profile = load_profile(pipeline, serving)
    assert (profile.pipeline, profile.serving, profile.gpu) == (pipeline, serving, gpu)
    assert profile.source == REPO_JOBS / f"{pipeline}.yaml"
    assert not profile.image.endswith(":latest")
    assert profile.image.startswith("ghcr.io/dfk8s/dfk8s-gpu:" if gpu else "ghcr.io/dfk8s/dfk8s-cpu:")
    if gpu:
        assert profile.gpu_count == 1
        assert profile.resources["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in profile.tolerations
        assert profile.shm_size and profile.model_cache is not None
    else:
        assert profile.gpu_count == 0
        assert profile.tolerations == () and profile.node_selector == {}
        assert profile.shm_size is None and profile.model_cache is None


def test_should_use_the_default_serving_when_serving_is_none(monkeypatch):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    assert load_profile("caption").serving == "openai-chat"
    assert load_profile("vqa").serving == "openai-chat"
    assert load_profile("text2image").serving == "diffusers"
    assert load_profile("imageedit").serving == "diffusers"


def test_should_carry_the_flux_defaults_when_diffusers_is_chosen(monkeypatch):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    text2image = load_profile("text2image", "diffusers").defaults
    assert text2image == {
        "model": "black-forest-labs/FLUX.1-dev",
        "steps": 28,
        "guidance": 3.5,
        "width": 1024,
        "height": 1024,
        "dtype": "bfloat16",
        "batch_size": 4,
    }
    assert load_profile("imageedit", "diffusers").defaults["model"] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert load_profile("imageedit", "diffusers").defaults["guidance"] == 2.5
    assert load_profile("text2image", "openai-images").defaults["model"] == "gpt-image-1.5"
    assert load_profile("text2image", "openai-images").defaults["max_concurrency"] == 8
    assert load_profile("imageedit", "gemini-images").defaults["model"] == "gemini-2.5-flash-image"
    assert load_profile("caption").defaults["max_concurrency"] == 64


def test_should_comment_every_field_when_a_profile_is_shipped():
    # Users edit these files: every key line is preceded by a comment (or carries one).
    for path in sorted(REPO_JOBS.glob("*.yaml")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
                continue
            previous = lines[number - 1].strip() if number else ""
            # Sub-keys of requests/limits/tolerations/node_selector are explained by their parent's comment.
            parent_documented = _parent_is_documented(lines, number)
            assert previous.startswith("#") or "#" in stripped or parent_documented, (
                f"{path.name}:{number + 1}"
            )


def _parent_is_documented(lines: list[str], number: int) -> bool:
    indent = len(lines[number]) - len(lines[number].lstrip())
    for back in range(number - 1, -1, -1):
        line = lines[back]
        if line.strip() and not line.strip().startswith("#") and len(line) - len(line.lstrip()) < indent:
            return line.strip().rstrip(":") in {
                "requests",
                "limits",
                "node_selector",
                "tolerations",
                "model_cache",
                "resources",
            } or line.strip().startswith("- ")
    return False


def test_should_prefer_dfk8s_jobs_dir_when_it_is_set(jobs_dir):
    path = write_profile(jobs_dir)
    profile = load_profile("text2image")
    assert profile == Profile(
        pipeline="text2image",
        serving="diffusers",
        image="ghcr.io/dfk8s/dfk8s-gpu:1.2.3",
        gpu=True,
        resources={
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        node_selector={"gpu": "yes"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        shm_size="8Gi",
        model_cache=ModelCache(pvc="hf-cache"),
        # The file's defaults over the serving's registered ones (what `dfk8s run` uses).
        defaults={**serving_defaults("diffusers", "text2image"), "model": "m", "steps": 4},
    )
    assert profile.source == path
    # Pipelines the folder lacks still come from the repo.
    assert load_profile("caption").source == REPO_JOBS / "caption.yaml"


def test_should_search_env_then_repo_then_etc_when_listing_the_search_path(jobs_dir):
    assert profile_search_path() == [
        jobs_dir,
        REPO_JOBS,
        Path("/etc/dfk8s/jobs"),
        Path(sys.prefix) / "share" / "dfk8s" / "jobs",
    ]


def test_should_name_the_folders_searched_when_no_profile_exists(jobs_dir):
    with pytest.raises(SpecError) as caught:
        load_profile("segmentation")
    message = str(caught.value)
    assert "segmentation" in message and str(jobs_dir) in message and str(REPO_JOBS) in message
    assert "/etc/dfk8s/jobs" in message


def test_should_list_the_servings_when_the_serving_is_unknown(jobs_dir):
    write_profile(jobs_dir)
    with pytest.raises(SpecError, match=r"no profile for serving 'vllm'.*diffusers, openai-images"):
        load_profile("text2image", "vllm")


@pytest.mark.parametrize("name", ["../caption", "Caption", "", "a/b", "caption.yaml"])
def test_should_refuse_the_name_when_pipeline_is_not_a_plain_name(name):
    with pytest.raises(SpecError, match="invalid pipeline name"):
        load_profile(name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": "ghcr.io/dfk8s/dfk8s-gpu:latest"}, "uses 'latest'"),
        ({"image": "ghcr.io/dfk8s/dfk8s-gpu"}, "has no tag"),
        ({"image": ""}, "non-empty string"),
        ({"gpu": "yes"}, "true or false"),
        ({"resources": {"limits": {"memory": "1Gi"}}}, "gpu is true but resources.limits has no"),
        ({"resources": {"limits": {"nvidia.com/gpu": "half"}}}, "whole number"),
        ({"resources": {"request": {}}}, r"unknown key\(s\) in resources: request"),
        ({"resources": {"limits": {"cpu": [1]}}}, "quantity"),
        ({"nodeSelector": {}}, r"unknown key\(s\) in the entry: nodeSelector"),
        ({"node_selector": {"gpu": True}}, "quote"),
        ({"tolerations": {"key": "x"}}, "must be a list"),
        ({"tolerations": [{"keys": "x"}]}, r"tolerations\[0\]: unknown key"),
        ({"shm_size": 8}, "quantity string"),
        ({"model_cache": {"size": "1Gi", "pvc": "x"}}, "exactly one"),
        ({"model_cache": {}}, "exactly one"),
        ({"defaults": ["model"]}, "defaults must be a mapping"),
    ],
)
def test_should_name_the_field_when_a_serving_entry_is_malformed(jobs_dir, change, message):
    write_profile(jobs_dir, servings={"diffusers": {**GPU_SERVING, **change}})
    with pytest.raises(SpecError, match=message) as caught:
        load_profile("text2image")
    assert "servings.diffusers" in str(caught.value) and "text2image.yaml" in str(caught.value)


def test_should_refuse_the_profile_when_cpu_serving_asks_for_a_gpu(jobs_dir):
    write_profile(
        jobs_dir,
        servings={
            "diffusers": GPU_SERVING,
            "openai-images": {**CPU_SERVING, "resources": {"limits": {"nvidia.com/gpu": 1}}},
        },
    )
    with pytest.raises(SpecError, match="gpu is false but"):
        load_profile("text2image", "openai-images")


def test_should_refuse_the_entry_when_image_or_gpu_is_missing(jobs_dir):
    write_profile(jobs_dir, servings={"diffusers": {"gpu": False}})
    with pytest.raises(SpecError, match="`image` is required"):
        load_profile("text2image")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pipeline": "caption"}, "expected 'text2image'"),
        ({"default_serving": "nope"}, "`default_serving` 'nope' is not one of"),
        ({"servings": {}}, "`servings` is empty"),
        ({"servings": ["diffusers"]}, "servings must be a mapping"),
        ({"extra": 1}, r"unknown key\(s\) in the file: extra"),
    ],
)
def test_should_explain_the_problem_when_the_file_shape_is_wrong(jobs_dir, overrides, message):
    write_profile(jobs_dir, **overrides)
    with pytest.raises(SpecError, match=message):
        load_profile("text2image")


def test_should_report_the_file_when_it_is_not_yaml(jobs_dir):
    (jobs_dir / "caption.yaml").write_text("pipeline: [caption\n")
    with pytest.raises(SpecError, match="caption.yaml: not valid YAML"):
        load_profile("caption")


def test_should_refuse_the_file_when_it_is_not_a_mapping(jobs_dir):
    (jobs_dir / "caption.yaml").write_text("- caption\n")
    with pytest.raises(SpecError, match="the file must be a mapping"):
        load_profile("caption")


def test_should_accept_a_digest_when_the_image_is_pinned_by_digest(jobs_dir):
    image = "registry.local:5000/dfk8s-gpu@sha256:" + "a" * 64
    write_profile(jobs_dir, servings={"diffusers": {**GPU_SERVING, "image": image}})
    assert load_profile("text2image").image == image


def test_should_accept_a_registry_port_when_the_image_has_a_tag(jobs_dir):
    write_profile(jobs_dir, servings={"diffusers": {**GPU_SERVING, "image": "localhost:5000/dfk8s-gpu:dev"}})
    assert load_profile("text2image").image == "localhost:5000/dfk8s-gpu:dev"
    write_profile(jobs_dir, servings={"diffusers": {**GPU_SERVING, "image": "localhost:5000/dfk8s-gpu"}})
    with pytest.raises(SpecError, match="has no tag"):
        load_profile("text2image")
