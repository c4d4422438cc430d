"""templates/fake-api/deployment.yaml: the optional fake OpenAI/Gemini server."""

from __future__ import annotations

TEMPLATE = "fake-api/deployment.yaml"


def test_should_render_nothing_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)


def test_should_run_the_fake_api_module_when_fake_api_enabled_is_set(render):
    deployment = render({"fakeApi": {"enabled": True}}).one(TEMPLATE)
    assert deployment["metadata"]["name"] == "demo-dfk8s-fake-api"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/dfk8s/dfk8s-cpu:0.1.0"
    assert container["command"] == [
        "python",
        "-m",
        "dfk8s.testing.fake_api",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_should_listen_on_the_port_when_fake_api_port_is_set(render):
    deployment = render({"fakeApi": {"enabled": True, "port": 9000}}).one(TEMPLATE)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "9000"
    assert container["ports"][0]["containerPort"] == 9000
