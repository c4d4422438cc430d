"""One exit-code table (the README's), followed by every mistake a user makes on the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SEED_DOCS

pytestmark = pytest.mark.slow


def _dfk8s(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True, cwd=cwd)


def _caption_manifest(tmp_path, image: str = "missing.png"):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image": image, "uid": f"r{i}"}) + "\n" for i in range(3)))
    return path


def test_the_readme_says_2_for_a_command_line_to_change():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("**Exit codes**"):][:900]
    assert re.search(r"`2` the command as given cannot start", table), table


@pytest.mark.parametrize("case", ["output is a file", "--image-root missing", "a flag changed on resume",
                                  "every image missing", "input missing", "a typo in --pipeline"])
def test_each_mistake_exits_2_with_one_line(tmp_path, case):
    manifest = _caption_manifest(tmp_path)
    base = ["run", "--serving", "echo", "--no-progress"]
    if case == "output is a file":
        (tmp_path / "out").write_text("a file")
        args = [*base, "-p", "text2image", "-i", str(SEED_DOCS / "text2image.jsonl"), "-o", "out"]
    elif case == "--image-root missing":
        args = [*base, "-p", "caption", "-i", str(manifest), "--image-root", "nowhere", "-o", "o"]
    elif case == "a flag changed on resume":
        first = _dfk8s(tmp_path, *base, "-p", "text2image", "-i", str(SEED_DOCS / "text2image.jsonl"),
                       "-o", "o", "--run-id", "r", "--seed", "1")
        assert first.returncode == 0, first.stderr
        args = ["run", "--run-id", "r", "-o", "o", "--seed", "2", "--no-progress"]
    elif case == "every image missing":
        args = [*base, "-p", "caption", "-i", str(manifest), "-o", "o"]
    elif case == "input missing":
        args = [*base, "-p", "caption", "-i", "no-such.jsonl", "-o", "o"]
    else:
        args = [*base, "-p", "captoin", "-i", str(manifest), "-o", "o"]
    result = _dfk8s(tmp_path, *args)
    assert result.returncode == 2, (case, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert lines and (len(lines) == 1 or lines[0].startswith("Usage:")), result.stderr


def test_text2image_on_a_machine_without_gpu_or_model_is_refused_at_plan_time(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dfk8s", "run", "-p", "text2image", "-i",
                             str(SEED_DOCS / "text2image.jsonl"), "-o", "o", "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert "FLUX.1-dev on a GPU, and this machine has none" in line and "--serving openai-images" in line
    assert time.monotonic() - started < 15  # not three retried shards first
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing planned
