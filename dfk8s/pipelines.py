"""Pipelines registry: what each pipeline reads from a row, asks a serving, and writes back."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dfk8s.errors import UsageError
from dfk8s.inputs import rows
from dfk8s.servings.base import ImageInput, Message, Request

#: DataFlow-MM's caption system prompt, kept word for word so outputs stay comparable.
CAPTION_SYSTEM_PROMPT = ("You are a image caption generator. Your task is to generate a concise and "
                         "informative caption for the given image content.")
#: DataFlow-MM's caption instruction (its caption example's user turn): what a row with an image and no
#: conversation is asked.
CAPTION_INSTRUCTION = "Generate detailed captions based on image content."


@dataclass(frozen=True)
class Pipeline:
    """One pipeline's row contract.

    Attributes:
        name: Registry name.
        default_serving: Serving used when ``--serving`` is not given.
        servings: Servings that can run this pipeline.
        output_key: Default key the result is written to.
        output_kind: ``text`` (a string) or ``images`` (a list of stored image URLs).
        uses_images: Whether input images are read from the row.
        needs_images: Whether a row without an input image is an error.
        system_prompt: Default system prompt (None: no system turn).
        default_instruction: The user turn of a row without a conversation (None: such a row needs
            ``--prompt``).
    """

    name: str
    default_serving: str
    servings: tuple[str, ...]
    output_key: str
    output_kind: str
    uses_images: bool
    needs_images: bool
    system_prompt: str | None = None
    default_instruction: str | None = None

    def image_refs(self, row: dict, image_key: str | None) -> list[str | bytes]:
        """The row's input image references (empty for pipelines that take none).

        Raises:
            rows.RowProblem: Malformed value, or no image where one is required.
        """
        if not self.uses_images:
            return []
        refs = rows.image_refs(row, image_key)
        if self.needs_images and not refs:
            raise rows.RowProblem(f"{self.name} needs an input image (key {image_key or 'images/image'!r})")
        return refs

    def check_row(self, row: dict, input_key: str | None, prompt: str | None = None, *,
                  own_text: bool = True) -> list[rows.Turn]:
        """The row's turns (see :func:`dfk8s.inputs.rows.conversation`); RowProblem names what is wrong.

        ``prompt`` (``--prompt``) is every row's instruction; ``own_text`` False: the row's conversation
        belongs to the finished run it comes from.
        """
        return rows.conversation(row, input_key, prompt, default=self.default_instruction, own_text=own_text)

    def build_request(self, row: dict, images: list[ImageInput], *, row_id: str, input_key: str | None,
                      system_prompt: str | None, seed: int, prompt: str | None = None,
                      own_text: bool = True) -> Request:
        """Turn a row into a serving request: system prompt, turns, images on the first user turn."""
        turns = self.check_row(row, input_key, prompt, own_text=own_text)
        messages: list[Message] = []
        system = system_prompt if system_prompt is not None else self.system_prompt
        if system and not any(t.role == "system" for t in turns):
            messages.append(Message("system", system))
        attached = False
        for turn in turns:
            text = rows.strip_image_placeholders(turn.text) if images else turn.text
            if turn.role == "user" and not attached and images:
                messages.append(Message("user", text, tuple(images)))
                attached = True
            else:
                messages.append(Message(turn.role, text))
        return Request(row_id=row_id, messages=messages, images=list(images), seed=row_seed(seed, row_id))


def row_seed(run_seed: int, row_id: str) -> int:
    """A row's seed, stable across re-runs and machines (not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{run_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _servings(pipeline: str) -> tuple[str, ...]:
    """The servings that run ``pipeline``, as the servings registry describes them."""
    from dfk8s.servings import SERVINGS

    return tuple(name for name, s in SERVINGS.items() if pipeline in s.pipelines)


PIPELINES: dict[str, Pipeline] = {
    "caption": Pipeline("caption", "openai-chat", _servings("caption"), "caption", "text", uses_images=True,
                        needs_images=True, system_prompt=CAPTION_SYSTEM_PROMPT,
                        default_instruction=CAPTION_INSTRUCTION),
    "vqa": Pipeline("vqa", "openai-chat", _servings("vqa"), "answer", "text", uses_images=True,
                    needs_images=False),
    "text2image": Pipeline("text2image", "diffusers", _servings("text2image"), "images", "images",
                           uses_images=False, needs_images=False),
    "imageedit": Pipeline("imageedit", "diffusers", _servings("imageedit"), "edited_images", "images",
                          uses_images=True, needs_images=True),
}


def get_pipeline(name: str) -> Pipeline:
    """Return the pipeline registered as ``name``.

    Raises:
        SpecError: Unknown name.
    """
    try:
        return PIPELINES[name]
    except KeyError:
        raise UsageError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}") from None


def serving_for(pipeline: str | None, serving: str | None = None) -> str | None:
    """The serving a run uses: ``serving`` when given, else ``pipeline``'s default (None if unknown)."""
    if serving:
        return serving
    found = PIPELINES.get(pipeline) if pipeline else None
    return found.default_serving if found is not None else None


def check_serving(pipeline: Pipeline, serving: str) -> None:
    """Raise SpecError if ``serving`` cannot run ``pipeline``."""
    if serving not in pipeline.servings:
        raise UsageError(f"pipeline {pipeline.name!r} cannot use serving {serving!r}; "
                        f"use one of {', '.join(pipeline.servings)}")
