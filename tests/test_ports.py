"""Ports for child servers stay free until the child binds them, and SeaweedFS starts on a busy machine.

CI once failed because the S3 server of `dfk8s-cluster up` exited while it started: its ports came from
the kernel's ephemeral range (bind to port 0), and the busy cluster beside it took one for an outgoing
connection before SeaweedFS bound it. The error said "did not start in 60.0s" after a few seconds, and
the server's log went with its data folder.
"""

from __future__ import annotations

import socket

import pytest

from dfk8s import ports
from dfk8s.ports import NODE_PORTS, ephemeral_range, listen_port
from tests.helpers import seaweed as seaweed_helper


def _bound(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, port))  # bound, not listening: a server that binds it fails, a client is refused
    return sock


def test_a_listen_port_is_free_and_below_the_ephemeral_range():
    first = ephemeral_range()[0]
    for _ in range(50):
        port = listen_port()
        assert ports.LOWEST <= port < min(first, NODE_PORTS)
        _bound(port).close()  # free


def test_the_offset_ports_are_free_and_below_the_ephemeral_range_too():
    first = ephemeral_range()[0]
    for _ in range(50):
        port = listen_port(also=(10000,))
        assert port + 10000 < min(first, NODE_PORTS)


def test_a_taken_or_promised_port_is_not_chosen(monkeypatch):
    taken = listen_port()
    promised = listen_port()
    held = _bound(taken)
    picks = iter([taken, promised, promised + 1])
    monkeypatch.setattr(ports.random, "randint", lambda low, high: next(picks))
    try:
        assert listen_port(avoid={promised}) == promised + 1
    finally:
        held.close()


def test_a_kernel_without_room_below_its_ephemeral_range_still_gets_a_free_port(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = listen_port(also=(10000,))
    assert port + 10000 <= 65535
    _bound(port).close()
    _bound(port + 10000).close()


def test_the_self_hosted_engine_port_comes_from_below_the_ephemeral_range(tmp_path, monkeypatch):
    from dfk8s.servings import self_hosted

    engine = self_hosted.Engine(self_hosted.EngineConfig(engine="transformers", model="tiny"),
                                log_dir=tmp_path, ready_timeout=1)
    monkeypatch.setattr(self_hosted.subprocess, "Popen", _refuse_to_start)
    with pytest.raises(OSError, match="not started in this test"):
        engine.start()
    assert ports.LOWEST <= engine.port < min(ephemeral_range()[0], NODE_PORTS)


def _refuse_to_start(*args, **kwargs):
    raise OSError("not started in this test")


@pytest.fixture
def taken_s3_ports(monkeypatch):
    """Take the S3 port of the next N starts of SeaweedFS (bound by the test before SeaweedFS binds it)."""
    real = seaweed_helper.server_ports
    held: list[socket.socket] = []
    starts = {"to_take": 0}

    def s3_port_taken(host):
        chosen = real(host)
        if starts["to_take"] > 0:
            starts["to_take"] -= 1
            held.append(_bound(chosen["s3"], host))
        return chosen

    def take(count: int) -> list[socket.socket]:
        starts["to_take"] = count
        return held

    monkeypatch.setattr(seaweed_helper, "server_ports", s3_port_taken)
    yield take
    for sock in held:
        sock.close()


@pytest.mark.slow
def test_seaweed_that_exits_while_starting_is_started_again_on_new_ports(taken_s3_ports):
    held = taken_s3_ports(1)
    server = seaweed_helper.start_seaweed()
    try:
        assert len(held) == 1 and int(server.endpoint.rsplit(":", 1)[1]) != held[0].getsockname()[1]
        server.client().list_buckets()
    finally:
        server.stop()


@pytest.mark.slow
def test_seaweed_that_cannot_start_says_it_exited_and_why(taken_s3_ports):
    held = taken_s3_ports(2)
    with pytest.raises(RuntimeError) as failed:
        seaweed_helper.start_seaweed(attempts=2)
    assert len(held) == 2
    assert "exited" in str(failed.value) and "address already in use" in str(failed.value)


@pytest.mark.slow
def test_a_stopped_seaweed_leaves_no_socket_in_tmp():
    server = seaweed_helper.start_seaweed()
    try:
        sockets = seaweed_helper.socket_files(server.command)
        assert any(path.exists() for path in sockets), "SeaweedFS no longer makes its sockets in /tmp"
    finally:
        server.stop()
    assert [path for path in sockets if path.exists()] == []
