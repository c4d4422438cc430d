"""templates/model-cache/pvc.yaml: the optional shared model cache of diffusers workers."""

from __future__ import annotations

import pytest

helm_python = pytest.importorskip("helm_python")

TEMPLATE = "model-cache/pvc.yaml"


def test_should_render_nothing_when_defaults_are_used(render):
    assert not render().has(TEMPLATE)
    assert "model pull" not in render().notes


def test_should_create_a_kept_read_write_many_claim_when_model_cache_enabled_is_set(render, validate):
    rendered = render({"modelCache": {"enabled": True}})
    claim = rendered.one(TEMPLATE)
    validate([claim])
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "demo-dfk8s-model-cache"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "100Gi"}},
    }
    assert "dfk8s model pull black-forest-labs/FLUX.1-dev --pvc demo-dfk8s-model-cache" in rendered.notes
    assert "--model-cache-pvc demo-dfk8s-model-cache" in rendered.notes


def test_should_use_the_given_name_class_size_and_mode_when_they_are_set(render, validate):
    values = {
        "name": "hf-cache",
        "storageClass": "nfs",
        "size": "200Gi",
        "accessMode": "ReadWriteOnce",
        "keep": False,
    }
    claim = render({"modelCache": {"enabled": True, **values}}).one(TEMPLATE)
    validate([claim])
    assert claim["metadata"]["name"] == "hf-cache" and "annotations" not in claim["metadata"]
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_should_bind_without_a_class_when_storage_class_is_a_dash(render):
    claim = render({"modelCache": {"enabled": True, "storageClass": "-"}}).one(TEMPLATE)
    assert claim["spec"]["storageClassName"] == ""


def test_should_pass_the_hf_token_secret_in_the_notes_when_the_secret_holds_one(render):
    notes = render({"modelCache": {"enabled": True}, "secret": {"existingSecret": "creds"}}).notes
    assert "--hf-token-secret creds:HF_TOKEN --wait" in notes


def test_should_reject_values_when_the_access_mode_or_size_is_wrong(render):
    with pytest.raises(helm_python.HelmValuesError, match="accessMode"):
        render({"modelCache": {"enabled": True, "accessMode": "ReadWriteAll"}})
    with pytest.raises(helm_python.HelmValuesError, match="size"):
        render({"modelCache": {"enabled": True, "size": "lots"}})
