"""Where a caption row's client CPU goes, step by step, for a realistic photo (1600x1200 JPEG, ~220 KB).

    python bench/row_cpu.py [--repeat 200]

Times (CPU, not wall) each step the worker does for one row with one image, on both request paths,
plus the steps it no longer does (the plan-time integrity check, a full decode) for comparison. The
HTTP client's own cost per request is measured by bench/caption_api.py; profile a whole shard with
``python -m cProfile -s tottime`` on bench/caption_api.py for the rest.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from end_to_end import _photo  # noqa: E402

from dfk8s.inputs.images import check_image, sniff_image  # noqa: E402
from dfk8s.servings.base import ImageInput, Message, Request  # noqa: E402
from dfk8s.servings.lean_http import dumps_with_images  # noqa: E402
from dfk8s.servings.openai_chat import chat_messages  # noqa: E402


def cpu_ms(func, repeat: int) -> float:
    """Mean CPU milliseconds of ``func()``."""
    func()
    started = time.process_time()
    for _ in range(repeat):
        func()
    return (time.process_time() - started) / repeat * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    data = _photo(1)
    path = "/tmp/dfk8s-row-cpu.jpg"
    with open(path, "wb") as f:
        f.write(data)
    image = ImageInput(data, "image/jpeg", path, 1600, 1200)
    request = Request("r", [Message("system", "You are a image caption generator."),
                            Message("user", "describe", (image,))])

    def sdk_body():  # what the openai SDK path does: data URL str, then json.dumps of the whole body
        body = {"model": "m", "messages": chat_messages(request.messages)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def lean_body():
        return dumps_with_images(lambda slot: {"model": "m", "messages": chat_messages(
            request.messages, lambda img: f"data:{img.mime};base64,{slot(img.data)}")})

    assert sdk_body() == lean_body()

    def read():
        with open(path, "rb") as f:
            return f.read()

    steps = [
        ("read the file (worker)", read),
        ("parse the header: type and size (worker, now)", lambda: sniff_image(data, path)),
        ("integrity check (plan; the worker did it again before)", lambda: check_image(data, path)),
        ("base64 of the bytes (inside both bodies)", lambda: base64.b64encode(data)),
        ("request body, lean path (orjson + spliced base64)", lean_body),
        ("request body, SDK path (data URL str + json.dumps)", sdk_body),
        ("full pixel decode (never done by the client)", lambda: __import__("PIL.Image").Image.open(
            io.BytesIO(data)).load()),
    ]
    print(f"photo: 1600x1200 JPEG, {len(data):,} bytes; CPU ms per call, mean of {args.repeat}")
    for name, func in steps:
        print(f"  {cpu_ms(func, args.repeat):8.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
