"""A plain `pip install dfk8s` (no extras) runs the main job: caption through an OpenAI-compatible API.

The install is real: a fresh virtual environment, pip resolving only the core dependencies (from its
cache or the package index). A serving whose extra is missing says so in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv

import pytest

from tests.conftest import DATAFLOW_ROOT, REPO, VQA_MANIFEST

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A virtual environment with `pip install dfk8s` and nothing else."""
    root = tmp_path_factory.mktemp("plain-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)],
                   check=True, timeout=900)
    return root / "bin"


def test_the_plain_install_has_no_extra(plain):
    listed = subprocess.run([str(plain / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "dfk8s" in installed
    assert not {"openai", "google-genai", "torch", "diffusers", "kubernetes"} & installed


def test_a_caption_run_works_on_a_plain_install(plain, tmp_path, fake_api):
    env = {**{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}, "DF_API_KEY": "k",
           "PATH": f"{plain}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(plain / "dfk8s"), "run", "-p", "caption", "-i", str(VQA_MANIFEST),
                             "--image-root", str(DATAFLOW_ROOT), "-o", str(tmp_path / "o"), "--run-id", "p",
                             "--api-url", fake_api.url + "/v1", "--model", "gpt-4o-mini", "--no-progress"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr
    summary = json.loads((tmp_path / "o" / "p" / "summary.json").read_text())
    assert summary["ok"] == 4 and summary["failed"] == 4  # the fixture's four missing Face.jpg rows
    # A serving whose extra is missing: one line, naming what to install.
    missing = subprocess.run([str(plain / "dfk8s"), "run", "-p", "text2image", "--serving", "gemini-images",
                              "-i", str(REPO.parent / "shared/fixtures/seed-docs/text2image.jsonl"),
                              "-o", str(tmp_path / "o"), "--no-progress"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert missing.returncode == 42
    assert missing.stderr.strip().splitlines() == ["error: serving gemini-images needs the 'api' extra: "
                                                   "pip install 'dfk8s[api]' (google.genai is missing)"]
    sdk = subprocess.run([str(plain / "dfk8s"), "run", "-p", "caption", "-i", str(VQA_MANIFEST),
                          "--image-root", str(DATAFLOW_ROOT), "-o", str(tmp_path / "o"), "--client", "sdk",
                          "--api-url", fake_api.url + "/v1", "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert sdk.returncode == 42 and "pip install 'dfk8s[api]'" in sdk.stderr and "Traceback" not in sdk.stderr
