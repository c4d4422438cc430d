"""templates/seaweedfs/service.yaml."""

from __future__ import annotations

TEMPLATE = "seaweedfs/service.yaml"


def test_should_render_nothing_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)


def test_should_select_the_seaweedfs_pod_when_seaweedfs_enabled_is_set(render):
    rendered = render({"seaweedfs": {"enabled": True}})
    service = rendered.one(TEMPLATE)
    pod_labels = rendered.one("seaweedfs/deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == pod_labels
    assert service["spec"]["ports"] == [{"name": "s3", "port": 8333, "targetPort": "s3", "protocol": "TCP"}]
