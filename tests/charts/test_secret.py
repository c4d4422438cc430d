"""templates/secret.yaml: the optional credentials Secret."""

from __future__ import annotations

import base64

import pytest

helm_python = pytest.importorskip("helm_python")

TEMPLATE = "secret.yaml"


def test_should_render_no_secret_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)


def test_should_store_only_the_given_keys_when_secret_create_is_set(render):
    secret = render({"secret": {"create": True, "apiKey": "sk-1", "hfToken": "hf-2"}}).one(TEMPLATE)
    assert secret["metadata"]["name"] == "demo-dfk8s-credentials"
    assert secret["type"] == "Opaque"
    assert secret["data"] == {
        "DF_API_KEY": base64.b64encode(b"sk-1").decode(),
        "HF_TOKEN": base64.b64encode(b"hf-2").decode(),
    }
    assert "stringData" not in secret


def test_should_render_no_secret_when_existing_secret_is_set(render):
    rendered = render({"secret": {"existingSecret": "team-creds"}})
    assert not rendered.has(TEMPLATE)
    assert "--api-key-secret team-creds:DF_API_KEY" in rendered.notes


def test_should_fail_when_secret_create_and_existing_secret_are_both_set(render):
    with pytest.raises(helm_python.HelmRenderError, match="exclude each other"):
        render({"secret": {"create": True, "existingSecret": "x", "apiKey": "k"}})


def test_should_fail_when_secret_create_is_set_without_any_value(render):
    with pytest.raises(helm_python.HelmRenderError, match="none of"):
        render({"secret": {"create": True}})
