"""Caption / VQA through any OpenAI-compatible chat completions API, images as data URLs.

Two request paths send the same bytes: the lean one (aiohttp + orjson, the default) and the openai SDK
(``--client sdk``, the reference the tests compare against).
"""

from __future__ import annotations

import base64

from dfk8s.cost.usage import usage_from_openai_chat
from dfk8s.servings import OPENAI_KEY_ENV, SERVINGS, api_key_from_env
from dfk8s.servings.api import ApiOptions, ApiServing, PerLoop, RetryableError, RowFailure
from dfk8s.servings.base import Message, Request, Response
from dfk8s.servings.lean_http import LeanClient, client_choice, dumps_with_images

DEFAULT_MODEL = SERVINGS["openai-chat"].defaults["model"]


def data_url(image) -> str:
    """An image as a base64 data URL, typed by its sniffed MIME type (not its file extension).

    An http(s) image left unfetched (``--image-fetch provider``) goes as its URL: the provider fetches it.
    """
    if not image.data and image.ref.startswith(("http://", "https://")):
        return image.ref
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode()}"


def chat_messages(messages: list[Message], url=data_url) -> list[dict]:
    """Our messages in the chat-completions wire shape; a turn with images becomes content parts.

    Args:
        messages: The request's turns.
        url: Makes an image's URL (the lean path passes one that leaves a placeholder for the base64).
    """
    out = []
    for m in messages:
        if m.images:
            parts = [{"type": "text", "text": m.text}] if m.text else []
            parts += [{"type": "image_url", "image_url": {"url": url(img)}} for img in m.images]
            out.append({"role": m.role, "content": parts})
        else:
            out.append({"role": m.role, "content": m.text})
    return out


def answer(n_choices: int, content, refusal, finish_reason, usage=None) -> Response:
    """The row's result from the first choice, read the same way from the SDK's model or the raw JSON.

    Args:
        n_choices: How many choices the answer has.
        content: The first choice's text.
        refusal: Its refusal, if any.
        finish_reason: Its finish reason.
        usage: The answer's ``usage`` (SDK object or JSON), kept in the result: a refusal is billed too.

    Raises:
        RetryableError: No choices.
        RowFailure: A refusal, or no text.
    """
    if not n_choices:
        raise RetryableError("EmptyResponse", "the response has no choices")
    counted = usage_from_openai_chat(usage)
    paid = {"usage": counted.to_dict()} if counted is not None else {}
    if refusal:
        raise RowFailure("Refusal", refusal, paid)
    if not content:
        raise RowFailure("EmptyResponse", "the model returned no text",
                         {"finish_reason": finish_reason, **paid})
    return Response(text=content, meta={"finish_reason": finish_reason, **paid})


def parse_completion(completion) -> Response:
    """The lean path's reading of a chat completion's JSON: the fields the SDK's ChatCompletion has."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list):
        raise RetryableError("MalformedResponse", "the response is not a chat completion")
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = first.get("message") or {}
    return answer(len(choices), message.get("content"), message.get("refusal"), first.get("finish_reason"),
                  completion.get("usage"))


def parse_chat_completion_sdk(completion) -> Response:
    """The SDK path's reading of a :class:`openai.types.chat.ChatCompletion`."""
    if isinstance(completion, str) or not hasattr(completion, "choices"):
        raise RetryableError("MalformedResponse", "the response is not a chat completion")
    if not completion.choices:
        return answer(0, None, None, None)
    first = completion.choices[0]
    return answer(len(completion.choices), first.message.content, getattr(first.message, "refusal", None),
                  first.finish_reason, getattr(completion, "usage", None))


class OpenAIChatServing(ApiServing):
    """Chat completions for caption and VQA rows."""

    name = "openai-chat"

    def __init__(self, options: ApiOptions, *, temperature: float | None = None,
                 max_tokens: int | None = None, client: str = "fast", api_key: str | None = None):
        super().__init__(options)
        self.extra = {}
        if temperature is not None:
            self.extra["temperature"] = temperature
        if max_tokens is not None:
            self.extra["max_tokens"] = max_tokens
        self.client = client
        # Read now, so a missing key fails with exit 42 rather than on every row; "" sends none.
        self._key = api_key_from_env(OPENAI_KEY_ENV) if api_key is None else api_key
        if client == "sdk":
            from dfk8s.servings.openai_common import make_client

            self.clients = PerLoop(lambda: make_client(options))
        else:
            self.rebind(options.api_url)

    def rebind(self, api_url: str | None) -> None:
        """Send the lean path's requests to ``api_url`` (a restarted engine listens on a new port)."""
        from dfk8s.servings.openai_common import normalise_base_url

        base = normalise_base_url(api_url) or "https://api.openai.com/v1"
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self.clients = PerLoop(lambda: LeanClient(base, headers, self.options.timeout,
                                                  self.options.max_concurrency * 2))

    @classmethod
    def from_spec(cls, spec) -> OpenAIChatServing:
        """Build from the shared API options plus ``temperature``, ``max_tokens`` and ``client``."""
        return cls(ApiOptions.from_spec(spec), temperature=spec.option("temperature"),
                   max_tokens=spec.option("max_tokens"), client=client_choice(spec))

    def body(self, request: Request, url=data_url) -> dict:
        """The chat-completions request body of one row."""
        return {"model": self.options.model, "messages": chat_messages(request.messages, url), **self.extra}

    async def call(self, request: Request) -> Response:
        """Send one row's conversation; return the answer's text.

        Raises:
            RetryableError: 429, 5xx, a timeout or lost connection, or a reply that is no usable completion.
            RowFailure: Another 4xx, a refusal or no text (retrying will not help).
        """
        if self.client == "sdk":
            return await self._call_sdk(request)
        def body(slot) -> dict:
            def url(img) -> str:  # an unfetched URL (--image-fetch provider) goes as itself, as data_url does
                return f"data:{img.mime};base64,{slot(img.data)}" if img.data else data_url(img)

            return self.body(request, url)

        data = dumps_with_images(body)
        return parse_completion(await self.clients.get().post("/chat/completions", data))

    async def _call_sdk(self, request: Request) -> Response:
        from openai.types.chat import ChatCompletion

        from dfk8s.servings.openai_common import openai_errors

        client = self.clients.get()
        with openai_errors(client.base_url.host):
            # The SDK's generic POST (same client, auth, errors and ChatCompletion parsing as
            # chat.completions.create) skips create()'s TypedDict transform of the body: our messages are
            # plain JSON already, and that walk was ~20% of the worker's CPU at hundreds of requests/s.
            completion = await client.post("/chat/completions", body=self.body(request),
                                           cast_to=ChatCompletion)
        return parse_chat_completion_sdk(completion)
