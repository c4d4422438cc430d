"""The range of Kubernetes versions dfk8s supports, pinned in one constant.

The oldest is 1.33, the release where ``backoffLimitPerIndex`` (with ``maxFailedIndexes`` and the
``FailIndex`` pod-failure action), which the map Job relies on, became GA; older minors are out of
upstream support. The newest is the newest release the Go module proxy serves and kubernetes-validate
ships schemas for. Every object dfk8s builds is validated against both ends, and the cluster tests
(``make test-cluster``) run against a real control plane of each.
"""

from __future__ import annotations

import re

__all__ = ["SUPPORTED_KUBERNETES", "is_supported", "parse_minor", "validator_versions"]

#: (oldest, newest) supported Kubernetes minor versions, inclusive.
SUPPORTED_KUBERNETES: tuple[str, str] = ("1.33", "1.37")

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)")


def parse_minor(version: str) -> tuple[int, int]:
    """Read ``(major, minor)`` from a version string.

    Args:
        version: e.g. ``"1.30"``, ``"v1.30.2"`` or a vendor build like ``"v1.30.2-eks-1234"``.

    Returns:
        The major and minor numbers.

    Raises:
        ValueError: the string does not start with ``[v]MAJOR.MINOR``.

    """
    match = _VERSION_RE.match(version.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def is_supported(version: str) -> bool:
    """Tell whether a cluster at ``version`` is inside :data:`SUPPORTED_KUBERNETES`.

    Args:
        version: the server's git version, e.g. ``"v1.31.4"``.

    Returns:
        True when ``oldest <= version <= newest`` by major and minor.

    """
    oldest, newest = (parse_minor(bound) for bound in SUPPORTED_KUBERNETES)
    return oldest <= parse_minor(version) <= newest


def validator_versions() -> list[str]:
    """List the ``MAJOR.MINOR`` versions kubernetes-validate (a test dependency) has schemas for.

    Returns:
        Sorted oldest first, without duplicates.

    Raises:
        ImportError: kubernetes-validate is not installed (``pip install dfk8s[test]``).

    """
    import kubernetes_validate  # test-only dependency: imported here, not at module load

    minors = {parse_minor(version) for version in kubernetes_validate.utils.all_versions()}
    return [f"{major}.{minor}" for major, minor in sorted(minors)]
