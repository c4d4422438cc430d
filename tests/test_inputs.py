"""The inputs users have: Parquet manifests, folders and globs, image folders, --prompt, --limit, --sample,
binary image columns and data: URIs; end to end through `dfk8s run` against the fake API."""

import base64
import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import SpecError, UsageError
from dfk8s.executors.local.launch import run_local
from dfk8s.inputs.manifest import Manifest
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.image_server import ImageServer, png


def _lines(storage, key):
    return [json.loads(line) for line in storage.open_lines(key)]


def _shard_rows(storage):
    rows = []
    for key in storage.list(layout.INPUT_PREFIX):
        rows += _lines(storage, key)
    return rows


def _prompts(path, n, *, start=0):
    turn = [{"role": "user", "content": ""}]
    path.write_text("".join(json.dumps({"uid": f"r{i}", "conversations": [{**turn[0], "content": f"p{i}"}]})
                            + "\n" for i in range(start, start + n)))
    return path


@pytest.fixture(scope="module")
def images():
    with ImageServer("127.0.0.1") as server:
        yield server


def test_parquet_with_url_binary_and_id_columns_runs_end_to_end(tmp_path, images, fake_api, api_key):
    good, other = png((8, 8)), png((12, 6), (0, 90, 0))
    table = pa.table({
        "key": ["a", "b", "c", "d", "e"],
        "url": [f"{images.url}/img/{k}.png" for k in "ab"] + [f"{images.url}/missing.png",
                                                             f"{images.url}/img/d.png", None],
        "jpg": pa.array([good, other, good, b"not an image", None], pa.binary()),
        "caption": ["a cat", "a dog", "a hat", "a bat", "a mat"],
    })
    path = tmp_path / "laion-part-00000.parquet"
    pq.write_table(table, path, row_group_size=2)  # three row groups
    base = ["run", "-p", "caption", "-i", str(path), "--id-key", "key", "--prompt", "Describe the image.",
            "-o", str(tmp_path / "runs"), "--api-url", fake_api.url + "/v1", "--workers", "1",
            "--no-progress", "--allow-private-image-hosts"]
    by_url = CliRunner().invoke(cli, [*base, "--image-key", "url", "--run-id", "urls", "--limit", "4"])
    assert by_url.exit_code == 0, by_url.output
    assert "4 rows: 3 ok, 1 failed" in by_url.output
    rows = _lines(open_storage(str(tmp_path / "runs/urls")), layout.RESULT_KEY)
    assert [r["key"] for r in rows] == ["a", "b", "c", "d"]
    assert [("caption" in r and r["caption"].startswith("fake caption")) for r in rows] == [1, 1, 0, 1]
    assert rows[2]["error"]["type"] == "ImageFetchError" and rows[2]["error"]["status"] == 404
    assert all(isinstance(r["jpg"], str) for r in rows[:3])  # bytes that are not the image: base64 text
    sent = fake_api.requests()
    assert len(sent) == 3 and all(s["prompt"] == "Describe the image." for s in sent)
    assert all(s["image_mimes"] == ["image/png"] for s in sent)

    fake_api.reset()
    by_bytes = CliRunner().invoke(cli, [*base, "--image-key", "jpg", "--run-id", "bytes"])
    assert by_bytes.exit_code == 0, by_bytes.output
    storage = open_storage(str(tmp_path / "runs/bytes"))
    rows = _lines(storage, layout.RESULT_KEY)
    assert [r["key"] for r in rows] == list("abcde")
    assert ["caption" in r for r in rows] == [True, True, True, False, False]
    assert "row 4" in rows[3]["error"]["message"] and "does not decode" in rows[3]["error"]["message"]
    assert "needs an input image" in rows[4]["error"]["message"]
    staged = sorted(storage.list(layout.STAGED_PREFIX))
    assert len(staged) == 2  # a and c share one content-addressed copy
    # Named relative to the run's folder: they resolve wherever the folder is copied.
    assert rows[0]["jpg"] == rows[2]["jpg"] and rows[0]["jpg"] in set(staged)
    assert storage.read_bytes(rows[0]["jpg"]) == good
    assert storage.read_bytes(rows[1]["jpg"]) == other
    assert len(fake_api.requests()) == 3


def test_validate_names_bad_parquet_rows_by_number(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"question": ["ok?", None, "fine?"], "image": ["", "", "nope.png"]}), path)
    result = CliRunner().invoke(cli, ["validate", "-p", "vqa", "-i", str(path), "--input-key", "question"])
    assert result.exit_code == 1
    assert f"{path}: row 2: missing key 'question'" in result.output
    assert f"{path}: row 3: image 'nope.png'" in result.output and "not found" in result.output
    assert "1 of 3 rows are good" in result.output


def test_a_folder_or_glob_is_one_manifest_in_sorted_file_order(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    _prompts(folder / "part-01.jsonl", 2, start=2)
    pq.write_table(pa.table({"uid": ["r0", "r1"], "conversations": [
        [{"role": "user", "content": "p0"}], [{"role": "user", "content": "p1"}]]}),
        folder / "part-00.parquet")
    (folder / "part-02.jsonl").write_text(
        '{"uid": "r4", "conversations": [{"role": "user", "content": "p4"}]}\n{broken\n')
    (folder / "README.txt").write_text("not a manifest")
    (folder / "_temporary").mkdir()
    _prompts(folder / "_temporary" / "part-00.jsonl", 3)  # a writer's leftovers: not data
    _prompts(folder / ".part-00.jsonl", 3)
    items = list(Manifest(str(folder)))
    assert [i.pos for i in items] == list(range(6))
    assert [i.row["uid"] for i in items if i.row] == ["r0", "r1", "r2", "r3", "r4"]
    assert items[0].where == "part-00.parquet row 1" and items[5].where == "part-02.jsonl line 2"
    summary = run_local(RunRequest(pipeline="vqa", serving="echo", input=str(tmp_path / "parts/part-0*"),
                                   output=str(tmp_path / "o"), run_id="g"), workers=1)
    result = _lines(open_storage(str(tmp_path / "o/g")), layout.RESULT_KEY)
    assert [r.get("answer") for r in result[:5]] == [f"echo: p{i}" for i in range(5)]
    assert summary.rows == 6 and result[5]["error"]["message"].startswith("part-02.jsonl line 2: bad JSON")
    from dfk8s.inputs.manifest import expand_source

    assert expand_source(str(folder / "part-0*")).root == str(folder)  # relative images start there


def test_a_folder_of_images_needs_nothing_else(tmp_path):
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    (folder / "a.png").write_bytes(png())
    (folder / "b" / "c.jpg").write_bytes(png())
    (folder / "notes.txt").write_text("ignored")
    # caption has DataFlow-MM's instruction for a row with an image and no conversation.
    checked = CliRunner().invoke(cli, ["validate", "-p", "caption", "-i", str(folder)])
    assert checked.exit_code == 0, checked.output
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=str(folder),
                                   output=str(tmp_path / "o"), run_id="d"), workers=1)
    result = _lines(open_storage(str(tmp_path / "o/d")), layout.RESULT_KEY)
    assert summary.ok == 2
    assert all(r["caption"] == "echo: Generate detailed captions based on image content." for r in result)
    # --prompt is every row's instruction.
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=str(folder),
                                   output=str(tmp_path / "o"), run_id="f",
                                   options={"prompt": "What is in the picture?"}), workers=1)
    result = _lines(open_storage(str(tmp_path / "o/f")), layout.RESULT_KEY)
    assert summary.ok == 2
    # The image paths resolve from anywhere: the run's folder is not the manifest's.
    assert [r["image"] for r in result] == [str(folder / "a.png"), str(folder / "b" / "c.jpg")]
    assert all(r["caption"] == "echo: What is in the picture?" for r in result)
    # vqa has no default question: every row would fail, so the run is refused before it starts (exit 2).
    refused = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i", str(folder),
                                       "-o", str(tmp_path / "o"), "--no-progress"], standalone_mode=False)
    assert isinstance(refused.exception, UsageError) and refused.exception.exit_code == 2
    assert "every row has a problem" in str(refused.exception) and "'image'" in str(refused.exception)


def test_prompt_is_every_rows_instruction_and_text_brings_in_the_rows_own(tmp_path):
    from dfk8s.worker.shard import process_shard

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "own"}]}) + "\n"
                    + json.dumps({"other": 1}) + "\n")
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(path),
                                           output=str(tmp_path), run_id="p", options={"prompt": "given"}))
    process_shard(storage, 0)
    assert [r.get("answer") for r in _lines(storage, layout.shard_output_key(0))] == ["echo: given"] * 2
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(path),
                                           output=str(tmp_path), run_id="t",
                                           options={"prompt": "Answer briefly: {text}"}))
    process_shard(storage, 0)
    first, second = _lines(storage, layout.shard_output_key(0))
    assert first["answer"] == "echo: Answer briefly: own"
    assert "answer" not in second and "has none" in second["error"]["message"]


def test_input_key_may_name_a_plain_caption_column_for_text2image(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"url": ["http://img.example/1.jpg", "http://img.example/2.jpg"],
                             "TEXT": ["a red barn", ""]}), path)
    summary = run_local(RunRequest(pipeline="text2image", serving="echo", input=str(path), input_key="TEXT",
                                   output=str(tmp_path / "o"), run_id="t"), workers=1)
    result = _lines(open_storage(str(tmp_path / "o/t")), layout.RESULT_KEY)
    assert summary.ok == 1 and result[0]["images"] and "'TEXT' is empty" in result[1]["error"]["message"]


def test_limit_and_sample_change_what_is_planned(tmp_path):
    manifest = _prompts(tmp_path / "m.jsonl", 100)
    _, limited, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                           output=str(tmp_path), run_id="l", limit=7))
    storage = open_storage(str(tmp_path / "l"))
    assert limited.rows == 7 and [r["id"] for r in _shard_rows(storage)] == [str(i) for i in range(7)]
    _, sampled, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                           output=str(tmp_path), run_id="s", sample=10, seed=3))
    picked = [r["pos"] for r in _shard_rows(open_storage(str(tmp_path / "s")))]
    assert sampled.rows == 10 and picked == sorted(picked) and len(set(picked)) == 10
    assert picked != list(range(10))
    again = [i.pos for i in Manifest(str(manifest), sample=10, seed=3)]
    assert again == picked  # the seed makes it repeatable
    assert [i.pos for i in Manifest(str(manifest), sample=10, seed=4)] != picked
    assert [i.pos for i in Manifest(str(manifest), limit=20, sample=5, seed=1)][-1] < 20
    with pytest.raises(SpecError, match="--limit 7"):
        prepare_run(RunRequest(pipeline="vqa", input=str(manifest), output=str(tmp_path), run_id="l",
                               limit=8))


def test_sample_is_uniform():
    counts = collections.Counter()
    from dfk8s.inputs.manifest import ManifestItem, _reservoir

    for seed in range(3000):
        counts.update(i.pos for i in _reservoir(iter([ManifestItem(p, "", {}) for p in range(10)]), 3, seed))
    # each of 10 positions is kept with probability 3/10: 900 of 3000 expected, sd ~25
    assert all(780 < counts[p] < 1020 for p in range(10)), counts


def test_data_uris_are_decoded_checked_and_staged(tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    path = tmp_path / "m.jsonl"
    refs = (uri, "data:image/png;base64,!!!notbase64", "data:text/plain," + "hello" * 200)
    path.write_text("".join(json.dumps({"image": ref, "conversations": [{"role": "user", "content": "x"}]})
                            + "\n" for ref in refs))
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=str(path),
                                   output=str(tmp_path / "o"), run_id="d"), workers=1)
    storage = open_storage(str(tmp_path / "o/d"))
    result = _lines(storage, layout.RESULT_KEY)
    assert summary.ok == 1 and result[0]["image"] == uri  # the row is kept as written
    assert "not valid base64" in result[1]["error"]["message"]
    assert "does not decode" in result[2]["error"]["message"]
    assert len(result[2]["error"]["message"]) < 200  # a 1 kB inline image is not printed whole
    assert [r["images"][0].startswith("run:staged/") for r in _shard_rows(storage)[:1]] == [True]


def test_submit_plan_stages_local_and_binary_images_but_not_urls(tmp_path, s3_bucket):
    from dfk8s.executors.kubernetes import count_plan

    (tmp_path / "local.png").write_bytes(png((5, 5)))
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"ref": ["https://images.example.com/a.jpg", "local.png", None],
                             "blob": pa.array([None, None, png((7, 7))], pa.binary()),
                             "n": [1, 2, 3]}), path)
    output = f"s3://{s3_bucket}/runs"
    refs = {}
    for key in ("ref", "blob"):
        request = RunRequest(pipeline="caption", serving="echo", input=str(path), output=output, run_id=key,
                             image_key=key, id_key="n", options={"prompt": "p"})
        storage, _, _ = prepare_run(request, stage_images=True)
        refs[key] = [r["images"] for r in _shard_rows(storage)]
        assert count_plan(request)[:2] == (3, 2 if key == "ref" else 1)
    assert refs["ref"][0] == ["https://images.example.com/a.jpg"]  # pods fetch it, nothing staged
    assert refs["ref"][1][0].startswith("run:staged/") and refs["ref"][2] == []
    assert refs["blob"][2][0].startswith("run:staged/") and refs["blob"][0] == []
    blob_run = open_storage(output).child("blob")
    assert blob_run.read_bytes(refs["blob"][2][0][len("run:"):]) == png((7, 7))
    limited = RunRequest(pipeline="caption", serving="echo", input=str(path), output=output, image_key="ref",
                         options={"prompt": "p"}, limit=1)
    assert count_plan(limited)[:2] == (1, 1)


def test_parquet_and_a_folder_on_s3(tmp_path, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}")
    local = tmp_path / "m.parquet"
    pq.write_table(pa.table({"question": [f"q{i}" for i in range(50)]}), local, row_group_size=10)
    storage.write_file("data/part-0.parquet", str(local))
    storage.write_bytes("data/part-1.jsonl", b'{"question": "last"}\n')
    one = list(Manifest(f"s3://{s3_bucket}/data/part-0.parquet"))
    assert [i.row["question"] for i in one] == [f"q{i}" for i in range(50)]
    both = list(Manifest(f"s3://{s3_bucket}/data/"))
    assert len(both) == 51 and both[-1].where == "part-1.jsonl line 1" and both[-1].pos == 50
    assert [i.pos for i in Manifest(f"s3://{s3_bucket}/data/*.parquet", limit=3)] == [0, 1, 2]
    from dfk8s.inputs.manifest import expand_source

    assert expand_source(f"s3://{s3_bucket}/data/part-*").root == f"s3://{s3_bucket}/data"


def test_image_fetch_provider_passes_urls_to_the_api(tmp_path, images, fake_api, api_key):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"url": f"{images.url}/img/provider.png"}) + "\n")
    before = len(images.hits["/img/provider.png"])
    options = {"api_url": fake_api.url, "prompt": "p", "image_fetch": "provider"}
    summary = run_local(RunRequest(pipeline="caption", input=str(path), output=str(tmp_path / "o"),
                                   run_id="pf", image_key="url", options=options), workers=1)
    assert summary.ok == 1
    sent = fake_api.requests()
    assert sent[0]["image_urls"] == [f"{images.url}/img/provider.png"]
    parts = sent[0]["body"]["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"] == f"{images.url}/img/provider.png"
    assert len(images.hits["/img/provider.png"]) == before + 1  # fetched once, by the provider only
    with pytest.raises(SpecError, match="openai-chat"):
        prepare_run(RunRequest(pipeline="caption", serving="echo", input=str(path),
                               output=str(tmp_path / "o"), image_key="url",
                               options={"prompt": "p", "image_fetch": "provider"}))


def test_cli_flags_reach_the_plan(tmp_path):
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for flag in ("--prompt", "--limit", "--sample", "--image-timeout", "--allow-private-image-hosts",
                 "--allow-image-network", "--image-fetch"):
        assert flag in help_text, flag
    manifest = _prompts(tmp_path / "m.jsonl", 30)
    run = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i", str(manifest), "-o",
                                   str(tmp_path / "o"), "--run-id", "s", "--sample", "4", "--seed", "9",
                                   "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "planned 4 rows" in run.output and "4 rows: 4 ok" in run.output
    spec = json.loads((tmp_path / "o/s/run.json").read_text())
    assert spec["sample"] == 4 and spec["limit"] is None
    checked = CliRunner().invoke(cli, ["validate", "-p", "vqa", "-i", str(manifest), "--limit", "5"])
    assert checked.exit_code == 0 and "5 of 5 rows are good" in checked.output
    bad = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i", str(manifest), "-o",
                                   str(tmp_path / "o"), "--allow-image-network", "not-a-net",
                                   "--no-progress"])
    assert bad.exit_code != 0 and "not-a-net" in str(bad.exception) + bad.output


def test_submit_dry_run_plans_the_same_limited_parquet_rows(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    path = tmp_path / "laion-part-00000.parquet"
    pq.write_table(pa.table({"url": [f"https://img.example.com/{i}.jpg" for i in range(500)],
                             "caption": ["c"] * 500}), path, row_group_size=100)
    result = CliRunner().invoke(cli, [
        "submit", "-p", "caption", "-i", str(path), "--image-key", "url", "--prompt", "Describe the image.",
        "--limit", "100", "--output", f"s3://{s3_bucket}/runs", "--api-key-secret", "api/DF_API_KEY",
        "--s3-secret", "s3", "--rows-per-shard", "30", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "rows: 100\n" in result.output and "shards: 4 of up to 30 rows" in result.output
    assert "completions: 4" in result.output
    assert not list(open_storage(f"s3://{s3_bucket}").list(""))  # a dry run writes nothing


def test_duplicate_ids_are_found_past_the_in_memory_set(tmp_path, monkeypatch):
    from dfk8s.plan import checks as plan

    monkeypatch.setattr(plan.SeenIds.__init__, "__defaults__", (50,))  # spill to SQLite after 50 ids
    path = tmp_path / "m.parquet"
    ids = [f"k{i}" for i in range(200)] + ["k7", "k150"]
    pq.write_table(pa.table({"key": ids, "question": ["q"] * len(ids)}), path)
    result = CliRunner().invoke(cli, ["validate", "-p", "vqa", "-i", str(path), "--input-key", "question",
                                      "--id-key", "key"])
    assert result.exit_code == 1
    assert f"{path}: row 201: duplicate id 'k7'" in result.output
    assert f"{path}: row 202: duplicate id 'k150'" in result.output
    assert "200 of 202 rows are good" in result.output


def test_zero_and_false_flag_values_reach_the_run_spec(tmp_path):
    # A filter meant to drop an unset --allow-private-image-hosts dropped every 0 too (0 == False).
    manifest = _prompts(tmp_path / "m.jsonl", 2)
    run = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i", str(manifest), "-o",
                                   str(tmp_path / "o"), "--run-id", "z", "--temperature", "0",
                                   "--max-retries", "0", "--no-progress"])
    assert run.exit_code == 0, run.output
    options = json.loads((tmp_path / "o/z/run.json").read_text())["options"]
    assert options["temperature"] == 0 and options["max_retries"] == 0
