"""Unit tests for the pure parts: manifest streaming, row shapes, images, layout."""

import hashlib
import io
import json

import pytest
from PIL import Image

from dfk8s.errors import ManifestError
from dfk8s.inputs import rows
from dfk8s.inputs.images import ImageProblem, check_image, resolve_ref
from dfk8s.inputs.manifest import Manifest
from dfk8s.run import layout
from tests.conftest import SEED_DOCS, VQA_MANIFEST


def _png(size=(8, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


def test_jsonl_keeps_bad_lines_as_items_with_their_line_number(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n{broken\n[1, 2]\n{"a": 2}\n')
    items = list(Manifest(str(path)))
    assert [i.pos for i in items] == [0, 1, 2, 3]
    assert items[0].row == {"a": 1} and items[3].row == {"a": 2}
    assert items[1].row is None and items[1].where == "line 3" and "bad JSON" in items[1].error
    assert items[1].raw == "{broken"
    assert items[2].error == "expected a JSON object, got an array"


def test_json_array_is_streamed_with_element_numbers_and_digest():
    manifest = Manifest(str(VQA_MANIFEST))
    items = list(manifest)
    assert len(items) == 8 and items[7].where == "element 8"
    assert items[1].row["image"] == ["./dataflow/example/vqa/ggbond.png"]
    assert manifest.format == "json"
    assert manifest.digest == hashlib.sha256(VQA_MANIFEST.read_bytes()).hexdigest()


def test_broken_json_array_names_the_element(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[{"a": 1}, {"a": 2}, {"a": ]')
    with pytest.raises(ManifestError, match="after element 2"):
        list(Manifest(str(path)))


def test_missing_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        list(Manifest(str(tmp_path / "nope.jsonl")))


def test_json_array_floats_are_plain_floats(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[{"score": 0.5}]')
    assert list(Manifest(str(path)))[0].row == {"score": 0.5}
    assert json.dumps(list(Manifest(str(path)))[0].row)  # Decimal would not serialise


@pytest.mark.parametrize("row", [
    {"conversations": [{"role": "user", "content": "hi <image>"}]},
    {"conversation": [{"from": "human", "value": "hi <image>"}]},
])
def test_both_dataflow_conversation_shapes(row):
    assert rows.conversation(row) == [rows.Turn("user", "hi <image>")]


def test_sharegpt_roles_and_missing_key():
    turns = rows.conversation({"conversation": [{"from": "system", "value": "s"},
                                                {"from": "human", "value": "q"},
                                                {"from": "gpt", "value": "a"}]})
    assert [t.role for t in turns] == ["system", "user", "assistant"]
    with pytest.raises(rows.RowProblem, match="missing key 'conversations or conversation'"):
        rows.conversation({"prompt": "x"})
    with pytest.raises(rows.RowProblem, match="unknown role"):
        rows.conversation({"conversation": [{"from": "alien", "value": "x"}]})


def test_image_placeholders_are_removed():
    assert rows.strip_image_placeholders("<image>\nWhat is this?") == "What is this?"
    assert rows.strip_image_placeholders("Look <image> here") == "Look here"


def test_image_refs_string_list_and_placeholders():
    assert rows.image_refs({"image": "a.png"}) == ["a.png"]
    assert rows.image_refs({"images": ["a.png", "", "b.png"]}) == ["a.png", "b.png"]
    assert rows.image_refs({"other": 1}) == []
    with pytest.raises(rows.RowProblem):
        rows.image_refs({"images": [1, 2]})


def test_row_id_from_key_or_position():
    assert rows.row_id({"uid": 7}, 3, "uid") == "7"
    assert rows.row_id({}, 3, None) == "3"
    with pytest.raises(rows.RowProblem):
        rows.row_id({}, 3, "uid")


def test_mime_is_sniffed_from_bytes_not_extension(tmp_path):
    jpeg_named_png = tmp_path / "photo.png"
    jpeg_named_png.write_bytes(_png(fmt="JPEG"))
    checked = check_image(jpeg_named_png.read_bytes(), str(jpeg_named_png))
    assert checked.mime == "image/jpeg"
    assert check_image(_png(), "x").mime == "image/png"


def test_undecodable_and_oversized_images_are_rejected():
    with pytest.raises(ImageProblem, match="does not decode"):
        check_image(b"not an image at all", "bad.png")
    with pytest.raises(ImageProblem, match="pixel limit"):
        check_image(_png((100, 100)), "big.png", max_pixels=50 * 50)


def test_refs_resolve_relative_to_root(tmp_path):
    assert resolve_ref("a/b.png", str(tmp_path)) == str(tmp_path / "a/b.png")
    assert resolve_ref("s3://bucket/x.png", str(tmp_path)) == "s3://bucket/x.png"


def test_layout_names_are_deterministic_and_safe():
    assert layout.shard_input_key(3) == "input/00003.jsonl"
    assert layout.part_key(3, 12) == "parts/00003/000012.jsonl"
    assert layout.done_index(layout.shard_done_key(42)) == 42
    assert layout.done_index("output/00042.jsonl") is None
    assert layout.image_key("a/b c", 1) == "images/a_b_c/1.png"


def test_seed_docs_fixtures_all_parse():
    for path in SEED_DOCS.iterdir():
        items = list(Manifest(str(path)))
        assert items and all(i.row is not None for i in items), path
