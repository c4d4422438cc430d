"""templates/rbac/reducer-role.yaml: the reducer only watches its map Job."""

from __future__ import annotations

TEMPLATE = "rbac/reducer-role.yaml"


def test_should_grant_exactly_the_reducer_verbs_when_defaults_are_used(render):
    role = render().one(TEMPLATE)
    assert role["kind"] == "Role"
    assert role["metadata"]["name"] == "demo-dfk8s-reducer"
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]


def test_should_render_nothing_when_reducer_rbac_create_is_false(render):
    assert not render({"reducer": {"rbac": {"create": False}}}).has(TEMPLATE)
