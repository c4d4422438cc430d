"""templates/rbac/launcher-role.yaml: least privilege for submit / status / logs / cancel."""

from __future__ import annotations

TEMPLATE = "rbac/launcher-role.yaml"


def test_should_grant_exactly_the_launcher_verbs_when_defaults_are_used(render):
    role = render().one(TEMPLATE)
    assert role["kind"] == "Role"  # namespaced: never a ClusterRole
    assert role["metadata"]["name"] == "demo-dfk8s-launcher"
    assert role["rules"] == [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ]


def test_should_grant_no_wildcards_or_secrets_when_defaults_are_used(render):
    for rule in render().one(TEMPLATE)["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]


def test_should_render_nothing_when_launcher_rbac_create_is_false(render):
    assert not render({"launcher": {"rbac": {"create": False}}}).has(TEMPLATE)
