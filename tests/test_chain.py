"""Stages chain without hand edits: a finished run is the next stage's --input, locally and on S3."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import UsageError
from dfk8s.pipelines import CAPTION_INSTRUCTION
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.conftest import SEED_DOCS

pytestmark = pytest.mark.slow


def _run(*args: str):
    result = CliRunner().invoke(cli, ["run", "--serving", "echo", "--workers", "1", "--no-progress", *args],
                                standalone_mode=False)
    assert result.exception is None, (result.output, result.exception)
    return result


def _rows(storage, run_id: str, key: str = layout.RESULT_KEY) -> list[dict]:
    return [json.loads(line) for line in storage.child(run_id).open_lines(key)]


def _located(storage, run_id: str, ref: str) -> str:
    """Where an output ref of a run points: its s3:// URI, or its path relative to the run's folder."""
    return ref if "://" in ref else storage.child(run_id).url(ref)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs"


def test_text2image_then_caption_then_imageedit_then_caption(output, tmp_path):
    storage = open_storage(output)
    _run("-p", "text2image", "-i", str(SEED_DOCS / "text2image.jsonl"), "-o", output, "--run-id", "gen")
    # By its id under --output: the images it made are what gets captioned, with caption's own
    # instruction (DataFlow-MM's), not the generation prompt of the rows.
    _run("-p", "caption", "-i", "gen", "-o", output, "--run-id", "cap")
    generated = _rows(storage, "gen")
    captioned = _rows(storage, "cap")
    assert len(captioned) == len(generated) == 2
    assert all(r["caption"] == f"echo: {CAPTION_INSTRUCTION}" for r in captioned)
    # Named so they resolve from anywhere: the generation run's files, by absolute path or s3:// URI.
    assert [r["images"] for r in captioned] == [[_located(storage, "gen", ref) for ref in r["images"]]
                                                for r in generated]
    # By its location: an edit needs an instruction, the same for every row (--prompt).
    location = storage.child("cap").url()
    _run("-p", "imageedit", "-i", location, "-o", output, "--run-id", "edit", "--prompt", "make it blue")
    edited = _rows(storage, "edit")
    assert all("edited_images" in r and "error" not in r for r in edited)
    # By its result.jsonl: the edited images are captioned (the next stage reads the previous output key).
    _run("-p", "caption", "-i", storage.child("edit").url(layout.RESULT_KEY), "-o", output, "--run-id",
         "cap2")
    sent = _rows(storage, "cap2", layout.shard_input_key(0))
    assert [row["images"] for row in sent] == [[_located(storage, "edit", ref) for ref in r["edited_images"]]
                                               for r in edited]
    assert all(r["caption"] == f"echo: {CAPTION_INSTRUCTION}" for r in _rows(storage, "cap2"))
    spec = json.loads(storage.child("cap2").read_bytes(layout.RUN_SPEC_KEY))
    assert spec["input_run"]["pipeline"] == "imageedit" and spec["image_key"] == "edited_images"


def test_a_copied_run_folder_still_resolves_its_paths(tmp_path):
    output = tmp_path / "runs"
    _run("-p", "text2image", "-i", str(SEED_DOCS / "text2image.jsonl"), "-o", str(output), "--run-id", "gen")
    moved = tmp_path / "elsewhere" / "gen"
    shutil.copytree(output / "gen", moved)
    shutil.rmtree(output / "gen")
    rows = [json.loads(line) for line in (moved / layout.RESULT_KEY).read_text().splitlines()]
    assert all((moved / ref).is_file() for r in rows for ref in r["images"])
    _run("-p", "caption", "-i", str(moved), "-o", str(output), "--run-id", "cap")
    assert all("caption" in r for r in _rows(open_storage(str(output)), "cap"))


def test_an_unfinished_run_is_refused_as_input(tmp_path):
    output = tmp_path / "runs"
    _run("-p", "text2image", "-i", str(SEED_DOCS / "text2image.jsonl"), "-o", str(output), "--run-id", "gen")
    (output / "gen" / layout.RESULT_KEY).unlink()
    refused = CliRunner().invoke(cli, ["run", "-p", "caption", "--serving", "echo", "-i", "gen", "-o",
                                       str(output), "--no-progress"], standalone_mode=False)
    assert isinstance(refused.exception, UsageError) and "has not finished" in str(refused.exception)
