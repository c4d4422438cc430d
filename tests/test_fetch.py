"""http(s) images: a real aiohttp image server, the worker's fetcher, and the SSRF guard.

Network rule: only loopback is ever contacted. The guard tests resolve names to blocked addresses
through an injected lookup (or a patched getaddrinfo) and the `loopback_only` fixture fails any
connection to an address outside 127.0.0.0/8, so a guard that let one through would fail, not leak.
"""

import asyncio
import ipaddress
import json
import socket
import time

import pytest
from PIL import Image

from dfk8s.inputs.fetch import AddressGuard, ImageFetcher
from dfk8s.inputs.images import ImageProblem
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.reduce.reducer import reduce_run
from dfk8s.run import layout
from dfk8s.worker.shard import process_shard
from tests.image_server import ImageServer

SERVER_HOST = "127.0.0.2"  # the only address the guard is told to allow; 127.0.0.1 stays blocked


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail (and record) any connection attempt to an address outside loopback."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            attempts.append(host)
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                raise AssertionError(f"test tried to connect to {host}")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return attempts


@pytest.fixture(scope="module")
def server():
    with ImageServer(SERVER_HOST) as srv:
        yield srv


def _guard():
    return AddressGuard(allowed_networks=(ipaddress.ip_network(f"{SERVER_HOST}/32"),))


def _lookup(table):
    async def lookup(host, port, family):
        if host not in table:
            raise OSError(f"test lookup has no {host}")
        address = table[host]
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam, "proto": 0, "flags": 0}]
    return lookup


def _fetch(url, **kwargs):
    async def go():
        fetcher = ImageFetcher(kwargs.pop("guard", _guard()), **kwargs)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.close()
    return asyncio.run(go())


def _problem(url, **kwargs) -> ImageProblem:
    with pytest.raises(ImageProblem) as info:
        _fetch(url, **kwargs)
    return info.value


BLOCKED = {
    "loopback": "127.0.0.1", "loopback-v6": "::1", "private-10": "10.1.2.3", "private-172": "172.16.5.4",
    "private-192": "192.168.1.10", "metadata": "169.254.169.254", "link-local-v6": "fe80::1",
    "multicast": "224.0.0.251", "multicast-v6": "ff02::1", "reserved": "240.0.0.1",
    "unspecified": "0.0.0.0", "shared-cgnat": "100.64.0.1", "unique-local-v6": "fd00::1",
    "mapped-v4-private": "::ffff:10.0.0.1", "nat64-metadata": "64:ff9b::a9fe:a9fe",
    "broadcast": "255.255.255.255",
}


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_guard_refuses_each_blocked_range_before_connecting(name, loopback_only):
    address = BLOCKED[name]
    host = f"{name}.images.test"
    problem = _problem(f"http://{host}/cat.png", guard=AddressGuard(), lookup=_lookup({host: address}))
    assert problem.type == "BlockedAddress" and address in str(problem)
    assert loopback_only == []  # refused inside the resolver: no socket was ever connected


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.0.0.7", "[::1]", "[fd00::1]"])
def test_guard_refuses_literal_addresses_without_a_lookup(address, loopback_only):
    problem = _problem(f"http://{address}:8080/x.png", guard=AddressGuard(), lookup=_lookup({}))
    assert problem.type == "BlockedAddress"
    assert loopback_only == []


def test_guard_lets_public_addresses_through_and_allowances_open_private_ones():
    guard = AddressGuard()
    for public in ("93.184.216.34", "8.8.8.8", "2606:4700::1111"):
        assert guard.blocked_reason(public) is None  # only classified, never contacted
    assert guard.blocked_reason("169.254.169.254") == "link-local"
    assert guard.blocked_reason("::ffff:127.0.0.1") == "loopback"
    assert AddressGuard(allow_private=True).blocked_reason("10.0.0.1") is None
    opened = AddressGuard(allowed_networks=(ipaddress.ip_network("10.20.0.0/16"),))
    assert opened.blocked_reason("10.20.3.4") is None and opened.blocked_reason("10.21.0.1") == "private"


def test_a_name_resolved_by_the_system_resolver_is_checked_too(monkeypatch, loopback_only):
    real = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host == "metadata.images.test":  # what a DNS rebinding attacker would answer
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port or 80))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    problem = _problem("http://metadata.images.test/latest/meta-data/", guard=AddressGuard())
    assert problem.type == "BlockedAddress" and "169.254.169.254" in str(problem)
    assert loopback_only == []


def test_good_image_redirects_and_retries(server, loopback_only):
    assert _fetch(f"{server.url}/img/a.png").mime == "image/png"
    assert _fetch(f"{server.url}/redirect/3").width == 8
    assert "more than 5 redirects" in str(_problem(f"{server.url}/redirect/9"))
    checked = _fetch(f"{server.url}/flaky.png")
    assert checked.mime == "image/png" and len(server.hits["/flaky.png"]) == 3
    _fetch(f"{server.url}/busy.png")
    first, second = server.hits["/busy.png"]
    assert second - first >= 0.9  # Retry-After: 1 was honoured
    assert set(loopback_only) == {SERVER_HOST}


def test_http_failures_carry_their_status(server):
    missing = _problem(f"{server.url}/missing.png")
    assert missing.type == "ImageFetchError" and missing.details["status"] == 404
    assert "HTTP 404" in str(missing)
    busy = _problem(f"{server.url}/always-busy.png", max_retries=2)
    assert busy.details["status"] == 429 and busy.details["fetch_attempts"] == 3
    assert len(server.hits["/always-busy.png"]) == 3


def test_limits_timeouts_and_bombs(server):
    assert "byte limit" in str(_problem(f"{server.url}/big.png"))
    assert "byte limit" in str(_problem(f"{server.url}/big-chunked.png"))
    assert "byte limit" in str(_problem(f"{server.url}/gzip-bomb.png"))  # counted after inflating
    assert "pixel limit" in str(_problem(f"{server.url}/bomb.png"))
    assert "does not decode" in str(_problem(f"{server.url}/page.html"))
    started = time.monotonic()
    slow = _problem(f"{server.url}/slow?s=10", timeout=0.5)
    assert slow.type == "ImageFetchError" and "timed out" in str(slow)
    assert time.monotonic() - started < 9  # abandoned at the timeout, not waited out


def test_every_redirect_is_checked_again(server, loopback_only):
    to_loopback = _problem(f"{server.url}/redirect-to?url=http://127.0.0.1:{server.port}/img/a.png")
    assert to_loopback.type == "BlockedAddress" and "127.0.0.1" in str(to_loopback)
    to_ftp = _problem(f"{server.url}/redirect-to?url=ftp://{SERVER_HOST}/a.png")
    assert to_ftp.type == "BlockedAddress" and "'ftp'" in str(to_ftp)
    to_name = _problem(f"{server.url}/redirect-to?url=http://inside.test/a.png",
                       lookup=_lookup({"inside.test": "10.0.0.5"}))
    assert to_name.type == "BlockedAddress" and "10.0.0.5" in str(to_name)
    assert "127.0.0.1" not in loopback_only and "10.0.0.5" not in loopback_only


def test_rows_with_url_images_end_as_expected_through_the_worker(server, tmp_path, loopback_only):
    base = server.url
    cases = {
        "ok": (f"{base}/img/ok.png", None), "redirect": (f"{base}/redirect/2", None),
        "retry-after": (f"{base}/busy.png?row", None), "missing": (f"{base}/missing.png", "ImageFetchError"),
        "slow": (f"{base}/slow?s=10", "ImageFetchError"), "big": (f"{base}/big.png", "BadImage"),
        "bomb": (f"{base}/bomb.png", "BadImage"),
        "to-loopback": (f"{base}/redirect-to?url=http://127.0.0.1:{server.port}/img/a.png", "BlockedAddress"),
        "metadata": ("http://169.254.169.254/latest/meta-data/iam", "BlockedAddress"),
        "file-scheme": ("file:///etc/passwd", "BlockedAddress"),
        "no-host": ("http:///x.png", "BadRow"),
    }
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps({"uid": name, "url": url}) + "\n"
                                for name, (url, _) in cases.items()))
    request = RunRequest(pipeline="caption", serving="echo", input=str(manifest), output=str(tmp_path / "o"),
                         run_id="u", image_key="url", id_key="uid",
                         options={"prompt": "Describe the image.", "image_timeout": 4.0,  # slow: 10 s
                                  "allowed_image_networks": [f"{SERVER_HOST}/32"]})
    storage, spec, _ = prepare_run(request)
    process_shard(storage, 0)
    reduce_run(storage)
    result = {r["uid"]: r for r in map(json.loads, storage.open_lines(layout.RESULT_KEY))}
    assert list(result) == list(cases)
    for name, (url, error) in cases.items():
        row = result[name]
        assert row["url"] == url
        if error is None:
            assert row["caption"].startswith("echo: Describe the image."), (name, row)
        else:
            assert "caption" not in row and row["error"]["type"] == error, (name, row)
    assert result["missing"]["error"]["status"] == 404
    assert "timed out" in result["slow"]["error"]["message"]
    assert "127.0.0.1" not in loopback_only and "169.254.169.254" not in loopback_only
    errors = [json.loads(line) for line in storage.open_lines(layout.ERRORS_KEY)]
    assert len(errors) == sum(1 for _, e in cases.values() if e)


def test_without_an_allowance_the_test_server_itself_is_refused(server, tmp_path):
    manifest = tmp_path / "m.jsonl"
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    manifest.write_text(json.dumps({"url": f"{server.url}/img/a.png"}) + "\n"
                        + json.dumps({"url": "here.png"}) + "\n")  # one good row: the run starts
    storage, _, _ = prepare_run(RunRequest(pipeline="caption", serving="echo", input=str(manifest),
                                           output=str(tmp_path / "o"), run_id="g", image_key="url",
                                           options={"prompt": "p"}))
    hits = len(server.hits["/img/a.png"])
    process_shard(storage, 0)
    reduce_run(storage)
    row = json.loads(next(iter(storage.open_lines(layout.RESULT_KEY))))
    assert row["error"]["type"] == "BlockedAddress"
    assert "--allow-private-image-hosts" in row["error"]["message"]
    assert len(server.hits["/img/a.png"]) == hits  # never requested


def test_synchronous_fetch_goes_through_the_same_guard(server, loopback_only):
    from dfk8s.inputs.fetch import fetch_image_bytes
    from dfk8s.inputs.images import read_image

    with pytest.raises(ImageProblem, match="the workers fetch it"):
        read_image(f"{server.url}/img/sync.png")  # a reader of refs (the report) never downloads by surprise
    with pytest.raises(ImageProblem) as info:
        fetch_image_bytes(f"{server.url}/img/sync.png")  # no allowance: the test server's address is refused
    assert info.value.type == "BlockedAddress" and not server.hits["/img/sync.png"]
    data = fetch_image_bytes(f"{server.url}/img/sync.png", {"allowed_image_networks": [f"{SERVER_HOST}/32"]})
    assert data == server.image and len(server.hits["/img/sync.png"]) == 1
    assert set(loopback_only) <= {SERVER_HOST}


def test_a_plain_retry_sends_again_the_image_fetches_that_can_pass_not_the_404s(server, tmp_path):
    """An image host that timed out or kept answering 429/5xx is worth another try; a 404 is not."""
    from dfk8s.reduce.reopen import plan_retry

    cases = {"ok": f"{server.url}/img/ok.png", "busy": f"{server.url}/always-busy.png",
             "slow": f"{server.url}/slow?s=10", "missing": f"{server.url}/missing.png"}
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps({"uid": name, "url": url}) + "\n" for name, url in cases.items()))
    request = RunRequest(pipeline="caption", serving="echo", input=str(manifest), output=str(tmp_path / "o"),
                         run_id="r", image_key="url", id_key="uid",
                         options={"prompt": "Describe the image.", "image_timeout": 2.0,
                                  "allowed_image_networks": [f"{SERVER_HOST}/32"]})
    storage, _, _ = prepare_run(request)
    process_shard(storage, 0)
    reduce_run(storage)
    errors = {r["uid"]: r["error"] for r in map(json.loads, storage.open_lines(layout.RESULT_KEY))
              if "error" in r}
    assert {k: (e["type"], e.get("transient", False)) for k, e in errors.items()} == {
        "busy": ("ImageFetchError", True), "slow": ("ImageFetchError", True),
        "missing": ("ImageFetchError", False)}
    _, plan = plan_retry(storage)  # the default choice of `dfk8s retry`
    assert plan.rows == 2 and plan.by_type == {"ImageFetchError": 2}
    before = {path: len(hits) for path, hits in server.hits.items()}
    process_shard(storage, 0)
    reduce_run(storage)
    assert len(server.hits["/missing.png"]) == before["/missing.png"]  # not fetched again
    assert len(server.hits["/img/ok.png"]) == before["/img/ok.png"]  # a row that succeeded is not either
    assert len(server.hits["/always-busy.png"]) > before["/always-busy.png"]  # the transient ones are
    _, everything = plan_retry(storage, types={"ImageFetchError"})  # asked for by name: every one
    assert everything.rows == 3
