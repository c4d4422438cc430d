"""The Kubernetes executor: plan a run to S3, create its map and reduce Jobs, follow it, report on it.

``dfk8s submit`` / ``status`` / ``list`` / ``cancel`` call these functions; they are usable from
Python without click. The Jobs themselves come from :mod:`dfk8s.kube.manifests`; what is asked of the
cluster goes through :mod:`dfk8s.kube.client`.

This module is the public face; the code lives in three private modules:

* :mod:`dfk8s.kube._cluster_options`: the cluster flags (:class:`ClusterOptions`, the ``parse_*``
  readers, :func:`check_credentials`) and their mapping to a :class:`~dfk8s.kube.manifests.KubeRunConfig`;
* :mod:`dfk8s.kube._submit`: :func:`submit`, :func:`dry_run` and the API time estimate;
* :mod:`dfk8s.kube._run_status`: a run's state, :func:`run_status`, :func:`list_runs`,
  :func:`cancel_run` and :func:`follow_run`.

Secrets policy: a credential reaches the pods only as a Secret reference (``--api-key-secret``,
``--s3-secret``, ``--hf-token-secret``). Submitting never reads a key's value: an API serving
without ``--api-key-secret`` is refused (its pods would all exit 42), whether or not the key is set
in this shell, and the message says how to create the Secret.
"""

from __future__ import annotations

from dfk8s.kube._cluster_options import (
    API_SERVINGS,
    ClusterOptions,
    check_credentials,
    cpu_image,
    kube_run_config,
    parse_node_selector,
    parse_secret_ref,
    parse_toleration,
)
from dfk8s.kube._run_status import (
    RunRow,
    RunStatus,
    StoppedWaiting,
    cancel_run,
    follow_run,
    list_runs,
    run_state,
    run_status,
)
from dfk8s.kube._submit import (
    DryRun,
    Estimate,
    Submission,
    apply_profile_defaults,
    count_plan,
    create_jobs,
    dry_run,
    estimate_api_time,
    submit,
)

__all__ = [
    "API_SERVINGS",
    "ClusterOptions",
    "DryRun",
    "Estimate",
    "RunRow",
    "RunStatus",
    "StoppedWaiting",
    "Submission",
    "apply_profile_defaults",
    "cancel_run",
    "check_credentials",
    "count_plan",
    "cpu_image",
    "create_jobs",
    "dry_run",
    "estimate_api_time",
    "follow_run",
    "kube_run_config",
    "list_runs",
    "parse_node_selector",
    "parse_secret_ref",
    "parse_toleration",
    "run_state",
    "run_status",
    "submit",
]
