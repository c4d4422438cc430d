"""Shared fixtures: the DataFlow-MM fixtures, a real S3 server (SeaweedFS) and the fake API server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DFK8S_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATAFLOW_ROOT = FIXTURES / "dataflow-mm"
VQA_MANIFEST = DATAFLOW_ROOT / "dataflow/example/vqa/sample_data.json"
T2I_EVAL_MANIFEST = DATAFLOW_ROOT / "dataflow/example/text2image_eval/sample_data.json"
SEED_DOCS = FIXTURES / "seed-docs"


def pytest_configure(config):
    """An xdist worker whose controller is gone (killed, a CI timeout) dies too, and so do its servers."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import signal

        from tests.helpers.processes import die_with_parent

        die_with_parent(signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def _worker_logs(tmp_path_factory):
    """Local runs keep their worker logs under pytest's temporary folder, not a folder per run in /tmp."""
    from dfk8s.executors.local.pipe import LOG_DIR_ENV

    previous = os.environ.get(LOG_DIR_ENV)
    os.environ[LOG_DIR_ENV] = str(tmp_path_factory.mktemp("worker-logs"))
    yield
    if previous is None:
        os.environ.pop(LOG_DIR_ENV, None)
    else:
        os.environ[LOG_DIR_ENV] = previous


@pytest.fixture(scope="session")
def seaweed():
    """A real SeaweedFS S3 server for the whole session (per xdist worker)."""
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Point boto3 (in this process and in worker subprocesses) at the test S3 server."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return seaweed


@pytest.fixture(scope="session")
def _session_bucket(seaweed) -> str:
    # One bucket per session: each SeaweedFS bucket is a collection with volumes of its own, and a
    # bucket per test exhausts the volume slots of a small test server (InternalError on PUT).
    seaweed.create_bucket("dfk8s-test")
    return "dfk8s-test"


@pytest.fixture
def s3_bucket(s3_env, _session_bucket) -> str:
    """A fresh ``bucket/prefix`` to use as ``s3://{s3_bucket}/...``."""
    return f"{_session_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fake_api():
    """The project's fake OpenAI/Gemini server, on a free loopback port; yields the FakeAPI object."""
    from dfk8s.testing.fake_api import FakeAPI, FakeConfig

    api = FakeAPI(FakeConfig())
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="session")
def k8s_schema_cache():
    """Read each Kubernetes schema file once: kubernetes-validate re-parses ~2 MB of JSON on every call."""
    import functools

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    with pytest.MonkeyPatch.context() as patch:
        utils = kubernetes_validate.utils
        patch.setattr(utils, "schema_contents", functools.lru_cache(maxsize=None)(utils.schema_contents))
        yield


@pytest.fixture
def api_key(monkeypatch):
    """A dummy API key in the environment (the fake server accepts any)."""
    monkeypatch.setenv("DF_API_KEY", "test-key-not-secret")
    return "test-key-not-secret"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random FLUX and FLUX Kontext pipelines saved as model folders (diffusers' from_pretrained)."""
    from dfk8s.testing.tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp("tiny-flux")
    return {"flux": build_tiny_flux(root / "flux"),
            "kontext": build_tiny_flux(root / "kontext", kind="kontext")}

