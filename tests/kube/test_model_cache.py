"""The shared model cache on a cluster: worker mounts, the pull and list Jobs, the submit warnings.

Every object is validated strictly at the oldest and newest supported Kubernetes (SUPPORTED_KUBERNETES).
The pull and list Jobs run for real (`model pull --pvc --wait`, `model list --pvc`) on the real control
plane in tests/cluster/test_model_cache.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import SpecError
from dfk8s.kube import SUPPORTED_KUBERNETES, KubeRunConfig, build_map_job
from dfk8s.kube._cluster_options import HF_TOKEN_WARNING
from dfk8s.kube.model_jobs import (
    build_list_job,
    build_pull_job,
    merge_warnings,
    model_cache_warnings,
    pull_job_name,
)
from dfk8s.kube.profiles import ModelCache, load_profile

kubernetes_validate = pytest.importorskip("kubernetes_validate")

NS = "batch"
FLUX = "black-forest-labs/FLUX.1-dev"


@pytest.fixture(autouse=True)
def _cached_schemas(k8s_schema_cache):
    """Every test here validates objects: read each schema file once."""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def validate(obj: dict) -> None:
    for version in SUPPORTED_KUBERNETES:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            name = obj["metadata"]["name"]
            raise AssertionError(f"{name} invalid for {version} at {where}: {exc.message}") from None


def config(pipeline: str = "text2image", serving: str | None = None, **overrides) -> KubeRunConfig:
    profile = load_profile(pipeline, serving)
    fields = dict(
        run_id="r1",
        pipeline=pipeline,
        serving=profile.serving,
        run_uri="s3://b/runs/r1",
        shards=12,
        parallelism=4,
        namespace=NS,
        profile=profile,
    )
    fields.update(overrides)
    return KubeRunConfig(**fields)


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def only_container(job: dict) -> dict:
    (container,) = pod(job)["containers"]
    return container


def env_of(job: dict) -> dict[str, dict]:
    return {item["name"]: item for item in only_container(job)["env"]}


def cache_mount(job: dict) -> dict:
    (mount,) = [m for m in only_container(job)["volumeMounts"]
                if m["name"] == "model-cache" and m["mountPath"] == "/cache"]
    return mount


def cache_volume(job: dict) -> dict:
    (volume,) = [v for v in pod(job)["volumes"] if v["name"] == "model-cache"]
    return volume


def assert_restricted(job: dict) -> None:
    spec = pod(job)
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = only_container(job)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


# --- workers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["text2image", "imageedit"])
def test_should_mount_the_claim_read_only_and_load_offline_when_model_cache_pvc_is_set(pipeline):
    job = build_map_job(config(pipeline, model_cache_pvc="hf-cache", model_cache_subpath="models"))
    validate(job)
    # One volume for the claim (two of one claim never finish mounting on Kubernetes 1.33), writable
    # only through the compile cache's own mount.
    assert cache_volume(job) == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
    assert cache_mount(job) == {
        "name": "model-cache",
        "mountPath": "/cache",
        "subPath": "models",
        "readOnly": True,
    }
    env = env_of(job)
    assert env["HF_HUB_OFFLINE"] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert not any("emptyDir" in v and v["name"] == "model-cache" for v in pod(job)["volumes"])
    # FLUX compiled once per cluster: the compile cache beside the models, writable.
    (compile_mount,) = [m for m in only_container(job)["volumeMounts"] if m["mountPath"] == "/compile-cache"]
    assert compile_mount == {"name": "model-cache", "mountPath": "/compile-cache",
                             "subPath": "models/dfk8s-compile"}
    assert env["DFK8S_COMPILE_CACHE"]["value"] == "/compile-cache"


def test_should_mount_the_profile_claim_read_only_when_the_profile_names_a_pvc():
    cfg = config()
    profile = dataclasses.replace(cfg.profile, model_cache=ModelCache(pvc="team-cache", subpath="hf"))
    job = build_map_job(dataclasses.replace(cfg, profile=profile))
    validate(job)
    assert cache_volume(job)["persistentVolumeClaim"] == {"claimName": "team-cache"}
    assert cache_mount(job)["subPath"] == "hf" and cache_mount(job)["readOnly"] is True
    assert env_of(job)["HF_HUB_OFFLINE"]["value"] == "1"
    # The flag wins over the profile.
    job = build_map_job(dataclasses.replace(cfg, profile=profile, model_cache_pvc="other"))
    assert cache_volume(job)["persistentVolumeClaim"][
        "claimName"
    ] == "other" and "subPath" not in cache_mount(job)


def test_should_keep_the_emptydir_and_stay_online_when_no_pvc_is_given():
    job = build_map_job(config())
    assert cache_volume(job)["emptyDir"] == {"sizeLimit": "100Gi"}
    assert "HF_HUB_OFFLINE" not in env_of(job)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_cache_pvc": "Bad_Name"}, "not a PersistentVolumeClaim name"),
        ({"model_cache_pvc": "hf", "model_cache_subpath": "../etc"}, "relative folder"),
        ({"model_cache_pvc": "hf", "model_cache_subpath": "/abs"}, "relative folder"),
        ({"model_cache_subpath": "models"}, "needs --model-cache-pvc"),
    ],
)
def test_should_refuse_the_cache_when_kubernetes_would_reject_it(overrides, message):
    with pytest.raises(SpecError, match=message):
        config(**overrides)


def test_should_refuse_a_model_cache_when_the_serving_downloads_no_model():
    with pytest.raises(SpecError, match="loads no model"):
        config("caption", model_cache_pvc="hf-cache")


# --- the pull and list Jobs ---------------------------------------------------------------------


def test_should_build_a_restricted_cpu_pull_job_with_a_write_mount_when_a_model_is_pulled():
    job = build_pull_job(
        FLUX,
        pvc="hf-cache",
        namespace=NS,
        image="ghcr.io/dfk8s/dfk8s-cpu:0.1.0",
        subpath="models",
        revision="main",
        hf_token_secret=("hf", "HF_TOKEN"),
    )
    validate(job)
    assert_restricted(job)
    assert job["metadata"]["name"] == pull_job_name(FLUX, "hf-cache", "models", "main")
    assert len(job["metadata"]["name"]) <= 63
    container = only_container(job)
    assert container["command"] == [
        "dfk8s",
        "model",
        "pull",
        FLUX,
        "--to",
        "/cache/huggingface",
        "--revision",
        "main",
    ]
    assert cache_volume(job) == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
    assert cache_mount(job) == {"name": "model-cache", "mountPath": "/cache", "subPath": "models"}
    assert "nvidia.com/gpu" not in json.dumps(job) and "nodeSelector" not in pod(job)
    assert pod(job)["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    env = env_of(job)
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}
    assert env["HF_HOME"]["value"] == "/cache/huggingface" and "HF_HUB_OFFLINE" not in env
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "pull", "operator": "In", "values": [42]},
    } in rules
    assert job["spec"]["backoffLimit"] >= 1  # a retry resumes: finished files stay on the claim
    # The same pull gets the same name (two never race); another cache, another name.
    assert pull_job_name(FLUX, "hf-cache", "models", "main") != pull_job_name(FLUX, "other", "models", "main")
    # The pull makes FLUX's compile-cache folder beside the models, as the pods' user (issue 18).
    assert env["DFK8S_COMPILE_CACHE"]["value"] == "/cache/dfk8s-compile"


def test_should_make_the_compile_cache_folder_when_a_model_is_pulled_with_it_set(tmp_path, monkeypatch):
    from dfk8s.cli.model import _make_compile_cache

    monkeypatch.setenv("DFK8S_COMPILE_CACHE", str(tmp_path / "cache" / "dfk8s-compile"))
    _make_compile_cache()
    assert (tmp_path / "cache" / "dfk8s-compile").is_dir()


def test_should_mount_the_claim_read_only_when_the_list_job_is_built():
    job = build_list_job(pvc="hf-cache", namespace=NS, image="ghcr.io/dfk8s/dfk8s-cpu:0.1.0")
    validate(job)
    assert_restricted(job)
    assert cache_volume(job)["persistentVolumeClaim"] == {"claimName": "hf-cache", "readOnly": True}
    assert cache_mount(job)["readOnly"] is True
    assert only_container(job)["command"][:4] == ["dfk8s", "model", "list", "--dir"]


def test_should_refuse_a_token_value_or_a_bad_model_when_the_pull_job_is_built():
    with pytest.raises(SpecError, match="secret reference"):
        build_pull_job(FLUX, pvc="hf", namespace=NS, image="i:1", hf_token_secret=("hf_abc",))
    with pytest.raises(SpecError, match="not a Hub model name"):
        build_pull_job("/models/flux", pvc="hf", namespace=NS, image="i:1")


# --- warnings -----------------------------------------------------------------------------------


def test_should_warn_once_per_problem_when_gpu_pods_each_download_a_gated_model():
    warnings = model_cache_warnings(config(shards=12), None)
    assert warnings == [
        f"each of the 12 GPU pods (one per shard) downloads {FLUX} (~34 GB) into its own emptyDir cache, "
        f"~408 GB in all: pull it once with `dfk8s model pull {FLUX} --pvc NAME` and submit with "
        "--model-cache-pvc NAME",
        f"{FLUX} is a gated model and the pods get no Hugging Face token: every pod will fail to download "
        "it; pass --hf-token-secret NAME/KEY (a Secret with the token of an account that accepted its "
        "licence), "
        f"or pull it once (`dfk8s model pull {FLUX} --pvc NAME --hf-token-secret NAME/KEY`) and submit with "
        "--model-cache-pvc NAME",
    ]
    assert all("\n" not in line for line in warnings)


def test_should_not_warn_when_the_cache_is_shared_or_the_token_is_given():
    assert model_cache_warnings(config(model_cache_pvc="hf-cache"), FLUX) == []
    token = model_cache_warnings(config(hf_token_secret=("hf", "HF_TOKEN")), FLUX)
    assert len(token) == 1 and token[0].startswith("each of the 12 GPU pods")
    assert model_cache_warnings(config(shards=1, hf_token_secret=("hf", "HF_TOKEN")), FLUX) == []
    assert model_cache_warnings(config(), "/models/flux") == []  # a folder: no download
    assert model_cache_warnings(config("caption"), None) == []
    assert model_cache_warnings(config(gpus=0), "some-org/model") == []


def test_should_leave_the_size_out_when_the_model_is_not_known():
    (line,) = model_cache_warnings(config(shards=3), "some-org/sdxl-flux")
    assert line.startswith("each of the 3 GPU pods (one per shard) downloads some-org/sdxl-flux into its own")
    assert "GB" not in line
    # check_credentials' generic token line (HF_TOKEN set here, none for the pods) stays for other models,
    # and goes where the gated line says more or the pods load offline from a shared cache.
    generic = [HF_TOKEN_WARNING]
    assert (
        merge_warnings(generic, model_cache_warnings(config(shards=1), "some-org/m"), config(shards=1))
        == generic
    )
    gated = model_cache_warnings(config(shards=1), FLUX)
    assert merge_warnings(generic, gated, config(shards=1)) == gated
    shared = config(model_cache_pvc="hf-cache")
    assert merge_warnings(generic, model_cache_warnings(shared, FLUX), shared) == []


# --- the CLI ------------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def submit_dry_run(tmp_path, bucket, *extra):
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"conversations": [{"role": "user", "content": f"a cat {i}"}]}) + "\n"
            for i in range(6)
        )
    )
    return invoke(
        "submit",
        "-p",
        "text2image",
        "--input",
        manifest,
        "--output",
        f"s3://{bucket}/runs",
        "-n",
        NS,
        "--rows-per-shard",
        "2",
        "--service-account",
        "dfk8s-reducer",
        "--dry-run",
        *extra,
    )


def test_should_print_both_warnings_when_a_flux_submit_has_no_shared_cache(tmp_path, s3_bucket):
    result = submit_dry_run(tmp_path, s3_bucket)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert (
        sum(
            "each of the 3 GPU pods" in line and "~34 GB" in line and "~102 GB in all" in line
            for line in lines
        )
        == 1
    )
    assert sum(f"{FLUX} is a gated model" in line for line in lines) == 1


def test_should_mount_the_claim_and_not_warn_when_submitted_with_model_cache_pvc(tmp_path, s3_bucket):
    result = submit_dry_run(
        tmp_path, s3_bucket, "--model-cache-pvc", "hf-cache", "--model-cache-subpath", "m"
    )
    assert result.exit_code == 0, result.output
    assert "GPU pods" not in result.stderr and "gated" not in result.stderr
    map_job, reduce_job = yaml.safe_load_all(result.stdout)
    validate(map_job)
    assert cache_volume(map_job)["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert cache_mount(map_job)["subPath"] == "m" and cache_mount(map_job)["readOnly"] is True
    assert env_of(map_job)["HF_HUB_OFFLINE"]["value"] == "1"
    assert "model-cache" not in json.dumps(reduce_job)


def test_should_print_the_pull_job_when_pull_pvc_is_a_dry_run():
    result = invoke(
        "model", "pull", FLUX, "--pvc", "hf-cache", "-n", NS, "--hf-token-secret", "hf/HF_TOKEN", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    (job,) = yaml.safe_load_all(result.stdout)
    validate(job)
    assert job["metadata"]["namespace"] == NS
    assert only_container(job)["image"].startswith("ghcr.io/dfk8s/dfk8s-cpu:")
    assert "would pull" in result.stderr


def test_should_refuse_flags_of_the_other_target_when_pull_is_called():
    assert invoke("model", "pull", FLUX).exit_code == 2
    assert invoke("model", "pull", FLUX, "--to", "d", "--pvc", "p").exit_code == 2
    result = invoke("model", "pull", FLUX, "--to", "d", "--hf-token-secret", "hf/HF_TOKEN")
    assert result.exit_code == 2 and "--hf-token-secret is for --pvc" in result.output


def test_should_read_the_claim_and_subpath_when_a_profile_names_them(tmp_path, monkeypatch):
    from dfk8s.kube.profiles import JOBS_DIR_ENV

    text = (load_profile("text2image").source).read_text()
    shared = text.replace(
        "      size: 100Gi\n      # pvc: hf-cache\n", "      pvc: hf-cache\n      subpath: models\n"
    )
    assert shared != text
    (tmp_path / "text2image.yaml").write_text(shared)
    monkeypatch.setenv(JOBS_DIR_ENV, str(tmp_path))
    assert load_profile("text2image").model_cache == ModelCache(pvc="hf-cache", subpath="models")
    (tmp_path / "text2image.yaml").write_text(
        text.replace("      # pvc: hf-cache\n", "      subpath: models\n")
    )
    with pytest.raises(SpecError, match="only a `pvc` cache has a subpath"):
        load_profile("text2image")
