"""templates/reducer/serviceaccount.yaml."""

from __future__ import annotations

TEMPLATE = "reducer/serviceaccount.yaml"


def test_should_create_the_reducer_service_account_when_defaults_are_used(render):
    account = render().one(TEMPLATE)
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == "demo-dfk8s-reducer"
    assert account["metadata"]["labels"]["app.kubernetes.io/component"] == "reducer"


def test_should_use_the_name_and_annotations_when_reducer_service_account_is_set(render):
    values = {"reducer": {"serviceAccount": {"name": "run-reducer", "annotations": {"a.example/role": "x"}}}}
    account = render(values).one(TEMPLATE)
    assert account["metadata"]["name"] == "run-reducer"
    assert account["metadata"]["annotations"] == {"a.example/role": "x"}


def test_should_render_nothing_when_reducer_service_account_create_is_false(render):
    assert not render({"reducer": {"serviceAccount": {"create": False}}}).has(TEMPLATE)
