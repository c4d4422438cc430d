"""templates/launcher/serviceaccount.yaml."""

from __future__ import annotations

TEMPLATE = "launcher/serviceaccount.yaml"


def test_should_create_the_launcher_service_account_when_defaults_are_used(render):
    account = render().one(TEMPLATE)
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == "demo-dfk8s-launcher"
    assert account["metadata"]["labels"]["app.kubernetes.io/component"] == "launcher"


def test_should_use_the_name_and_annotations_when_launcher_service_account_is_set(render):
    values = {"launcher": {"serviceAccount": {"name": "ci-runner", "annotations": {"a.example/role": "x"}}}}
    account = render(values).one(TEMPLATE)
    assert account["metadata"]["name"] == "ci-runner"
    assert account["metadata"]["annotations"] == {"a.example/role": "x"}


def test_should_render_nothing_when_launcher_service_account_create_is_false(render):
    assert not render({"launcher": {"serviceAccount": {"create": False}}}).has(TEMPLATE)
