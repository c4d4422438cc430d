"""Each serving is described once: `dfk8s run` and `dfk8s submit` resolve the same defaults from it."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from dfk8s.cli import cli
from dfk8s.executors.kubernetes import apply_profile_defaults
from dfk8s.kube.profiles import load_profile
from dfk8s.pipelines import PIPELINES
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.run.spec import RunSpec
from dfk8s.servings import SERVINGS, serving_class, serving_defaults

PAIRS = [(p, s) for p, pipe in PIPELINES.items() for s in pipe.servings if s != "echo"]


@pytest.mark.parametrize(("pipeline", "serving"), PAIRS, ids=[f"{p}-{s}" for p, s in PAIRS])
def test_run_and_submit_resolve_the_same_defaults(tmp_path, monkeypatch, pipeline, serving):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    manifest = tmp_path / "m.jsonl"
    row = {"image": "in.png", "conversations": [{"role": "user", "content": "a red fox"}]}
    manifest.write_text(json.dumps(row) + "\n")
    _, spec, _ = prepare_run(RunRequest(pipeline=pipeline, serving=serving, input=str(manifest),
                                        output=str(tmp_path / "o"), run_id="r"))
    submitted = apply_profile_defaults({}, load_profile(pipeline, serving), explicit=set())
    assert spec.options == submitted == serving_defaults(serving, pipeline)


def test_the_disagreements_of_issue_8_are_gone(monkeypatch):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    for pipeline in ("text2image", "imageedit"):
        assert load_profile(pipeline, "openai-images").defaults["model"] == "gpt-image-1.5"
        for serving in ("openai-images", "gemini-images"):
            assert load_profile(pipeline, serving).defaults["max_concurrency"] == 8
    assert load_profile("imageedit", "diffusers").defaults["guidance"] == 2.5
    from dfk8s.servings import diffusers_flux, openai_images

    assert openai_images.DEFAULT_MODEL == "gpt-image-1.5"
    assert diffusers_flux.MODELS["imageedit"][2] == 2.5


def test_the_api_servings_read_their_registered_concurrency(monkeypatch):
    monkeypatch.setenv("DF_API_KEY", "k")
    spec = RunSpec(run_id="t", pipeline="text2image", serving="openai-images", options={})
    assert serving_class("openai-images").from_spec(spec).concurrency == 8
    spec = RunSpec(run_id="t", pipeline="vqa", serving="openai-chat", options={})
    assert serving_class("openai-chat").from_spec(spec).concurrency == 64


def test_pipelines_and_servings_agree():
    for name, pipeline in PIPELINES.items():
        assert pipeline.default_serving in pipeline.servings
        assert all(name in SERVINGS[s].pipelines for s in pipeline.servings)


def test_help_states_the_per_serving_concurrency():
    result = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200)
    assert "openai-chat 64" in " ".join(result.output.split()) and "openai-images 8" in result.output
