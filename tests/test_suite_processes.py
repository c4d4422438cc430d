"""The servers the suite starts die with it, even when it is killed (a CI timeout, SIGKILL).

A `make test` stopped by a timeout once left two SeaweedFS servers running.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.helpers.seaweed import clean_up

pytestmark = pytest.mark.slow


def _gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def _read_pid(path: Path, proc: subprocess.Popen, seconds: float = 90.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().splitlines()[0])
        assert proc.poll() is None, f"the process that starts the server exited ({proc.returncode})"
        time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_seaweedfs_dies_when_the_process_that_started_it_is_killed(tmp_path):
    pid_file = tmp_path / "weed.pid"
    starter = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tests.helpers.seaweed import start_seaweed; server = start_seaweed(); "
        f"open({str(pid_file)!r}, 'w').write(server.record()); time.sleep(300)")], cwd=REPO)
    try:
        weed = _read_pid(pid_file, starter)
        starter.kill()  # no cleanup runs: only the kernel can stop the server now
        starter.wait()
        assert _gone(weed), "SeaweedFS outlived the process that started it"
    finally:
        starter.kill()
        if pid_file.exists() and pid_file.read_text().strip():
            clean_up(pid_file.read_text())  # a server killed outright leaves its folder and sockets


def test_a_killed_test_run_leaves_no_server_behind(tmp_path):
    # A run of pytest with an xdist worker whose test holds the suite's SeaweedFS fixture; the run is
    # killed outright, as a CI timeout does. The worker, and the server it started, go with it.
    pid_file = tmp_path / "weed.pid"
    (tmp_path / "test_holds_a_server.py").write_text(
        "import time\n\n\ndef test_hold(seaweed):\n"
        f"    open({str(pid_file)!r}, 'w').write(seaweed.record())\n    time.sleep(300)\n")
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "tests.conftest",
                            "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                            str(tmp_path / "test_holds_a_server.py")],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        weed = _read_pid(pid_file, run, seconds=120)
        workers = [p.pid for p in psutil.Process(run.pid).children(recursive=True) if p.pid != weed]
        run.kill()
        run.wait()
        assert _gone(weed), "SeaweedFS outlived the killed test run"
        assert all(_gone(pid) for pid in workers), "an xdist worker outlived the killed test run"
    finally:
        run.kill()
        if pid_file.exists() and pid_file.read_text().strip():
            clean_up(pid_file.read_text())  # a server killed outright leaves its folder and sockets
