"""A port for a server that dfk8s (or its tests) starts as a child process, chosen so it stays free.

Binding port 0 and closing the socket finds a free port in the kernel's ephemeral range: the range
every outgoing connection takes its source port from. A child then needs seconds to bind it (an engine
loads its model first; SeaweedFS starts four servers one after the other), and on a busy machine a
connection can take that port in between: the child dies with "address already in use". Ports below
the ephemeral range are never handed out that way, so a port chosen there and found free stays free
unless another server binds it on purpose.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: The lowest port chosen: above the Kubernetes node ports in use (the kubelet's 10250, 10255, ...).
LOWEST = 12000
#: Kubernetes NodePort services take 30000-32767 on a node: never chosen.
NODE_PORTS = 30000
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default; the file is absent elsewhere


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last), Linux's default where it cannot be read."""
    try:
        first, last = (int(part) for part in _EPHEMERAL_FILE.read_text().split())
        return first, last
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _usable(host: str, port: int, also: tuple[int, ...], avoid: set[int]) -> bool:
    """Whether ``port`` and its offsets are valid, not promised elsewhere, and free now."""
    wanted = [port + offset for offset in (0, *also)]
    return max(wanted) <= 65535 and not avoid.intersection(wanted) and all(_free(host, p) for p in wanted)


def listen_port(host: str = "127.0.0.1", *, also: tuple[int, ...] = (), avoid=()) -> int:
    """A port of ``host`` that is free now and below the ephemeral range, so that it stays free.

    Args:
        host: The address the server will bind.
        also: Offsets whose ports must be free too (SeaweedFS binds gRPC on port + 10000).
        avoid: Ports already promised to another server of the same start (each one checked with its
            offsets too).

    Returns:
        The port; where the range leaves no room below the ephemeral ports (a tuned kernel), one the
        kernel hands out, as before.
    """
    avoid = set(avoid)
    highest = min(ephemeral_range()[0], NODE_PORTS) - 1 - max(also, default=0)
    if highest - LOWEST >= 100:
        for _ in range(200):
            port = random.randint(LOWEST, highest)
            if _usable(host, port, also, avoid):
                return port
    for _ in range(200):  # no room below, or all taken: the kernel's choice
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if _usable(host, port, also, avoid):
            return port
    raise RuntimeError(f"no free port on {host}")
