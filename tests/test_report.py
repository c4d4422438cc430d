"""dfk8s report on real runs (fake API via the real SDKs, tiny FLUX, SeaweedFS), in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest
from dfk8s.report import write_report
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.conftest import DATAFLOW_ROOT, REPO, SEED_DOCS
from tests.report_browser import cards as page_cards
from tests.report_browser import chromium, click_filter, images, open_page, search, visible_positions

GGBOND = DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png"
HORSE = DATAFLOW_ROOT / "dataflow/example/text2image_eval/1.png"
VASE = DATAFLOW_ROOT / "dataflow/example/text2image_eval/2.png"
XSS = "<script>window.__pwned = 1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned = 2">'
ARTIFACTS = REPO / ".artifacts"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _api_run(
    tmp_path,
    fake_api,
    pipeline: str,
    manifest: Path,
    *,
    output=None,
    serving="openai-chat",
    model="gpt-5-nano",
    run_id=None,
    **options,
):
    output = output or str(tmp_path / "runs")
    run_id = run_id or f"{pipeline}-run"
    run_local(
        RunRequest(
            pipeline=pipeline,
            serving=serving,
            input=str(manifest),
            output=output,
            run_id=run_id,
            rows_per_shard=3,
            options={"api_url": fake_api.url + "/v1", "model": model, "max_retries": 0, **options},
        ),
        workers=1,
    )
    return open_storage(output).child(run_id)


def _result(storage) -> list[dict]:
    return [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]


def _check_page(browser, html: Path, tmp_path, name: str, *, expect_positions: list[int]) -> list[dict]:
    """Everything the issue asks of the page: cards, loaded images, no script ran, nothing fetched."""
    with open_page(browser, html.as_uri()) as opened:
        page = opened.page
        shown = page_cards(page)
        assert [c["pos"] for c in shown] == expect_positions
        assert all(c["visible"] for c in shown)
        imgs = images(page)
        assert imgs, "no <img> on the page"
        broken = [i["src"] for i in imgs if not (i["complete"] and i["width"] > 0)]
        assert not broken, f"images that did not load: {broken}"
        assert all(i["src"].startswith("file://") for i in imgs)
        assert page.evaluate("() => window.__pwned") is None  # no injected script or handler ran
        # Filters: ok, failed, every error type, and the search box.
        statuses = {c["pos"]: c for c in shown}
        click_filter(page, "ok")
        assert visible_positions(page) == [p for p, c in statuses.items() if c["status"] == "ok"]
        click_filter(page, "failed")
        assert visible_positions(page) == [p for p, c in statuses.items() if c["status"] == "failed"]
        for error_type in {c["error"] for c in shown if c["error"]}:
            click_filter(page, f"error:{error_type}")
            assert visible_positions(page) == [p for p, c in statuses.items() if c["error"] == error_type]
        click_filter(page, "all")
        assert visible_positions(page) == expect_positions
        screenshot = tmp_path / f"report-{name}.png"
        page.screenshot(path=str(screenshot), full_page=True)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, ARTIFACTS / f"report-{name}.png")
        if name == "imageedit":  # the one the issue note shows: images side by side, two error types
            shutil.copyfile(screenshot, ARTIFACTS / "report.png")
        print(f"screenshot: {screenshot} (and {ARTIFACTS / f'report-{name}.png'})")
        assert page.evaluate("() => window.__pwned") is None
        assert not opened.blocked, f"the page tried the network: {opened.blocked}"
        assert all(url.startswith(("file://", "data:")) for url in opened.requests), opened.requests
        assert not opened.console_errors, opened.console_errors
        return shown


# ----- caption and vqa against the fake API -------------------------------------------------------------


def test_caption_report_local_in_chromium(tmp_path, fake_api, api_key, browser):
    rows = [
        {"id": "a", "image": [str(GGBOND)], "conversation": [{"from": "human", "value": "Describe it."}]},
        {"id": "b", "image": ["missing/nowhere.png"], "conversation": [{"from": "human", "value": "x"}]},
        {"id": "c", "image": [str(HORSE)], "conversation": [{"from": "human", "value": f"Say {XSS} now"}]},
        {"id": "d", "image": [str(VASE)], "conversation": [{"from": "human", "value": "[[refuse]] please"}]},
        {"id": "e", "image": [str(VASE)], "conversation": [{"from": "human", "value": XSS_IMG}]},
    ]
    storage = _api_run(tmp_path, fake_api, "caption", _write_jsonl(tmp_path / "c.jsonl", rows), id_key=None)
    result = _result(storage)
    assert XSS in result[2]["caption"] and XSS_IMG in result[4]["caption"]  # the injection came back
    assert [r.get("error", {}).get("type") for r in result] == [None, "BadRow", None, "Refusal", None]

    runner = CliRunner().invoke(cli, ["report", "caption-run", "--output", str(tmp_path / "runs")])
    assert runner.exit_code == 0, runner.output
    html = Path(storage.url("report.html"))
    assert str(html) in runner.stdout.splitlines()
    text = html.read_text()
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text and XSS not in text
    shown = _check_page(browser, html, tmp_path, "caption", expect_positions=[0, 1, 2, 3, 4])
    by_pos = {c["pos"]: c for c in shown}
    assert XSS in by_pos[2]["answer"] and XSS_IMG in by_pos[4]["answer"]  # shown as text
    assert by_pos[0]["inputs"] == 1 and by_pos[1]["missing"] == 1 and by_pos[1]["status"] == "failed"
    assert "Refusal" in by_pos[3]["text"] and "Describe it." in by_pos[0]["text"]
    assert storage.url("report/thumbs") and any(Path(storage.url("report/thumbs")).iterdir())


def test_vqa_report_filters_and_search(tmp_path, fake_api, api_key, browser):
    questions = [
        "How many legs has the horse?",
        "[[refuse]] what colour is it?",
        "Is the vase red?",
        "[[500]] what is this?",
        "Is there a pig?",
        "[[refuse]] again",
        "What is under the table?",
    ]
    images = [HORSE, HORSE, VASE, VASE, GGBOND, GGBOND, VASE]
    rows = [
        {"uid": f"q{i}", "conversations": _turn(q), "images": [str(img)]}
        for i, (q, img) in enumerate(zip(questions, images, strict=True))
    ]
    storage = _api_run(tmp_path, fake_api, "vqa", _write_jsonl(tmp_path / "q.jsonl", rows), id_key="uid")
    result = write_report(storage)
    assert (result.rows, result.shown, result.shown_failed) == (7, 7, 3)
    with open_page(browser, Path(result.path).as_uri()) as opened:
        page = opened.page
        error_types = {c["pos"]: c["error"] for c in page_cards(page) if c["error"]}
        assert set(error_types) == {1, 3, 5} and error_types[1] == error_types[5] == "Refusal"
        search(page, "VASE")
        assert visible_positions(page) == [2]  # case-insensitive, over prompts and answers
        search(page, "fake caption")
        assert visible_positions(page) == [0, 2, 4, 6]
        click_filter(page, "ok")
        search(page, "pig")
        assert visible_positions(page) == [4]
        search(page, "")
        click_filter(page, "error:Refusal")
        assert visible_positions(page) == [1, 5]
        search(page, "no such text anywhere")
        assert visible_positions(page) == [] and page.is_visible("#empty")
        # The header: counts and errors by type for the whole run.
        header = page.inner_text("header.top") + page.inner_text("#errors")
        assert "7\nrows" in header and "4\nok" in header and "3\nfailed" in header
        assert "Refusal\t2" in header
        assert not opened.blocked


# ----- image pipelines: the fake image API and tiny FLUX ---------------------------------------------


@pytest.mark.parametrize("pipeline", ["text2image", "imageedit"])
def test_image_api_reports_local(tmp_path, fake_api, api_key, browser, pipeline):
    if pipeline == "text2image":
        rows = [{"conversations": _turn(p)} for p in ("a fox in snow", "[[refuse]] a bad one", "a red kite")]
    else:
        rows = [
            {"conversations": _turn("make the horse black"), "images": [str(HORSE)]},
            {"conversations": _turn("[[refuse]] no"), "images": [str(VASE)]},
            {"conversations": _turn("make the vase red"), "images": [str(VASE)]},
            {"conversations": _turn("edit a ghost"), "images": [str(tmp_path / "ghost.png")]},
        ]
    storage = _api_run(
        tmp_path,
        fake_api,
        pipeline,
        _write_jsonl(tmp_path / "m.jsonl", rows),
        serving="openai-images",
        model="gpt-image-1.5",
    )
    result = write_report(storage)
    assert result.path == storage.url("report.html")
    shown = _check_page(
        browser, Path(result.path), tmp_path, pipeline, expect_positions=list(range(len(rows)))
    )
    for card in shown:
        if card["status"] == "ok":
            assert card["outputs"] == 1 and card["inputs"] == (1 if pipeline == "imageedit" else 0)
        else:
            assert card["outputs"] == 0
    if pipeline == "imageedit":  # input and output side by side
        with open_page(browser, Path(result.path).as_uri()) as opened:
            box_in = opened.page.locator("#row-0 .inputs img").bounding_box()
            box_out = opened.page.locator("#row-0 .outputs img").bounding_box()
            assert box_in["x"] + box_in["width"] <= box_out["x"] and abs(box_in["y"] - box_out["y"]) < 5
            # Relative links: the run folder can be moved or copied and the page still works.
            output_link = opened.page.locator("#row-0 .outputs a")
            assert output_link.get_attribute("href") == "images/0/0.png"
            assert output_link.locator("img").get_attribute("src").startswith("report/thumbs/")
            input_href = opened.page.locator("#row-0 .inputs a").get_attribute("href")
            assert not input_href.startswith("/")
            assert (Path(result.path).parent / input_href).resolve() == HORSE.resolve()


@pytest.mark.slow
def test_tiny_flux_reports_local(tmp_path, browser, monkeypatch):
    pytest.importorskip("diffusers")
    from dfk8s.testing.tiny_flux import build_tiny_flux

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = {
        "text2image": build_tiny_flux(tmp_path / "flux"),
        "imageedit": build_tiny_flux(tmp_path / "kontext", kind="kontext"),
    }
    for pipeline, manifest in (("text2image", "text2image.jsonl"), ("imageedit", "imageedit.jsonl")):
        extra = {"max_area": 4096, "auto_resize": False} if pipeline == "imageedit" else {}
        run_local(
            RunRequest(
                pipeline=pipeline,
                serving="diffusers",
                input=str(SEED_DOCS / manifest),
                output=str(tmp_path / "runs"),
                run_id=f"flux-{pipeline}",
                options={
                    "model": str(models[pipeline]),
                    "steps": 2,
                    "height": 64,
                    "width": 64,
                    "dtype": "float32",
                    **extra,
                },
            ),
            workers=1,
        )
        storage = open_storage(str(tmp_path / "runs")).child(f"flux-{pipeline}")
        result = write_report(storage)
        assert (result.rows, result.shown_failed) == (2, 0)
        shown = _check_page(browser, Path(result.path), tmp_path, f"flux-{pipeline}", expect_positions=[0, 1])
        assert all(c["outputs"] == 1 and c["inputs"] == (pipeline == "imageedit") for c in shown)


# ----- S3 runs ------------------------------------------------------------------------------------------


def test_s3_caption_report_downloads_thumbnails_and_presigns(
    tmp_path, fake_api, api_key, s3_bucket, browser, monkeypatch
):
    output = f"s3://{s3_bucket}/runs"
    rows = [
        {"image": [str(GGBOND)], "conversation": [{"from": "human", "value": "Describe."}]},
        {"image": ["nowhere.png"], "conversation": [{"from": "human", "value": "x"}]},
        {"image": [str(HORSE)], "conversation": [{"from": "human", "value": XSS}]},
    ]
    storage = _api_run(tmp_path, fake_api, "caption", _write_jsonl(tmp_path / "c.jsonl", rows), output=output)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner().invoke(cli, ["report", "caption-run", "--output", output])
    assert runner.exit_code == 0, runner.output
    local_html = tmp_path / "report-caption-run" / "report.html"
    lines = runner.stdout.splitlines()
    assert lines[:2] == [str(local_html), f"{output}/caption-run/report.html"]
    assert lines[2].startswith("http://127.0.0.1:") and "X-Amz-Signature=" in lines[2]
    assert storage.exists("report.html")
    _check_page(browser, local_html, tmp_path, "s3-caption", expect_positions=[0, 1, 2])
    # The copy on S3, through its presigned URL, in the browser: every thumbnail loads from S3.
    with urllib.request.urlopen(lines[2]) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
    with open_page(browser, lines[2], allow_network=True) as opened:
        loaded = images(opened.page)
        assert len(loaded) == 2 and all(i["width"] > 0 and "X-Amz-Signature" in i["src"] for i in loaded)
        assert opened.page.evaluate("() => window.__pwned") is None
    assert any(k.startswith("report/thumbs/") for k in storage.list("report"))


def test_s3_imageedit_report_with_presign_only(tmp_path, fake_api, api_key, s3_bucket, browser, monkeypatch):
    output = f"s3://{s3_bucket}/runs"
    rows = [
        {"conversations": _turn("make it night"), "images": [str(HORSE)]},
        {"conversations": _turn("[[refuse]] no"), "images": [str(VASE)]},
    ]
    storage = _api_run(
        tmp_path,
        fake_api,
        "imageedit",
        _write_jsonl(tmp_path / "e.jsonl", rows),
        output=output,
        serving="openai-images",
        model="gpt-image-1.5",
    )
    monkeypatch.chdir(tmp_path)
    result = write_report(storage, presign_only=True)
    assert result.path is None and not (tmp_path / "report-imageedit-run").exists()
    assert result.s3_uri == f"{output}/imageedit-run/report.html" and "X-Amz-Signature" in result.url
    with open_page(browser, result.url, allow_network=True) as opened:
        loaded = images(opened.page)
        assert len(loaded) == 3 and all(i["width"] > 0 for i in loaded)  # 2 inputs + 1 edited output
        # Inputs are files on this machine (dfk8s run): no link from S3; the output links to its full image.
        assert opened.page.locator(".inputs a").count() == 0
        href = opened.page.locator("#row-0 .outputs a").get_attribute("href")
        assert "/images/0/0.png?" in href and "X-Amz-Signature" in href
        with urllib.request.urlopen(href) as full:  # the full edited image behind the thumbnail
            assert full.read(8) == b"\x89PNG\r\n\x1a\n"


# ----- the commands around it -------------------------------------------------------------------------


def test_run_prints_the_report_command_or_writes_it_with_report(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"conversations": _turn(f"p{i}")} for i in range(3)])
    base = [
        "run",
        "-p",
        "text2image",
        "--serving",
        "echo",
        "-i",
        str(manifest),
        "-o",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    plain = CliRunner().invoke(cli, [*base, "--run-id", "r1"])
    assert plain.exit_code == 0, plain.output
    assert f"dfk8s report r1 --output {tmp_path / 'o'}" in plain.stderr
    assert not (tmp_path / "o/r1/report.html").exists()
    written = CliRunner().invoke(cli, [*base, "--run-id", "r2", "--report"])
    assert written.exit_code == 0, written.output
    assert str(tmp_path / "o/r2/report.html") in written.stdout.splitlines()
    assert (tmp_path / "o/r2/report.html").read_text().count('class="card ok"') == 3


def test_report_of_a_missing_or_unreduced_run_is_one_clear_line(tmp_path):
    from dfk8s.errors import Dfk8sError, RunNotFound

    with pytest.raises(RunNotFound, match="no run at"):
        write_report(open_storage(str(tmp_path / "nothing")))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text(
        json.dumps({"run_id": "r", "pipeline": "vqa", "serving": "echo"})
    )
    with pytest.raises(Dfk8sError, match="not reduced"):
        write_report(open_storage(str(tmp_path / "r")))


def test_report_accepts_the_run_folder_itself(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"conversations": _turn("p")}])
    run_local(
        RunRequest(pipeline="vqa", serving="echo", input=str(manifest), output=str(tmp_path), run_id="x"),
        workers=1,
    )
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "x")])
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "x" / "report.html")
    assert os.path.getsize(tmp_path / "x" / "report.html") > 1000


def test_s3_report_after_a_rerun_shows_the_new_image_not_a_stale_thumbnail(tmp_path, s3_bucket):
    import io
    import re

    from PIL import Image

    output = f"s3://{s3_bucket}/runs"
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"conversations": _turn("a fox")}])
    run_local(
        RunRequest(pipeline="text2image", serving="echo", input=str(manifest), output=output, run_id="re"),
        workers=1,
    )
    storage = open_storage(output).child("re")
    write_report(storage, presign_only=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buf, "PNG")
    storage.write_bytes("images/0/0.png", buf.getvalue())  # a re-run overwrites, never adds
    write_report(storage, presign_only=True)
    html = storage.read_bytes("report.html").decode()
    [name] = re.findall(r"report/thumbs/([0-9a-f]+\.jpg)\?", html)
    with Image.open(io.BytesIO(storage.read_bytes(f"report/thumbs/{name}"))) as thumb:
        r, g, b = thumb.convert("RGB").getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    assert list(storage.list("report/thumbs")) == [f"report/thumbs/{name}"]  # the old one is gone


def test_local_run_with_inputs_on_s3_gets_local_thumbnails_and_presigned_links(tmp_path, s3_bucket, browser):
    open_storage(f"s3://{s3_bucket}").write_file("img/pig.png", str(GGBOND))
    rows = [{"conversations": _turn("what is it?"), "images": [f"s3://{s3_bucket}/img/pig.png"]}]
    run_local(
        RunRequest(
            pipeline="vqa",
            serving="echo",
            input=str(_write_jsonl(tmp_path / "m.jsonl", rows)),
            output=str(tmp_path / "runs"),
            run_id="s3in",
        ),
        workers=1,
    )
    result = write_report(open_storage(str(tmp_path / "runs")).child("s3in"))
    [shown] = _check_page(browser, Path(result.path), tmp_path, "s3-inputs", expect_positions=[0])
    assert shown["inputs"] == 1 and "echo: what is it?" in shown["answer"]
    html = Path(result.path).read_text()
    assert f"/{s3_bucket}/img/pig.png?" in html and "X-Amz-Signature" in html  # the full image, presigned


def test_run_report_failure_is_a_warning_not_the_runs_exit_code(tmp_path, monkeypatch):
    import dfk8s.report
    from dfk8s.errors import StorageError

    def broken(*args, **kwargs):
        raise StorageError("S3 AccessDenied on s3://b/r/report.html")

    monkeypatch.setattr(dfk8s.report, "write_report", broken)
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"conversations": _turn("p")}])
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-p",
            "vqa",
            "--serving",
            "echo",
            "-i",
            str(manifest),
            "-o",
            str(tmp_path),
            "--run-id",
            "w",
            "--no-progress",
            "--report",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "report not written: S3 AccessDenied" in result.stderr
    assert f"dfk8s report w --output {tmp_path}" in result.stderr
