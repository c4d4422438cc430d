"""DataFlow-MM row shapes, accepted unchanged: conversation turns, image references, row ids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: ShareGPT's speaker names, mapped to chat roles.
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "model": "assistant", "bot": "assistant", "system": "system"}
_CONVERSATION_KEYS = ("conversations", "conversation")
_IMAGE_KEYS = ("images", "image")
_IMAGE_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?")
_SPACES = re.compile(r"[ \t]{2,}")


class RowProblem(ValueError):
    """A row does not have the shape a pipeline needs; the message names the key."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One conversation turn, in chat-completion roles."""

    role: str
    text: str


def find_key(row: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    """Return the key to read: ``explicit`` if given, else the first candidate the row has."""
    if explicit:
        return explicit
    return next((k for k in candidates if k in row), None)


#: In ``--prompt``, where the row's own text goes (``--prompt "Translate to French: {text}"``).
TEXT_FIELD = "{text}"


def conversation(row: dict, key: str | None = None, prompt: str | None = None, *,
                 default: str | None = None, own_text: bool = True) -> list[Turn]:
    """The turns a row's request carries.

    ``--prompt`` is the instruction for every row: it replaces the row's own turns, and its ``{text}``
    takes the row's own user text. Without it, the row's turns (``conversations: [{role, content}]`` or
    ``conversation: [{from, value}]``, or a plain string column) are used; a row without any gets the
    pipeline's default instruction, where it has one (caption's).

    Args:
        row: The manifest row.
        key: The input key (``--input-key``); by default ``conversations`` then ``conversation``. A plain
            string column (a LAION ``caption``) is a one-turn conversation.
        prompt: ``--prompt``.
        default: The pipeline's instruction for a row that has no conversation (None: it needs one).
        own_text: Whether the row's conversation is this stage's to use; False for the rows of a finished
            run given as ``--input`` (their conversation was the previous stage's instruction).

    Returns:
        The turns, with ShareGPT speakers mapped to roles.

    Raises:
        RowProblem: No usable turns (the key is missing and there is no prompt or default, the turns are
            malformed, or ``{text}`` finds no text).
    """
    if prompt is not None and prompt.strip():
        if TEXT_FIELD not in prompt:
            return [Turn("user", prompt)]
        try:
            own = " ".join(t.text for t in conversation(row, key) if t.role == "user")
        except RowProblem as exc:
            raise RowProblem(f"--prompt puts the row's own text at {TEXT_FIELD}, but the row has none: "
                             f"{str(exc).split(' (--prompt')[0]}") from None
        return [Turn("user", prompt.replace(TEXT_FIELD, strip_image_placeholders(own)))]
    if not own_text:
        if default:
            return [Turn("user", default)]
        raise RowProblem("the rows come from a finished run, whose conversation was its own instruction: "
                         "give this stage's with --prompt TEXT (or --input-key KEY to use a key of the rows)")
    found = find_key(row, key, _CONVERSATION_KEYS)
    if found is None or row.get(found) is None:
        if default:
            return [Turn("user", default)]
        wanted = key or " or ".join(_CONVERSATION_KEYS)
        raise RowProblem(f"missing key {wanted!r} (--prompt TEXT gives every row an instruction)")
    value = row[found]
    if isinstance(value, str):
        if not value.strip():
            if default:
                return [Turn("user", default)]
            raise RowProblem(f"{found!r} is empty")
        return [Turn("user", value)]  # a bare prompt string is a one-turn conversation
    if not isinstance(value, list) or not value:
        raise RowProblem(f"{found!r} must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowProblem(f"{found}[{i}] must be an object")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = _ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RowProblem(f"{found}[{i}] has unknown role {speaker!r}")
        text = _text_of(content)
        if text is None:
            raise RowProblem(f"{found}[{i}] has no text content")
        turns.append(Turn(role, text))
    if not any(t.role == "user" for t in turns):
        raise RowProblem(f"{found!r} has no user turn")
    return turns


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(texts) if texts else None
    return None


def strip_image_placeholders(text: str) -> str:
    """Remove ShareGPT's ``<image>`` markers: the image travels as a content part instead."""
    return _SPACES.sub(" ", _IMAGE_PLACEHOLDER.sub(" ", text)).strip()


def image_refs(row: dict, key: str | None = None) -> list[str | bytes]:
    """Read a row's image references from ``images``/``image``, a string or a list.

    A reference is a path, an ``s3://``, ``http(s)://`` or ``data:`` URI, or the image's bytes (a
    Parquet binary column, or a Hugging Face ``{"bytes", "path"}`` image struct). Empty strings are
    placeholders (DataFlow-MM writes ``[""]``) and are skipped.

    Raises:
        RowProblem: The value is neither a reference nor a list of references.
    """
    found = image_key_of(row, key)
    if found is None:
        return []
    value = row[found]
    if not isinstance(value, list):
        value = [value]
    refs = [_image_ref(v) for v in value]
    if any(r is _BAD for r in refs):
        raise RowProblem(f"{found!r} must be a string (path or URL), image bytes, or a list of them")
    return [r for r in refs if r is not None and (not isinstance(r, str) or r.strip())]


_BAD = object()


def _image_ref(value: Any):
    if isinstance(value, (str, bytes)) or value is None:
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # Hugging Face Image feature
        return value.get("bytes") or value.get("path") or None
    return _BAD


def image_key_of(row: dict, key: str | None = None) -> str | None:
    """The key a row's images are read from, or None when it has none."""
    found = find_key(row, key, _IMAGE_KEYS)
    if found is None or row.get(found) is None:
        return None
    return found


def row_id(row: dict | None, pos: int, id_key: str | None) -> str:
    """Return a row's id: the ``--id-key`` value when given, else its position."""
    if not id_key:
        return str(pos)
    if row is None or id_key not in row or row[id_key] in (None, ""):
        raise RowProblem(f"missing id key {id_key!r}")
    value = row[id_key]
    if isinstance(value, (dict, list)):
        raise RowProblem(f"id key {id_key!r} must be a string or a number")
    return str(value)
