"""templates/seaweedfs/deployment.yaml: the optional in-cluster S3 for trials."""

from __future__ import annotations

TEMPLATE = "seaweedfs/deployment.yaml"


def test_should_render_nothing_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)


def test_should_run_weed_s3_from_the_cpu_image_when_seaweedfs_enabled_is_set(render):
    deployment = render({"seaweedfs": {"enabled": True}}).one(TEMPLATE)
    assert deployment["metadata"]["name"] == "demo-dfk8s-seaweedfs"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/dfk8s/dfk8s-cpu:0.1.0"
    assert container["command"] == [
        "weed",
        "server",
        "-s3",
        "-s3.port=8333",
        "-dir=/data",
        "-ip.bind=0.0.0.0",
    ]
    assert container["ports"] == [{"name": "s3", "containerPort": 8333, "protocol": "TCP"}]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"data": "/data", "tmp": "/tmp"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "20Gi"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_should_listen_on_the_port_when_seaweedfs_port_is_set(render):
    deployment = render({"seaweedfs": {"enabled": True, "port": 9333, "dataSizeLimit": "1Gi"}}).one(TEMPLATE)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "-s3.port=9333" in container["command"]
    assert container["ports"][0]["containerPort"] == 9333
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "1Gi"
