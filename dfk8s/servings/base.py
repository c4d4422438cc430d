"""What a pipeline hands a serving and gets back; the one contract every serving implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An input image that already decoded, with its sniffed MIME type."""

    data: bytes
    mime: str
    ref: str
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn; ``images`` ride on the turn they belong to (the first user turn)."""

    role: str
    text: str
    images: tuple[ImageInput, ...] = ()


@dataclass(slots=True)
class Request:
    """One row's work for a serving.

    Attributes:
        row_id: The row's id, for logs and deterministic names.
        messages: System prompt (if any) and the conversation, in order.
        images: All the row's input images (also attached to their message).
        seed: Per-row seed, derived from the run seed and the row id.
    """

    row_id: str
    messages: list[Message]
    images: list[ImageInput] = field(default_factory=list)
    seed: int = 0

    @property
    def prompt(self) -> str:
        """The last user turn's text: the prompt for image servings."""
        return next((m.text for m in reversed(self.messages) if m.role == "user"), "")

    @property
    def system(self) -> str | None:
        """The system prompt, if any."""
        return next((m.text for m in self.messages if m.role == "system"), None)


@dataclass(slots=True)
class Response:
    """A serving's answer for one row: text, images (encoded bytes) or both."""

    text: str | None = None
    images: list[bytes] = field(default_factory=list)
    attempts: int = 1
    meta: dict = field(default_factory=dict)


@dataclass(slots=True)
class RowError:
    """Why one row failed; it becomes the row's error record."""

    type: str
    message: str
    attempts: int = 1
    details: dict = field(default_factory=dict)

    def to_record(self) -> dict:
        """The error record written into the output row and errors.jsonl."""
        record = {"type": self.type, "message": self.message, "attempts": self.attempts}
        record.update(self.details)
        return record


class Serving(abc.ABC):
    """Turns batches of requests into responses; never raises for one bad row.

    Subclasses set ``batch_size`` (requests per :meth:`run` call) and ``concurrency`` (calls the worker
    keeps in flight), and are built from a run spec with :meth:`from_spec`.
    """

    name: str = ""
    batch_size: int = 1
    concurrency: int = 1

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec) -> Serving:
        """Build the serving from a :class:`dfk8s.run.spec.RunSpec`; raise SpecError on bad options."""

    @abc.abstractmethod
    async def run(self, batch: list[Request]) -> list[Response | RowError]:
        """Process a batch; the result has one entry per request, in order."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close what is bound to the worker's event loop (HTTP connection pools), inside that loop."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models and other resources not bound to an event loop."""
