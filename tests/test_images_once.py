"""Images are checked once, at plan time: the worker reads their bytes and parses only the header."""

import io
import json

from PIL import Image, ImageFile

from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.worker.shard import process_shard


def _photos(tmp_path, n):
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (i * 40 % 255, 90, 160)).save(buf, "JPEG" if i % 2 else "PNG")
        name = f"p{i}.{'jpg' if i % 2 else 'png'}"
        (tmp_path / name).write_bytes(buf.getvalue())
        rows.append({"image": name, "conversation": [{"from": "human", "value": f"what is {i}?"}]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_the_worker_does_not_check_or_decode_images_the_plan_checked(tmp_path, monkeypatch):
    from dfk8s.inputs import images
    from dfk8s.plan import checks as plan

    calls = {"check": 0, "load": 0}
    real_check, real_load = images.check_image, ImageFile.ImageFile.load

    def check(*args, **kwargs):
        calls["check"] += 1
        return real_check(*args, **kwargs)

    def load(self):
        calls["load"] += 1
        return real_load(self)

    monkeypatch.setattr(images, "check_image", check)  # read_image's
    monkeypatch.setattr(plan, "check_image", check)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    manifest = _photos(tmp_path, 6)
    storage, _, _ = prepare_run(RunRequest(pipeline="caption", serving="echo", input=str(manifest),
                                           output=str(tmp_path / "o"), run_id="once"))
    assert calls["check"] == 6  # the plan's integrity check, once per image
    calls.update(check=0, load=0)
    stats = process_shard(storage, 0)
    assert stats.ok == 6
    assert calls == {"check": 0, "load": 0}


def test_an_image_broken_after_planning_fails_its_row_only(tmp_path):
    manifest = _photos(tmp_path, 3)
    storage, _, _ = prepare_run(RunRequest(pipeline="caption", serving="echo", input=str(manifest),
                                           output=str(tmp_path / "o"), run_id="broken"))
    (tmp_path / "p1.jpg").write_bytes(b"not an image any more")
    stats = process_shard(storage, 0)
    assert stats.ok == 2 and stats.failed == 1
