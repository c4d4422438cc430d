"""Whole-chart checks: lint, schema, every rendered object valid and restricted, no leaked secrets."""

from __future__ import annotations

import base64
import re
import tomllib

import pytest
import yaml

from dfk8s.kube.versions import SUPPORTED_KUBERNETES
from tests.charts.conftest import ALL_ON

helm_python = pytest.importorskip("helm_python")

FULLNAME = "demo-dfk8s"
SCENARIOS = {
    "defaults": {},
    "seaweedfs": {"seaweedfs": {"enabled": True}},
    "fake-api": {"fakeApi": {"enabled": True}},
    "model-cache": {"modelCache": {"enabled": True, "storageClass": "nfs"}},
    "secret-create": {"secret": {"create": True, "apiKey": "sk-x", "awsAccessKeyId": "id"}},
    "secret-existing": {"secret": {"existingSecret": "mine"}},
    "no-service-accounts": {
        "launcher": {"serviceAccount": {"create": False}, "rbac": {"create": False}},
        "reducer": {"serviceAccount": {"create": False, "name": "ci"}},
        "jobProfiles": {"enabled": False},
    },
    "all-on": ALL_ON,
}


def _pod_specs(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "all-on"])
def test_should_lint_clean_when_linted_for_each_supported_version(chart_dir, values):
    for version in SUPPORTED_KUBERNETES:
        report = helm_python.lint(str(chart_dir), values, strict=True, kube_version=f"v{version}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_should_render_valid_objects_when_scenario_is_set(render, validate, scenario):
    rendered = render(SCENARIOS[scenario])
    validate(rendered.objects)
    for obj in rendered.objects:
        assert obj["metadata"]["namespace"] == "batch", obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "dfk8s"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_should_run_every_pod_restricted_when_scenario_is_set(render, scenario):
    for name, spec in _pod_specs(render(SCENARIOS[scenario]).objects):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        mounted = set()
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert container["imagePullPolicy"] == "IfNotPresent", name
            assert not container["image"].endswith(":latest"), name
            mounted |= {mount["mountPath"] for mount in container["volumeMounts"]}
        # A read-only root needs somewhere to write temporary files.
        assert "/tmp" in mounted, name
        assert all("emptyDir" in volume for volume in spec["volumes"]), name


def test_should_keep_secret_values_inside_the_secret_when_secret_create_is_set(render):
    literals = {
        "apiKey": "sk-LEAK-api",
        "awsAccessKeyId": "AKIA-LEAK-id",
        "awsSecretAccessKey": "LEAK-secret-key",
        "hfToken": "hf_LEAK_token",
    }
    rendered = render({**ALL_ON, "secret": {"create": True, **literals}})
    for template, text in rendered.raw.items():
        for literal in literals.values():
            encoded = base64.b64encode(literal.encode()).decode()
            # The plain value never appears anywhere, not even in the Secret (it is base64 there).
            assert literal not in text, template
            if not template.endswith("/secret.yaml"):
                assert encoded not in text, template


def test_should_reject_values_when_a_value_has_the_wrong_type(chart, render):
    with pytest.raises(helm_python.HelmValuesError, match="seaweedfs/enabled"):
        render({"seaweedfs": {"enabled": "yes"}})
    with pytest.raises(helm_python.HelmValuesError, match="fakeApi/port"):
        render({"fakeApi": {"port": "8000"}})
    with pytest.raises(helm_python.HelmValuesError, match="bogus"):
        render({"bogus": True})
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema({"image": {"tag": "latest"}})
    chart.validate_schema(chart.values)


def test_should_name_objects_from_the_override_when_fullname_override_is_set(render):
    rendered = render({"fullnameOverride": "batch-tools", **ALL_ON})
    names = {obj["metadata"]["name"] for obj in rendered.objects}
    assert all(name.startswith("batch-tools-") for name in names), names


def test_should_use_the_release_name_alone_when_it_contains_the_chart_name(render):
    rendered = render(name="dfk8s")
    assert rendered.one("reducer/serviceaccount.yaml")["metadata"]["name"] == "dfk8s-reducer"


def test_should_default_image_tags_to_app_version_when_image_tag_is_empty(chart, render):
    app_version = chart.metadata["appVersion"]
    rendered = render(ALL_ON)
    images = [c["image"] for _, spec in _pod_specs(rendered.objects) for c in spec["containers"]]
    assert images and all(image == f"ghcr.io/dfk8s/dfk8s-cpu:{app_version}" for image in images)
    rendered = render({**ALL_ON, "image": {"tag": "9.9.9"}})
    images = [c["image"] for _, spec in _pod_specs(rendered.objects) for c in spec["containers"]]
    assert all(image.endswith(":9.9.9") for image in images)


def test_should_match_the_package_version_when_chart_and_profiles_are_read(chart, repo_dir):
    pyproject = tomllib.loads((repo_dir / "pyproject.toml").read_text())
    version = pyproject["project"]["version"]
    assert chart.metadata["appVersion"] == version
    for path in sorted((repo_dir / "jobs").glob("*.yaml")):
        for serving, entry in yaml.safe_load(path.read_text())["servings"].items():
            assert entry["image"].endswith(f":{version}"), f"{path.name} {serving}: {entry['image']}"


def test_should_require_the_oldest_supported_kubernetes_when_chart_is_installed(chart):
    minimum = re.match(r">=\s*(\d+\.\d+)", chart.metadata["kubeVersion"]).group(1)
    assert minimum == SUPPORTED_KUBERNETES[0]


def test_should_render_nothing_optional_when_defaults_are_used(render):
    rendered = render()
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in rendered.objects)
    assert kinds == sorted(
        [
            ("ConfigMap", f"{FULLNAME}-jobs"),
            ("Role", f"{FULLNAME}-launcher"),
            ("Role", f"{FULLNAME}-reducer"),
            ("RoleBinding", f"{FULLNAME}-launcher"),
            ("RoleBinding", f"{FULLNAME}-reducer"),
            ("ServiceAccount", f"{FULLNAME}-launcher"),
            ("ServiceAccount", f"{FULLNAME}-reducer"),
        ]
    )


def test_should_catch_unknown_fields_when_objects_are_validated_strictly(render, validate):
    # Guards the guard: strict validation must reject what the API server would.
    account = render().one("launcher/serviceaccount.yaml")
    with pytest.raises(AssertionError, match=SUPPORTED_KUBERNETES[0]):
        validate([{**account, "automountToken": False}])
