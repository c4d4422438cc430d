"""templates/fake-api/service.yaml."""

from __future__ import annotations

TEMPLATE = "fake-api/service.yaml"


def test_should_render_nothing_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)


def test_should_select_the_fake_api_pod_when_fake_api_enabled_is_set(render):
    rendered = render({"fakeApi": {"enabled": True}})
    service = rendered.one(TEMPLATE)
    pod_labels = rendered.one("fake-api/deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == pod_labels
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
