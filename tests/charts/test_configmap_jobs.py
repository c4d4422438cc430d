"""templates/configmap-jobs.yaml: the job profiles shipped as a ConfigMap."""

from __future__ import annotations

import filecmp

import pytest

from dfk8s.kube.profiles import load_profile

TEMPLATE = "configmap-jobs.yaml"


def test_should_keep_the_chart_copy_equal_to_jobs_when_profiles_change(repo_dir, chart_dir):
    # Helm cannot read files outside the chart, so the chart carries a copy of jobs/.
    source, copy = repo_dir / "jobs", chart_dir / "files" / "jobs"
    names = sorted(path.name for path in source.glob("*.yaml"))
    assert names == sorted(path.name for path in copy.glob("*.yaml"))
    _, mismatch, errors = filecmp.cmpfiles(source, copy, names, shallow=False)
    assert mismatch == [] and errors == [], f"run: cp jobs/*.yaml charts/dfk8s/files/jobs/ ({mismatch})"


def test_should_ship_every_profile_when_defaults_are_used(render, repo_dir):
    configmap = render().one(TEMPLATE)
    assert configmap["metadata"]["name"] == "demo-dfk8s-jobs"
    for path in sorted((repo_dir / "jobs").glob("*.yaml")):
        assert configmap["data"][path.name] == path.read_text(), path.name


def test_should_load_every_shipped_profile_when_mounted_as_jobs_dir(render, tmp_path, monkeypatch):
    for name, text in render().one(TEMPLATE)["data"].items():
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("DFK8S_JOBS_DIR", str(tmp_path))
    for name in render().one(TEMPLATE)["data"]:
        profile = load_profile(name.removesuffix(".yaml"))
        assert profile.source == tmp_path / name


def test_should_replace_a_profile_when_job_profiles_overrides_is_set(render):
    text = "pipeline: caption\ndefault_serving: openai-chat\nservings: {}\n"
    data = render({"jobProfiles": {"overrides": {"caption.yaml": text, "extra.yaml": "x: 1\n"}}}).one(
        TEMPLATE
    )["data"]
    assert data["caption.yaml"] == text
    assert data["extra.yaml"] == "x: 1\n"
    assert "pipeline: text2image" in data["text2image.yaml"]


def test_should_render_nothing_when_job_profiles_enabled_is_false(render):
    assert not render({"jobProfiles": {"enabled": False}}).has(TEMPLATE)


def test_should_reject_an_override_when_its_name_is_not_a_yaml_file(render):
    helm_python = pytest.importorskip("helm_python")
    with pytest.raises(helm_python.HelmValuesError):
        render({"jobProfiles": {"overrides": {"../caption": "x"}}})
