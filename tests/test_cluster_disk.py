"""The cluster harness refuses an image import the disk cannot hold, before the disk fills mid-suite.

A CI run once imported the ~6 GB GPU image into a nearly full disk: the import passed, and then S3
answered 500 and every later pod stayed in ContainerCreating until its test timed out (86 minutes).
"""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from tests.cluster import node

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "dfk8s-gpu.tar"
    path.write_bytes(b"\0" * 1000)
    return path


def test_an_import_with_too_little_free_disk_is_refused_in_one_line(tmp_path, archive, monkeypatch):
    need = 2 * 1000 + node.DISK_MARGIN
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12 - need + 1, need - 1))
    with pytest.raises(RuntimeError) as caught:
        node.check_free_disk(tmp_path, archive)
    message = str(caught.value)
    assert "\n" not in message
    assert "dfk8s-gpu.tar" in message and "free" in message and "docker-down.sh --purge" in message


def test_an_import_that_fits_goes_ahead(tmp_path, archive, monkeypatch):
    need = 2 * 1000 + node.DISK_MARGIN
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**12, 10**12 - need, need))
    node.check_free_disk(tmp_path, archive)
