"""Caption / VQA through any OpenAI-compatible chat completions API, images as data URLs."""

from __future__ import annotations

import base64

from openai.types.chat import ChatCompletion

from dfk8s.servings.api import ApiOptions, ApiServing, PerLoop, RetryableError, RowFailure, api_key_from_env
from dfk8s.servings.base import Message, Request, Response
from dfk8s.servings.openai_common import make_client, openai_errors
from dfk8s.usage import usage_from_openai_chat

DEFAULT_MODEL = "gpt-4o-mini"


def data_url(image) -> str:
    """An image as a base64 data URL, typed by its sniffed MIME type (not its file extension).

    An http(s) image left unfetched (``--image-fetch provider``) goes as its URL: the provider fetches it.
    """
    if not image.data and image.ref.startswith(("http://", "https://")):
        return image.ref
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def chat_messages(messages: list[Message]) -> list[dict]:
    """Our messages in the chat-completions wire shape; a turn with images becomes content parts."""
    out = []
    for m in messages:
        if m.images:
            parts = [{"type": "text", "text": m.text}] if m.text else []
            parts += [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in m.images]
            out.append({"role": m.role, "content": parts})
        else:
            out.append({"role": m.role, "content": m.text})
    return out


class OpenAIChatServing(ApiServing):
    """Chat completions for caption and VQA rows."""

    name = "openai-chat"

    def __init__(self, options: ApiOptions, *, temperature: float | None = None,
                 max_tokens: int | None = None):
        super().__init__(options)
        self.temperature = temperature
        self.max_tokens = max_tokens
        api_key_from_env()  # fail now, with exit 42, rather than on every row
        self.clients = PerLoop(lambda: make_client(options))

    @classmethod
    def from_spec(cls, spec) -> OpenAIChatServing:
        """Build from the shared API options plus ``temperature`` and ``max_tokens``."""
        return cls(ApiOptions.from_spec(spec, DEFAULT_MODEL), temperature=spec.option("temperature"),
                   max_tokens=spec.option("max_tokens"))

    async def call(self, request: Request) -> Response:
        """Send one row's conversation; return the answer's text.

        Raises:
            RetryableError: 429, 5xx, a timeout or lost connection, or a reply that is no usable completion.
            RowFailure: Another 4xx, a refusal or no text (retrying will not help).
            SpecError: The API refused the credentials.
        """
        extra = {}
        if self.temperature is not None:
            extra["temperature"] = self.temperature
        if self.max_tokens is not None:
            extra["max_tokens"] = self.max_tokens
        body = {"model": self.options.model, "messages": chat_messages(request.messages), **extra}
        with openai_errors():
            # The SDK's generic POST (same client, auth, errors and ChatCompletion parsing as
            # chat.completions.create) skips create()'s TypedDict transform of the body: our messages are
            # plain JSON already, and that walk was ~20% of the worker's CPU at hundreds of requests/s.
            completion = await self.clients.get().post("/chat/completions", body=body, cast_to=ChatCompletion)
        if isinstance(completion, str) or not hasattr(completion, "choices"):
            raise RetryableError("MalformedResponse", "the response is not a chat completion")
        if not completion.choices:
            raise RetryableError("EmptyResponse", "the response has no choices")
        message = completion.choices[0].message
        usage = usage_from_openai_chat(getattr(completion, "usage", None))
        paid = {"usage": usage.to_dict()} if usage is not None else {}  # a refusal is billed too
        if getattr(message, "refusal", None):
            raise RowFailure("Refusal", message.refusal, paid)
        if not message.content:
            raise RowFailure("EmptyResponse", "the model returned no text",
                             {"finish_reason": completion.choices[0].finish_reason, **paid})
        finish = completion.choices[0].finish_reason
        return Response(text=message.content, meta={"finish_reason": finish, **paid})
