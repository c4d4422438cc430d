"""Kubernetes objects for dfk8s runs: the Jobs of a run, the cluster flags behind them, the supported range.

Pure builders only (the thin API client is :mod:`dfk8s.kube.client`); submitting, following, reading and
cancelling a run is the Kubernetes executor's job (:mod:`dfk8s.executors.kubernetes`).
"""

from dfk8s.kube._cluster_options import (
    API_SERVINGS,
    HF_TOKEN_WARNING,
    ClusterOptions,
    check_credentials,
    parse_node_selector,
    parse_secret_ref,
    parse_toleration,
)
from dfk8s.kube.manifests import (
    KubeRunConfig,
    build_map_job,
    build_reduce_job,
    build_run_objects,
    cpu_image,
    kube_run_config,
    map_job_name,
    reduce_job_name,
    run_labels,
    to_yaml,
)
from dfk8s.kube.versions import SUPPORTED_KUBERNETES, is_supported

__all__ = [
    "API_SERVINGS",
    "HF_TOKEN_WARNING",
    "SUPPORTED_KUBERNETES",
    "ClusterOptions",
    "KubeRunConfig",
    "build_map_job",
    "build_reduce_job",
    "build_run_objects",
    "check_credentials",
    "cpu_image",
    "is_supported",
    "kube_run_config",
    "map_job_name",
    "parse_node_selector",
    "parse_secret_ref",
    "parse_toleration",
    "reduce_job_name",
    "run_labels",
    "to_yaml",
]
