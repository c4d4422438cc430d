"""Kubernetes objects for dfk8s runs: the Jobs of a run and the supported Kubernetes range."""

from dfk8s.kube.manifests import (
    KubeRunConfig,
    build_map_job,
    build_reduce_job,
    build_run_objects,
    map_job_name,
    reduce_job_name,
    run_labels,
    to_yaml,
)
from dfk8s.kube.versions import SUPPORTED_KUBERNETES, is_supported

__all__ = [
    "SUPPORTED_KUBERNETES",
    "KubeRunConfig",
    "build_map_job",
    "build_reduce_job",
    "build_run_objects",
    "is_supported",
    "map_job_name",
    "reduce_job_name",
    "run_labels",
    "to_yaml",
]
