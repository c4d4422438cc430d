"""templates/rbac/reducer-rolebinding.yaml."""

from __future__ import annotations

TEMPLATE = "rbac/reducer-rolebinding.yaml"


def test_should_bind_the_reducer_role_to_its_service_account_when_defaults_are_used(render):
    binding = render().one(TEMPLATE)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "demo-dfk8s-reducer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-dfk8s-reducer", "namespace": "batch"}
    ]


def test_should_bind_the_named_account_when_reducer_service_account_name_is_set(render):
    values = {"reducer": {"serviceAccount": {"create": False, "name": "ci"}}}
    assert render(values).one(TEMPLATE)["subjects"][0]["name"] == "ci"


def test_should_render_nothing_when_reducer_rbac_create_is_false(render):
    assert not render({"reducer": {"rbac": {"create": False}}}).has(TEMPLATE)
