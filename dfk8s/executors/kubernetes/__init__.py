"""The Kubernetes executor: plan a run to S3, create its map and reduce Jobs, follow it, report on it.

``dfk8s submit`` / ``status`` / ``list`` / ``cancel`` call these; they are usable from Python
without click. The Jobs themselves, and the cluster flags they are built from, come from
:mod:`dfk8s.kube`; what is asked of the cluster goes through :mod:`dfk8s.kube.client`.

This module is the public face; the code lives in private modules:

* :mod:`dfk8s.executors.kubernetes._executor`: :class:`KubernetesExecutor`, the
  :class:`~dfk8s.executors.base.Executor` (start, follow, status, cancel) over the functions below;
* :mod:`dfk8s.executors.kubernetes._submit`: :func:`submit` (plan, then :func:`start_jobs`),
  :func:`dry_run` and the API time estimate;
* :mod:`dfk8s.executors.kubernetes._run_status`: a run's state, :func:`run_status`, :func:`list_runs`,
  :func:`cancel_run` and :func:`follow_run`;
* :mod:`dfk8s.executors.kubernetes.wait` (public: the reduce Job runs it): a Job's state, and waiting
  for a Job to end.

Secrets policy: a credential reaches the pods only as a Secret reference (``--api-key-secret``,
``--s3-secret``, ``--hf-token-secret``). Submitting never reads a key's value: an API serving
without ``--api-key-secret`` is refused (its pods would all exit 42), whether or not the key is set
in this shell, and the message says how to create the Secret.
"""

from __future__ import annotations

from dfk8s.executors.kubernetes._executor import KubernetesExecutor
from dfk8s.executors.kubernetes._run_status import (
    RunRow,
    StoppedWaiting,
    cancel_run,
    follow_run,
    list_runs,
    run_state,
    run_status,
)
from dfk8s.executors.kubernetes._submit import (
    DryRun,
    Estimate,
    Submission,
    apply_profile_defaults,
    check_cluster,
    count_plan,
    create_jobs,
    dry_run,
    estimate_api_time,
    start_jobs,
    submit,
)
from dfk8s.executors.kubernetes.wait import JobState

__all__ = [
    "DryRun",
    "Estimate",
    "JobState",
    "KubernetesExecutor",
    "RunRow",
    "StoppedWaiting",
    "Submission",
    "apply_profile_defaults",
    "cancel_run",
    "check_cluster",
    "count_plan",
    "create_jobs",
    "dry_run",
    "estimate_api_time",
    "follow_run",
    "list_runs",
    "run_state",
    "run_status",
    "start_jobs",
    "submit",
]
