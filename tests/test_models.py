"""`dfk8s model pull --to DIR` / `model list --dir` against a local stand-in of the Hub, then offline loading.

The Hugging Face Hub cannot be reached from this machine (tests may only talk to loopback), so the repo
is served by tests.helpers.fake_hub, which speaks the Hub's file API, to the real huggingface_hub client.
The repo is a real tiny FLUX pipeline (dfk8s.testing.tiny_flux) plus decoys the pipeline never loads.
Pulls run as `python -m dfk8s` subprocesses, as a user (or the pull Job) runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfk8s.errors import SpecError
from dfk8s.models.hub import is_gated, list_cache, select_pipeline_files
from tests.conftest import REPO
from tests.helpers.fake_hub import FakeHub

REPO_ID = "tiny-org/tiny-flux"
GATED_ID = "black-forest-labs/tiny-gated"
SLOW_FILE = "transformer/diffusion_pytorch_model.safetensors"
BIG_ID = "tiny-org/big-vae"
BIG_FILE = "vae/diffusion_pytorch_model.safetensors"
#: Files of the repo the pipeline never loads: none may be fetched.
DECOYS = {
    # like flux1-dev.safetensors
    "tiny-flux-dev.safetensors": "transformer/diffusion_pytorch_model.safetensors",
    "ae.safetensors": "vae/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.bin": "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/pytorch_model.bin": "text_encoder/model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors": "vae/diffusion_pytorch_model.safetensors",
    "transformer/flux-fp8.pth": "transformer/diffusion_pytorch_model.safetensors",
    # a folder model_index.json never names
    "lora/pytorch_lora_weights.safetensors": "text_encoder/model.safetensors",
    "README.md": None,
    "dev_grid.jpg": None,
}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("sentencepiece")
    from dfk8s.testing.tiny_flux import build_tiny_flux

    folder = build_tiny_flux(tmp_path_factory.mktemp("hub") / "tiny-flux")
    for decoy, copy_of in DECOYS.items():
        target = folder / decoy
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((folder / copy_of).read_bytes() if copy_of else b"not needed\n" * 100)
    return folder


@pytest.fixture(scope="session")
def big_repo(tmp_path_factory) -> Path:
    """A one-component pipeline repo with a 24 MiB weights file (content is not loaded, only fetched)."""
    folder = tmp_path_factory.mktemp("hub") / "big-vae"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]})
    )
    (folder / "vae" / "config.json").write_text("{}")
    (folder / BIG_FILE).write_bytes(os.urandom(24 * 2**20))
    return folder


@pytest.fixture
def hub(tiny_repo, big_repo):
    with FakeHub({REPO_ID: tiny_repo, GATED_ID: tiny_repo, BIG_ID: big_repo}, gated=(GATED_ID,)) as server:
        yield server


def pipeline_files(repo: Path) -> set[str]:
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    return files - set(DECOYS)


def env_for(hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(extra)
    return env


def dfk8s(*args, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfk8s", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def pull(hub: FakeHub, cache: Path, model: str = REPO_ID, *extra, **env) -> subprocess.CompletedProcess:
    return dfk8s("model", "pull", model, "--to", cache, *extra, env=env_for(hub, **env))


def file_gets(hub: FakeHub, path: str) -> list[tuple[int, int]]:
    return [(r.start, r.sent) for r in hub.requests if r.method == "GET" and r.path == path]


# --- which files --------------------------------------------------------------------------------


FLUX_DEV_FILES = [  # black-forest-labs/FLUX.1-dev as the Hub lists it
    ".gitattributes",
    "LICENSE.md",
    "README.md",
    "ae.safetensors",
    "dev_grid.jpg",
    "flux1-dev.safetensors",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
FLUX_DEV_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_should_pick_the_pipeline_files_when_the_repo_is_flux_dev():
    selected = select_pipeline_files(FLUX_DEV_INDEX, FLUX_DEV_FILES)
    left_out = set(FLUX_DEV_FILES) - set(selected)
    assert left_out == {
        ".gitattributes",
        "LICENSE.md",
        "README.md",
        "ae.safetensors",
        "dev_grid.jpg",
        "flux1-dev.safetensors",
    }
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in selected
    assert "model_index.json" in selected


def test_should_take_bin_weights_only_when_a_component_has_no_safetensors():
    index = {
        "_class_name": "X",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.safetensors",
    ]
    assert select_pipeline_files(index, files) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_should_refuse_the_repo_when_a_component_has_only_variant_weights():
    index = {"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}
    with pytest.raises(SpecError, match="component vae has weights"):
        select_pipeline_files(
            index, ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
        )


def test_should_know_the_gated_organisation_when_a_model_is_named():
    assert is_gated("black-forest-labs/FLUX.1-dev") and not is_gated("tiny-org/tiny-flux")


def _run_warnings(model: str, **env: str) -> list[str]:
    # A fresh interpreter with exactly this Hugging Face environment: huggingface_hub reads it at import,
    # as the launcher (and the workers that inherit its environment) do.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    script = ("import json, sys; from dfk8s.models.hub import local_run_warnings; "
              "print(json.dumps(local_run_warnings(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", script, model], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_should_warn_a_local_run_when_the_model_cannot_be_loaded_or_downloaded(tmp_path):
    home = tmp_path / "hf"
    offline = _run_warnings(REPO_ID, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    assert len(offline) == 1 and "HF_HUB_OFFLINE is set" in offline[0] and "dfk8s model pull" in offline[0]
    assert _run_warnings(REPO_ID, HF_HOME=str(home)) == []  # online, not gated: it downloads
    (gated,) = _run_warnings("black-forest-labs/FLUX.1-dev", HF_HOME=str(home))
    assert "gated model" in gated and "HF_TOKEN" in gated
    assert _run_warnings("black-forest-labs/FLUX.1-dev", HF_HOME=str(home), HF_TOKEN="x") == []
    home.mkdir()
    (home / "token").write_text("hf_stored\n")  # `hf auth login`
    assert _run_warnings("black-forest-labs/FLUX.1-dev", HF_HOME=str(home)) == []
    # Once pulled, offline is fine; a local folder is never checked.
    repo = home / "hub" / "models--tiny-org--tiny-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "model_index.json").write_text("{}")
    assert _run_warnings(REPO_ID, HF_HOME=str(home), HF_HUB_OFFLINE="1") == []
    assert _run_warnings(str(tmp_path), HF_HUB_OFFLINE="1") == []


# --- pulling ------------------------------------------------------------------------------------


def test_should_fetch_only_the_pipeline_files_when_pulled_to_a_folder(hub, tiny_repo, tmp_path):
    cache = tmp_path / "hf"
    result = pull(hub, cache)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip())
    assert snapshot == cache / "hub" / "models--tiny-org--tiny-flux" / "snapshots" / hub.commit(REPO_ID)
    assert hub.fetched() == pipeline_files(tiny_repo)
    # Each file once: the blobs fetched first are only linked by snapshot_download.
    assert hub.bytes_sent() == sum((tiny_repo / path).stat().st_size for path in pipeline_files(tiny_repo))
    for decoy in DECOYS:
        assert not (snapshot / decoy).exists(), decoy
        assert file_gets(hub, decoy) == [], decoy
    for path in pipeline_files(tiny_repo):
        assert (snapshot / path).read_bytes() == (tiny_repo / path).read_bytes(), path
    assert "leaving out 9 files" in result.stderr
    assert f"HF_HOME={cache} HF_HUB_OFFLINE=1" in result.stderr
    # A second pull finds everything in place: no file content is sent again.
    sent = hub.bytes_sent()
    again = pull(hub, cache)
    assert again.returncode == 0, again.stderr
    assert hub.bytes_sent() == sent
    assert "fetched 0 B now" in again.stderr
    listed = dfk8s("model", "list", "--dir", cache, "--json", env=env_for(hub))
    (entry,) = json.loads(listed.stdout)["dfk8s_models"]
    assert entry["model"] == REPO_ID and entry["refs"] == ["main"] and entry["complete"] is True
    assert entry["files"] == len(pipeline_files(tiny_repo))


def test_should_resume_the_file_with_a_range_request_when_the_connection_drops(hub, tmp_path):
    # A pull writes what it received in 1 MiB chunks: a cut mid-chunk resumes from the last whole one.
    chunk = 1 << 20
    size = (hub.repos[BIG_ID].files[BIG_FILE]).stat().st_size
    cut = 10 * chunk + chunk // 2
    hub.cut_once[BIG_FILE] = cut
    result = pull(hub, tmp_path / "hf", BIG_ID)
    assert result.returncode == 0, result.stderr
    # The first GET stopped mid-file; the retry asked only for the rest (Range: bytes=10 MiB-).
    assert file_gets(hub, BIG_FILE) == [(0, cut), (10 * chunk, size - 10 * chunk)]
    snapshot = Path(result.stdout.strip())
    assert (snapshot / BIG_FILE).read_bytes() == hub.repos[BIG_ID].files[BIG_FILE].read_bytes()


def test_should_resume_from_the_bytes_on_disk_when_a_pull_is_killed_mid_file(hub, tmp_path):
    cache = tmp_path / "hf"
    size = hub.repos[BIG_ID].files[BIG_FILE].stat().st_size
    # 8 KiB every 4 ms: ~12 s for 24 MiB, so the window between the first 10 MiB on disk and the end of
    # the file (~7 s) is wide enough for this loop even when the machine is busy.
    hub.slow[BIG_FILE] = 0.004
    blobs = cache / "hub" / "models--tiny-org--big-vae" / "blobs"
    process = subprocess.Popen(
        [sys.executable, "-m", "dfk8s", "model", "pull", BIG_ID, "--to", str(cache)],
        env=env_for(hub),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            partial = list(blobs.glob("*.dfk8s-partial")) if blobs.is_dir() else []
            # A pull writes in 1 MiB chunks: wait for 10 MiB on disk.
            try:
                if partial and partial[0].stat().st_size >= 10 << 20:
                    break
            except FileNotFoundError:  # renamed to its blob: the pull finished; the assert below says so
                time.sleep(0.5)
            assert process.poll() is None, "the pull ended before it could be interrupted"
            time.sleep(0.02)
        else:
            pytest.fail("the slow file never got a chunk to disk")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    deadline = time.monotonic() + 30  # the server notices the broken connection at its next write
    while not file_gets(hub, BIG_FILE) and time.monotonic() < deadline:
        time.sleep(0.05)
    ((first_start, _),) = file_gets(hub, BIG_FILE)
    (partial,) = blobs.glob("*.dfk8s-partial")
    on_disk = partial.stat().st_size
    assert first_start == 0 and 0 < on_disk < size
    # A temporary file huggingface_hub itself left behind long ago is cleaned up by the next pull.
    stale = blobs / "0123abcd.1a2b3c4d.incomplete"
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    hub.slow.clear()
    sent_before = hub.bytes_sent()
    again = pull(hub, cache, BIG_ID)
    assert again.returncode == 0, again.stderr
    # The killed file goes on from the bytes on disk; nothing else comes again.
    assert file_gets(hub, BIG_FILE)[1:] == [(on_disk, size - on_disk)]
    assert hub.bytes_sent() - sent_before == size - on_disk
    assert "resuming vae/diffusion_pytorch_model.safetensors" in again.stderr
    assert not stale.exists() and not list(blobs.glob("*.dfk8s-partial"))
    snapshot = Path(again.stdout.strip())
    assert (snapshot / BIG_FILE).read_bytes() == hub.repos[BIG_ID].files[BIG_FILE].read_bytes()
    (entry,) = list_cache(cache)
    assert entry.complete


def test_should_keep_the_token_from_the_cdn_when_weights_are_redirected(hub, tiny_repo, tmp_path):
    hub.cdn_redirect = True  # LFS files: 302 to a signed URL on another host, as on the Hub
    result = pull(hub, tmp_path / "hf", GATED_ID, HF_TOKEN=hub.token)
    assert result.returncode == 0, result.stderr
    assert hub.cdn_auth and not any(hub.cdn_auth)  # the weights came from the CDN, never with the token
    snapshot = Path(result.stdout.strip())
    for path in pipeline_files(tiny_repo):
        assert (snapshot / path).read_bytes() == (tiny_repo / path).read_bytes(), path


def test_should_log_the_bytes_on_disk_while_a_slow_pull_runs(hub, tmp_path):
    hub.slow[SLOW_FILE] = 0.05
    result = pull(hub, tmp_path / "hf", REPO_ID, "--progress-seconds", "0.3")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "on disk" in line]
    assert progress and all(line.endswith("of 877 kB on disk") for line in progress), result.stderr


def test_should_refuse_in_one_line_when_the_model_is_gated_or_unknown(hub, tmp_path):
    gated = pull(hub, tmp_path / "hf", GATED_ID)
    assert gated.returncode == 42, gated.stderr
    (line,) = gated.stderr.strip().splitlines()
    assert "is gated" in line and "HF_TOKEN" in line
    with_token = pull(hub, tmp_path / "hf", GATED_ID, HF_TOKEN=hub.token)
    assert with_token.returncode == 0, with_token.stderr
    unknown = pull(hub, tmp_path / "hf", "tiny-org/no-such-model")
    assert unknown.returncode == 42 and "no such model" in unknown.stderr
    revision = pull(hub, tmp_path / "hf", REPO_ID, "--revision", "v9")
    assert revision.returncode == 42 and "no revision 'v9'" in revision.stderr
    offline = pull(hub, tmp_path / "hf", REPO_ID, HF_HUB_OFFLINE="1")
    assert offline.returncode == 42 and "HF_HUB_OFFLINE" in offline.stderr


def test_should_say_the_pull_did_not_finish_when_a_listed_file_is_gone(hub, tmp_path):
    cache = tmp_path / "hf"
    assert pull(hub, cache).returncode == 0
    snapshot = Path(list_cache(cache)[0].snapshot)
    (snapshot / "vae" / "config.json").unlink()
    (entry,) = list_cache(cache)
    assert not entry.complete
    table = dfk8s("model", "list", "--dir", cache, env=env_for(hub))
    assert "incomplete (pull again to resume)" in table.stdout


# --- then loading offline -----------------------------------------------------------------------


def _planned_run(tmp_path: Path, model: str, rows: int = 2):
    from dfk8s.plan.launch import RunRequest, prepare_run

    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"conversations": [{"role": "user", "content": f"a red fox {i}"}]}) + "\n"
            for i in range(rows)
        )
    )
    request = RunRequest(
        pipeline="text2image",
        output=str(tmp_path / "runs"),
        run_id="offline1",
        input=str(manifest),
        serving="diffusers",
        options={"model": model, "steps": 2, "height": 64, "width": 64, "dtype": "float32"},
    )
    prepare_run(request)
    return tmp_path / "runs" / "offline1"


@pytest.mark.slow
def test_should_run_tiny_flux_from_the_pulled_cache_when_offline(hub, tiny_repo, tmp_path):
    cache = tmp_path / "hf"
    assert pull(hub, cache).returncode == 0
    requests_before = len(hub.requests)
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"conversations": [{"role": "user", "content": f"a red fox {i}"}]}) + "\n"
            for i in range(3)
        )
    )
    result = dfk8s(
        "run",
        "-p",
        "text2image",
        "--serving",
        "diffusers",
        "--model",
        REPO_ID,
        "--input",
        manifest,
        "--output",
        tmp_path / "runs",
        "--run-id",
        "cached1",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--dtype",
        "float32",
        "--workers",
        "1",
        "--no-progress",
        env=env_for(hub, HF_HOME=str(cache), HF_HUB_OFFLINE="1"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr  # the model is in the cache: nothing to warn about
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "cached1" / "result.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 3 and all("error" not in row and len(row["images"]) == 1 for row in rows), rows
    assert len(hub.requests) == requests_before  # loaded offline: not one request to the Hub


@pytest.mark.slow
def test_should_fail_the_shard_at_once_when_the_cache_lacks_the_model(hub, tmp_path):
    cache = tmp_path / "hf"
    assert pull(hub, cache).returncode == 0
    run_dir = _planned_run(tmp_path, "tiny-org/not-pulled")
    requests_before = len(hub.requests)
    env = env_for(hub, HF_HOME=str(cache), HF_HUB_OFFLINE="1")
    result = dfk8s("worker", "--run", run_dir, "--index", "0", env=env, timeout=300)
    assert result.returncode == 42, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "tiny-org/not-pulled" in errors[0] and "dfk8s model pull" in errors[0]
    # `dfk8s run` says so before planning, and its shard is not retried (exit 42).
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"conversations": [{"role": "user", "content": "a cat"}]}) + "\n")
    run = dfk8s(
        "run",
        "-p",
        "text2image",
        "--model",
        "tiny-org/not-pulled",
        "--input",
        manifest,
        "--output",
        tmp_path / "runs2",
        "--workers",
        "1",
        "--no-progress",
        env=env,
        timeout=300,
    )
    # No GPU here and the model is not in the cache: refused before anything is planned (exit 2).
    assert run.returncode == 2, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and "HF_HUB_OFFLINE is set and tiny-org/not-pulled is not in the cache" in warnings[0]
    )
    (error,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "tiny-org/not-pulled on a GPU, and this machine has none" in error
    assert not (tmp_path / "runs2").exists() or not list((tmp_path / "runs2").rglob("run.json"))
    assert len(hub.requests) == requests_before
