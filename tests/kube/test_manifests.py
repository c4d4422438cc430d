"""dfk8s.kube.manifests: the map and reduce Jobs of a run, validated against the supported versions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from dfk8s.errors import SpecError
from dfk8s.kube import (
    SUPPORTED_KUBERNETES,
    KubeRunConfig,
    build_map_job,
    build_reduce_job,
    build_run_objects,
    is_supported,
    to_yaml,
)
from dfk8s.kube.profiles import ModelCache, load_profile
from dfk8s.kube.versions import parse_minor, validator_versions

kubernetes_validate = pytest.importorskip("kubernetes_validate")

PROFILES = [
    ("caption", "openai-chat"),
    ("vqa", "openai-chat"),
    ("text2image", "diffusers"),
    ("text2image", "openai-images"),
    ("text2image", "gemini-images"),
    ("imageedit", "diffusers"),
    ("imageedit", "openai-images"),
    ("imageedit", "gemini-images"),
]
FAKE_SECRET = "sk-THIS-MUST-NEVER-APPEAR"


@pytest.fixture(autouse=True)
def _cached_schemas(k8s_schema_cache):
    """Every test here validates objects: read each schema file once."""


@pytest.fixture(autouse=True)
def _repo_profiles(monkeypatch):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)


def make_config(pipeline: str = "caption", serving: str | None = None, **overrides) -> KubeRunConfig:
    profile = load_profile(pipeline, serving)
    fields = {
        "run_id": "r20250101-abc",
        "pipeline": pipeline,
        "serving": profile.serving,
        "run_uri": "s3://bucket/runs/r20250101-abc",
        "shards": 10,
        "parallelism": 4,
        "namespace": "batch",
        "profile": profile,
    }
    fields.update(overrides)
    return KubeRunConfig(**fields)


def full_config(pipeline: str = "text2image", serving: str | None = None, **overrides) -> KubeRunConfig:
    """A config with every optional part set."""
    fields = {
        "s3_endpoint": "http://seaweedfs.batch.svc:8333",
        "queue": "team-a",
        "api_key_secret": ("api-creds", "DF_API_KEY"),
        "s3_secret": "s3-creds",
        "hf_token_secret": ("hf-creds", "HF_TOKEN"),
        "service_account": "demo-dfk8s-reducer",
        "extra_env": {"DF_BASE_URL": "http://fake-api.batch.svc:8000/v1"},
    }
    fields.update(overrides)
    return make_config(pipeline, serving, **fields)


def validate(obj: dict) -> None:
    for version in SUPPORTED_KUBERNETES:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            raise AssertionError(
                f"{obj['metadata']['name']} invalid for {version} at {where}: {exc.message}"
            ) from None


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    (only,) = pod_spec(job)["containers"]
    return only


def env_of(job: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container(job)["env"]}


# --- the supported range ------------------------------------------------------------------------


def test_should_validate_against_shipped_schemas_when_the_range_is_pinned():
    available = validator_versions()
    oldest, newest = SUPPORTED_KUBERNETES
    assert oldest in available and newest in available
    assert parse_minor(oldest) < parse_minor(newest)


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("v1.33.0", True),
        ("v1.32.9", False),
        ("v1.29.0", False),
        ("1.37", True),
        ("v1.35.4-eks-1234", True),
        ("v1.28.9", False),
        ("v1.38.0", False),
        ("v2.0.0", False),
    ],
)
def test_should_compare_major_and_minor_when_a_server_version_is_checked(version, supported):
    assert is_supported(version) is supported


def test_should_refuse_the_string_when_it_is_not_a_version():
    with pytest.raises(ValueError, match="not a Kubernetes version"):
        parse_minor("latest")


# --- both Jobs for every profile ----------------------------------------------------------------


@pytest.mark.parametrize(("pipeline", "serving"), PROFILES)
def test_should_build_valid_jobs_when_each_profile_is_used(pipeline, serving):
    for cfg in (make_config(pipeline, serving), full_config(pipeline, serving)):
        objects = build_run_objects(cfg)
        assert [obj["metadata"]["name"] for obj in objects] == [
            "dfk8s-r20250101-abc-map",
            "dfk8s-r20250101-abc-reduce",
        ]
        for obj in objects:
            validate(obj)


@pytest.mark.parametrize("pipeline", ["caption", "vqa"])
def test_should_leave_out_every_gpu_part_when_the_profile_is_cpu(pipeline):
    job = build_map_job(full_config(pipeline))
    spec = pod_spec(job)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert "nvidia.com/gpu" not in container(job)["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in container(job)["resources"].get("requests", {})
    assert [volume["name"] for volume in spec["volumes"]] == ["tmp"]
    assert "HF_HOME" not in env_of(job)
    assert container(job)["image"].startswith("ghcr.io/dfk8s/dfk8s-cpu:")


@pytest.mark.parametrize("pipeline", ["text2image", "imageedit"])
def test_should_request_a_gpu_node_when_the_profile_is_diffusers(pipeline):
    job = build_map_job(make_config(pipeline))
    spec = pod_spec(job)
    resources = container(job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in resources["requests"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "100Gi"}
    mounts = {mount["name"]: mount["mountPath"] for mount in container(job)["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "dshm": "/dev/shm", "model-cache": "/cache"}
    assert env_of(job)["HF_HOME"]["value"] == "/cache/huggingface"
    assert container(job)["image"].startswith("ghcr.io/dfk8s/dfk8s-gpu:")


def test_should_mount_the_claim_when_the_model_cache_is_a_pvc():
    cfg = make_config("text2image")
    profile = dataclasses.replace(cfg.profile, model_cache=ModelCache(pvc="hf-cache"))
    job = build_map_job(dataclasses.replace(cfg, profile=profile))
    volumes = {volume["name"]: volume for volume in pod_spec(job)["volumes"]}
    # Shared and filled once by `dfk8s model pull --pvc` (issue 13): FLUX workers read the models through a
    # read-only mount, and write only their compile cache's folder (issue 18).
    assert volumes["model-cache"] == {"name": "model-cache",
                                      "persistentVolumeClaim": {"claimName": "hf-cache"}}
    mounts = {m["mountPath"]: m for m in pod_spec(job)["containers"][0]["volumeMounts"]}
    assert mounts["/cache"]["readOnly"] is True and "readOnly" not in mounts["/compile-cache"]
    validate(job)


# --- the map Job ----------------------------------------------------------------------------------


def test_should_make_an_indexed_job_when_the_map_job_is_built():
    job = build_map_job(make_config(shards=10, parallelism=4))
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"] == {
        "name": "dfk8s-r20250101-abc-map",
        "namespace": "batch",
        "labels": job["metadata"]["labels"],
    }
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (10, 4)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (2, 10)
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert "suspend" not in spec and "backoffLimit" not in spec
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert container(job)["name"] == "worker"
    assert container(job)["command"] == ["dfk8s", "worker", "--run", "s3://bucket/runs/r20250101-abc"]


def test_should_cap_parallelism_at_the_shard_count_when_parallelism_is_larger():
    job = build_map_job(make_config(shards=3, parallelism=50))
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3)


def test_should_use_the_given_limits_when_backoff_and_failure_limits_are_set():
    job = build_map_job(
        make_config(backoff_limit_per_index=5, max_failed_indexes=1, ttl_seconds_after_finished=60)
    )
    assert (job["spec"]["backoffLimitPerIndex"], job["spec"]["maxFailedIndexes"]) == (5, 1)
    assert job["spec"]["ttlSecondsAfterFinished"] == 60


def test_should_ignore_disruptions_and_fail_the_index_on_exit_42_when_the_map_job_is_built():
    rules = build_map_job(make_config())["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailIndex", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [42]}},
    ]


def test_should_label_the_job_and_its_pods_when_the_map_job_is_built():
    job = build_map_job(make_config("text2image"))
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "dfk8s"
        assert labels["dfk8s.io/run"] == "r20250101-abc"
        assert labels["dfk8s.io/pipeline"] == "text2image"
        assert labels["dfk8s.io/component"] == "map"
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_should_label_and_suspend_the_map_job_when_queue_is_set():
    map_job, reduce_job = build_run_objects(make_config(queue="team-a"))
    assert map_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert map_job["spec"]["suspend"] is True
    # The reducer needs no quota and must not wait in the queue behind its own map Job.
    assert "kueue.x-k8s.io/queue-name" not in reduce_job["metadata"]["labels"]
    assert "suspend" not in reduce_job["spec"]


def test_should_run_restricted_without_a_token_when_the_map_job_is_built():
    spec = pod_spec(build_map_job(full_config()))
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    security = spec["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}} in spec["volumes"]


def test_should_set_the_worker_env_when_every_option_is_set():
    env = env_of(build_map_job(full_config()))
    assert env["DFK8S_LOG_FORMAT"] == {"name": "DFK8S_LOG_FORMAT", "value": "json"}
    assert env["HOME"]["value"] == "/tmp"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://seaweedfs.batch.svc:8333"
    assert env["DF_BASE_URL"]["value"] == "http://fake-api.batch.svc:8000/v1"
    assert env["DF_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "api-creds", "key": "DF_API_KEY"}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-creds", "key": "HF_TOKEN"}}
    # Kubernetes sets JOB_COMPLETION_INDEX itself; dfk8s must not shadow it.
    assert "JOB_COMPLETION_INDEX" not in env


def test_should_read_the_key_from_the_named_variable_when_api_key_env_is_set():
    env = env_of(build_map_job(full_config("caption", api_key_env="OPENAI_API_KEY")))
    assert "DF_API_KEY" not in env
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "api-creds", "key": "DF_API_KEY"}


def test_should_set_no_credentials_when_no_secret_is_given():
    env = env_of(build_map_job(make_config()))
    assert set(env) == {"DFK8S_LOG_FORMAT", "HOME"}


# --- overrides ------------------------------------------------------------------------------------


def test_should_use_the_override_when_gpus_is_set():
    job = build_map_job(make_config("text2image", gpus=2))
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    validate(job)


def test_should_run_on_cpu_nodes_when_gpus_is_zero_on_a_gpu_profile():
    job = build_map_job(make_config("text2image", gpus=0))
    spec = pod_spec(job)
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    assert "nodeSelector" not in spec and "tolerations" not in spec
    validate(job)


def test_should_refuse_gpus_when_the_serving_runs_on_cpu():
    with pytest.raises(SpecError, match="runs on CPU"):
        make_config("caption", gpus=1)


def test_should_replace_the_profile_scheduling_when_node_selector_and_tolerations_are_set():
    tolerations = ({"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},)
    job = build_map_job(make_config("text2image", node_selector={"pool": "a100"}, tolerations=tolerations))
    assert pod_spec(job)["nodeSelector"] == {"pool": "a100"}
    assert pod_spec(job)["tolerations"] == [dict(tolerations[0])]
    job = build_map_job(make_config("text2image", node_selector={}, tolerations=()))
    assert "nodeSelector" not in pod_spec(job) and "tolerations" not in pod_spec(job)


def test_should_use_the_given_images_when_image_and_reducer_image_are_set():
    cfg = make_config(
        "text2image", image="registry.local/dfk8s-gpu:dev", reducer_image="registry.local/dfk8s-cpu:dev"
    )
    map_job, reduce_job = build_run_objects(cfg)
    assert container(map_job)["image"] == "registry.local/dfk8s-gpu:dev"
    assert container(reduce_job)["image"] == "registry.local/dfk8s-cpu:dev"
    assert container(build_reduce_job(make_config("text2image")))["image"] == cfg.profile.image


# --- the reduce Job -------------------------------------------------------------------------------


def test_should_wait_for_the_map_job_when_the_reduce_job_is_built():
    job = build_reduce_job(full_config())
    spec = job["spec"]
    assert job["metadata"]["name"] == "dfk8s-r20250101-abc-reduce"
    assert job["metadata"]["labels"]["dfk8s.io/component"] == "reduce"
    assert job["spec"]["template"]["metadata"]["labels"]["dfk8s.io/run"] == "r20250101-abc"
    assert spec["backoffLimit"] == 3 and "completionMode" not in spec and "parallelism" not in spec
    assert container(job)["command"] == [
        "dfk8s",
        "reduce",
        "s3://bucket/runs/r20250101-abc",
        "--wait-job",
        "dfk8s-r20250101-abc-map",
        "--namespace",
        "batch",
    ]
    assert spec["podFailurePolicy"]["rules"][1] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "reducer", "operator": "In", "values": [42]},
    }


def test_should_mount_the_reducer_token_when_service_account_is_set():
    spec = pod_spec(build_reduce_job(full_config()))
    assert spec["serviceAccountName"] == "demo-dfk8s-reducer"
    assert spec["automountServiceAccountToken"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    security = spec["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"] == {"drop": ["ALL"]}
    assert "nodeSelector" not in spec and "tolerations" not in spec


def test_should_give_the_reducer_only_storage_credentials_when_every_secret_is_set():
    env = env_of(build_reduce_job(full_config()))
    assert set(env) == {
        "DFK8S_LOG_FORMAT",
        "HOME",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }


# --- secrets and serialisation --------------------------------------------------------------------


def test_should_keep_secret_values_out_of_the_manifest_when_secrets_are_referenced():
    cfg = full_config("text2image")
    text = to_yaml(build_run_objects(cfg))
    documents = list(yaml.safe_load_all(text))
    for document in documents:
        for item in container(document)["env"]:
            if item["name"] in {"DF_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"}:
                assert "value" not in item and set(item["valueFrom"]) == {"secretKeyRef"}


@pytest.mark.parametrize(
    "name",
    [
        "DF_API_KEY",
        "OPENAI_API_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "MY_PASSWORD",
        "GEMINI_API_KEY",
        "Service_Token",
    ],
)
def test_should_refuse_a_credential_when_it_is_passed_as_extra_env(name):
    with pytest.raises(SpecError):
        make_config(extra_env={name: FAKE_SECRET})


def test_should_never_write_a_secret_value_when_one_is_passed_the_wrong_way():
    # Every way a caller might slip a secret into the config either fails or never reaches the YAML.
    attempts = [
        {"extra_env": {"OPENAI_API_KEY": FAKE_SECRET}},
        {"extra_env": {"DF_API_KEY": FAKE_SECRET}},
        {"extra_env": {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}},
        {"api_key_secret": (FAKE_SECRET,)},
    ]
    for overrides in attempts:
        try:
            text = to_yaml(build_run_objects(full_config(**overrides)))
        except SpecError as exc:
            assert FAKE_SECRET not in str(exc)
            continue
        assert FAKE_SECRET not in text, overrides
    # Through the right path the value never appears either: only the Secret's name and key do.
    text = to_yaml(build_run_objects(full_config(api_key_secret=("api-creds", "DF_API_KEY"))))
    assert FAKE_SECRET not in text


def test_should_round_trip_without_anchors_when_objects_are_serialised():
    objects = build_run_objects(full_config())
    text = to_yaml(objects)
    assert text.startswith("---\n")
    assert "&id" not in text and "*id" not in text
    assert list(yaml.safe_load_all(text)) == objects


# --- refusing configs Kubernetes would reject -----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"run_id": "Run_1"}, "cannot name a Kubernetes Job"),
        ({"run_id": "r" * 51}, "cannot name a Kubernetes Job"),
        ({"run_uri": "/tmp/runs/r1"}, "needs S3 storage"),
        ({"shards": 0}, "shards must be between"),
        ({"shards": 100_001}, "shards must be between"),
        ({"parallelism": 0}, "parallelism must be at least 1"),
        ({"namespace": "Batch"}, "invalid namespace"),
        ({"max_failed_indexes": 11}, "max_failed_indexes"),
        ({"backoff_limit_per_index": -1}, "backoff_limit_per_index"),
        ({"api_key_secret": ("only-name",)}, "secret reference"),
        ({"api_key_env": "DF-API-KEY"}, "invalid env var name"),
        ({"extra_env": {"HOME": "/root"}}, "set by dfk8s"),
        ({"gpus": -1}, "gpus must be >= 0"),
    ],
)
def test_should_refuse_the_config_when_kubernetes_would_reject_it(overrides, message):
    with pytest.raises(SpecError, match=message):
        make_config(**overrides)


def test_should_refuse_the_profile_when_it_belongs_to_another_serving():
    with pytest.raises(SpecError, match="profile is for caption/openai-chat, not caption/diffusers"):
        dataclasses.replace(make_config("caption"), serving="diffusers")


def test_should_accept_the_longest_run_id_when_job_names_fit_63_characters():
    cfg = make_config(run_id="r" * 50)
    for obj in build_run_objects(cfg):
        assert len(obj["metadata"]["name"]) <= 63
        validate(obj)


# --- a self-hosted VLM: the engine as a native sidecar ------------------------------------------


@pytest.mark.parametrize("pipeline", ["caption", "vqa"])
def test_should_run_vllm_as_a_native_sidecar_holding_the_gpu_when_the_serving_is_vllm(pipeline):
    cfg = full_config(pipeline, "vllm", model_cache_pvc="hf-cache", gpus=2, engine_options={
        "model": "Qwen/Qwen2.5-VL-7B-Instruct", "max_model_len": 8192, "engine_args": ["max-num-seqs=64"]})
    job = build_map_job(cfg)
    validate(job)
    spec = pod_spec(job)
    (engine,) = spec["initContainers"]
    assert engine["name"] == "engine" and engine["restartPolicy"] == "Always"  # native sidecar
    assert engine["image"] == "vllm/vllm-openai:v0.11.0"
    assert engine["command"] == [
        "vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct", "--host", "127.0.0.1", "--port", "8000",
        "--served-model-name", "Qwen/Qwen2.5-VL-7B-Instruct", "--limit-mm-per-prompt",
        f'{{"image": {1 if pipeline == "caption" else 4}}}', "--tensor-parallel-size", "2",
        "--max-model-len", "8192", "--max-num-seqs", "64"]
    # Loopback only (no authentication): the probe runs in the container, not from the kubelet.
    assert "--host" in engine["command"] and engine["command"][engine["command"].index("--host") + 1] == \
        "127.0.0.1"
    assert engine["startupProbe"]["exec"]["command"][:2] == ["python3", "-c"]
    assert "http://127.0.0.1:8000/health" in engine["startupProbe"]["exec"]["command"][2]
    assert engine["startupProbe"]["periodSeconds"] * engine["startupProbe"]["failureThreshold"] == 900
    # The engine holds the GPUs; the worker container stays small.
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in container(job)["resources"].get("limits", {})
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # Weights read-only from the model cache, the Hub offline; the token only as a Secret reference.
    engine_env = {item["name"]: item for item in engine["env"]}
    assert engine_env["HF_HUB_OFFLINE"]["value"] == "1"
    assert engine_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-creds", "key": "HF_TOKEN"}
    cache = next(m for m in engine["volumeMounts"] if m["name"] == "model-cache")
    assert cache["readOnly"] is True
    # Only FLUX pods compile: a self-hosted VLM's claim stays read-only, with no compile-cache mount.
    (volume,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert "/compile-cache" not in json.dumps(spec)
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(job)["DFK8S_ENGINE_URL"]["value"] == "http://127.0.0.1:8000/v1"
    assert env_of(job)["DFK8S_ENGINE_GPUS"]["value"] == "2"  # for the summary's GPU-seconds
    assert "hf-creds" not in json.dumps(engine["command"])


def test_should_run_transformers_serve_as_the_sidecar_when_the_serving_is_transformers():
    job = build_map_job(make_config("caption", "transformers", engine_options={"model": "org/tiny-vlm"}))
    validate(job)
    (engine,) = pod_spec(job)["initContainers"]
    assert engine["command"][:3] == ["transformers", "serve", "org/tiny-vlm"]
    assert "nvidia.com/gpu" not in engine["resources"].get("limits", {})


def test_should_refuse_an_engine_serving_without_a_model():
    with pytest.raises(SpecError, match="needs --model"):
        build_map_job(make_config("caption", "vllm", engine_options={}))
