"""The provider side of batch mode: OpenAI's Batch API and Gemini's Batch Mode, through their SDKs.

Each provider turns a row's request into one line of its input file, uploads the file, creates, finds,
polls and cancels a batch, and turns each result line back into the row's Response or RowError, with
the same checks and error records as the synchronous servings. :mod:`dfk8s.servings.batch_mode` drives them.
"""

from __future__ import annotations

import base64
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dfk8s.servings.base import Request, Response, RowError


@dataclass
class BatchState:
    """A batch as the provider reports it.

    Attributes:
        batch_id: The provider's id (``batch_...``, ``batches/...``).
        status: The provider's own state name (``in_progress``, ``JOB_STATE_RUNNING``, ...).
        done: Whether the state is final (completed, failed, expired, cancelled).
        counts: ``total`` / ``completed`` / ``failed`` where the provider reports them.
        files: The result files to download (output and error files, or Gemini's responses file).
        errors: The provider's messages for a failed batch.
    """

    batch_id: str
    status: str
    done: bool
    counts: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


#: How a gateway (LiteLLM) says its batch API is not set up: its own configuration, not an outage.
_NOT_SET_UP = ("is not set", "config.yaml", "not configured", "not supported")


@contextmanager
def _shard_errors(mapper):
    """SDK errors mapped as the sync servings map them; a failure stops the shard.

    An outage (429, 5xx, timeouts) stops it for a retry. What retrying cannot change stops it with exit
    42: a 4xx of the files or batches API (bad key, model, request), or a gateway that answers that its
    batch API is not set up (LiteLLM: HTTP 500 "files_settings is not set"), with the gateway's words.
    """
    from dfk8s.errors import ServingUnavailable, SpecError
    from dfk8s.servings.api import RetryableError, RowFailure

    try:
        with mapper():
            yield
    except RowFailure as err:
        raise SpecError(f"batch API: {err}") from None
    except RetryableError as err:
        if any(words in str(err).lower() for words in _NOT_SET_UP):
            raise SpecError(f"batch API: {err} (the gateway's batch API is not set up: set it up there, or "
                            "run with --api-mode sync)") from None
        raise ServingUnavailable(f"batch API: {err}") from None


def _row_error(exc) -> RowError:
    return RowError(exc.kind, str(exc), 1, dict(getattr(exc, "details", {}) or {}))


# ----- OpenAI ----------------------------------------------------------------------------------------


class OpenAIBatchProvider:
    """``/v1/files`` + ``/v1/batches`` for openai-chat (chat completions) and openai-images (generations)."""

    name = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    terminal = ("completed", "failed", "expired", "cancelled")

    def __init__(self, spec):
        from dfk8s.servings.api import ApiOptions
        from dfk8s.servings.openai_common import make_client

        self.spec = spec
        self.kind = spec.serving
        self.endpoint = "/v1/chat/completions" if self.kind == "openai-chat" else "/v1/images/generations"
        self.client = make_client(ApiOptions.from_spec(spec))
        self.serving = None
        if self.kind == "openai-images":
            from dfk8s.servings.openai_images import OpenAIImagesServing

            self.serving = OpenAIImagesServing.from_spec(spec)

    def _errors(self):
        from dfk8s.servings.openai_common import openai_errors

        return _shard_errors(openai_errors)

    def line(self, row_id: str, request: Request) -> str:
        """The input-file line of one row (raises RowFailure for a row that cannot be sent)."""
        if self.kind == "openai-chat":
            from dfk8s.servings.openai_chat import chat_messages

            body: dict[str, Any] = {"model": self.spec.option("model"),
                                    "messages": chat_messages(request.messages)}
            for key in ("temperature", "max_tokens"):
                if self.spec.option(key) is not None:
                    body[key] = self.spec.option(key)
        else:
            self.serving._check_prompt(request.prompt)
            body = {"prompt": request.prompt, **self.serving._common()}
        return json.dumps({"custom_id": row_id, "method": "POST", "url": self.endpoint, "body": body},
                          ensure_ascii=False, separators=(",", ":"))

    async def upload(self, path: str, display: str) -> str:
        """Upload the input file; returns its id."""
        with self._errors(), open(path, "rb") as data:
            return (await self.client.files.create(file=(f"{display}.jsonl", data), purpose="batch")).id

    def _state(self, batch) -> BatchState:
        counts = batch.request_counts
        errors = [e.message for e in (batch.errors.data or [])] if batch.errors else []
        return BatchState(batch.id, batch.status, batch.status in self.terminal,
                          {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
                          if counts else {},
                          [f for f in (batch.output_file_id, batch.error_file_id) if f], errors)

    async def create(self, file_id: str, token: str, display: str) -> BatchState:
        """Create the batch, with our token in its metadata."""
        with self._errors():
            batch = await self.client.batches.create(
                input_file_id=file_id, endpoint=self.endpoint, completion_window="24h",
                metadata={"dfk8s_run": self.spec.run_id, "dfk8s_batch": display, "dfk8s_token": token})
        return self._state(batch)

    async def find(self, token: str, since: float) -> BatchState | None:
        """The batch created with ``token``, if the provider has one (newest first, back to ``since``)."""
        with self._errors():
            async for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get("dfk8s_token") == token:
                    return self._state(batch)
                if batch.created_at < since - 3600:
                    return None
        return None

    async def get(self, batch_id: str) -> BatchState:
        """The batch now."""
        with self._errors():
            return self._state(await self.client.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel; a batch that already ended is left alone."""
        import openai

        try:
            with self._errors():
                await self.client.batches.cancel(batch_id)
        except openai.ConflictError:
            pass

    async def results(self, state: BatchState) -> dict[str, Response | RowError | None]:
        """Every result line by row id (None: the line never ran)."""
        out: dict[str, Response | RowError | None] = {}
        for file_id in state.files:
            with self._errors():
                content = await self.client.files.content(file_id)
            for raw in content.content.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    out[str(line.get("custom_id"))] = await self._result(line)
        return out

    async def _result(self, line: dict) -> Response | RowError | None:
        from dfk8s.servings.api import RetryableError, RowFailure

        response = line.get("response")
        if response is None:
            error = line.get("error") or {}
            if error.get("code") in ("batch_expired", "batch_cancelled"):
                return None
            return RowError("BatchLineFailed", str(error.get("message") or error.get("code") or "failed"), 1,
                            {"code": error.get("code")})
        body = response.get("body") or {}
        status = int(response.get("status_code") or 0)
        if status != 200:
            error = (body.get("error") if isinstance(body, dict) else None) or {}
            code = error.get("code") or error.get("type")
            kind = "Refusal" if code == "content_policy_violation" else (
                "ServerError" if status >= 500 or status == 429 else "BadRequest")
            return RowError(kind, f"HTTP {status}: {error.get('message') or 'failed'}", 1,
                            {"status": status, "code": code})
        try:
            if self.kind == "openai-chat":
                return _chat_response(body)
            from openai.types import ImagesResponse

            return await self.serving._response(ImagesResponse.model_validate(body))
        except (RowFailure, RetryableError) as exc:
            return _row_error(exc)
        except Exception as exc:  # a line we cannot read fails its row, never the shard
            return RowError("MalformedResponse", f"{type(exc).__name__}: {exc}"[:300], 1)

    async def aclose(self) -> None:
        """Close the SDK clients' connection pools."""
        await self.client.close()
        if self.serving is not None:
            await self.serving.aclose()


def _chat_response(body: dict) -> Response:
    """A batch line's chat completion, checked as the sync serving checks it."""
    from openai.types.chat import ChatCompletion

    from dfk8s.cost.usage import usage_from_openai_chat
    from dfk8s.servings.api import RowFailure

    completion = ChatCompletion.model_validate(body)
    usage = usage_from_openai_chat(completion.usage)
    paid = {"usage": usage.to_dict()} if usage is not None else {}  # a refusal is billed too
    if not completion.choices:
        raise RowFailure("EmptyResponse", "the response has no choices", paid)
    message = completion.choices[0].message
    if getattr(message, "refusal", None):
        raise RowFailure("Refusal", message.refusal, paid)
    if not message.content:
        raise RowFailure("EmptyResponse", "the model returned no text",
                         {"finish_reason": completion.choices[0].finish_reason, **paid})
    meta: dict[str, Any] = {"finish_reason": completion.choices[0].finish_reason, **paid}
    return Response(text=message.content, meta=meta)


# ----- Gemini ----------------------------------------------------------------------------------------


class GeminiBatchProvider:
    """Gemini Batch Mode for gemini-images (text2image, imageedit): a JSONL file of ``{key, request}``."""

    name = "gemini"
    max_requests = 1_000_000
    max_bytes = 2 * 1024 * 1024 * 1024
    terminal = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")

    def __init__(self, spec):
        from dfk8s.servings.gemini_images import GeminiImagesServing

        self.spec = spec
        self.serving = GeminiImagesServing.from_spec(spec)
        self.client = self.serving.client.aio

    def _errors(self):
        from dfk8s.servings.gemini_images import gemini_errors

        return _shard_errors(lambda: gemini_errors(self.serving.params.model))

    def line(self, row_id: str, request: Request) -> str:
        """The input-file line of one row: generateContent's request JSON under ``request``."""
        from dfk8s.servings.api import RowFailure
        from dfk8s.servings.gemini_images import build_contents

        if not any(m.role == "user" and m.text.strip() for m in request.messages):
            raise RowFailure("BadInput", "the row has no prompt (no user turn with text)")
        contents, system = build_contents(request)
        body: dict[str, Any] = {"contents": [_content_json(c) for c in contents]}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        args = self.serving.config_args
        config: dict[str, Any] = {"responseModalities": list(args["response_modalities"])}
        image_config = args.get("image_config")
        if image_config is not None:
            config["imageConfig"] = {k: v for k, v in (("aspectRatio", image_config.aspect_ratio),
                                                       ("imageSize", image_config.image_size)) if v}
        if args.get("temperature") is not None:
            config["temperature"] = args["temperature"]
        body["generationConfig"] = config
        return json.dumps({"key": row_id, "request": body}, ensure_ascii=False, separators=(",", ":"))

    async def upload(self, path: str, display: str) -> str:
        """Upload the input file (the SDK's resumable upload, in chunks); returns its name (``files/...``)."""
        from google.genai import types

        with self._errors():
            file = await self.client.files.upload(
                file=path, config=types.UploadFileConfig(mime_type="jsonl", display_name=display))
        return file.name

    def _state(self, job) -> BatchState:
        status = str(getattr(job.state, "value", job.state) or "")
        files = [job.dest.file_name] if job.dest is not None and job.dest.file_name else []
        errors = [job.error.message] if getattr(job, "error", None) is not None and job.error.message else []
        return BatchState(job.name, status, status in self.terminal, {}, files, errors)

    async def create(self, file_id: str, token: str, display: str) -> BatchState:
        """Create the batch; its display name carries our token."""
        with self._errors():
            job = await self.client.batches.create(model=self.serving.params.model, src=file_id,
                                                   config={"display_name": f"{display}-{token}"})
        return self._state(job)

    async def find(self, token: str, since: float) -> BatchState | None:
        """The batch whose display name ends with ``token``, if any."""
        with self._errors():
            pager = await self.client.batches.list(config={"page_size": 100})
            async for job in pager:
                if (job.display_name or "").endswith(token):
                    return self._state(job)
        return None

    async def get(self, batch_id: str) -> BatchState:
        """The batch now."""
        with self._errors():
            return self._state(await self.client.batches.get(name=batch_id))

    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel."""
        with self._errors():
            await self.client.batches.cancel(name=batch_id)

    async def results(self, state: BatchState) -> dict[str, Response | RowError | None]:
        """Every result line by row id."""
        from google.genai import types

        from dfk8s.servings.api import RetryableError, RowFailure

        out: dict[str, Response | RowError | None] = {}
        for name in state.files:
            with self._errors():
                data = await self.client.files.download(file=name)
            for raw in data.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                key = str(line.get("key"))
                if line.get("error") is not None:
                    error = line["error"]
                    code = int(error.get("code") or 0)
                    kind = "ServerError" if code >= 500 or code == 429 else "BadRequest"
                    out[key] = RowError(kind, f"HTTP {code}: {error.get('message') or 'failed'}", 1,
                                        {"status": code})
                    continue
                try:
                    answer = types.GenerateContentResponse.model_validate(line.get("response") or {})
                    out[key] = self.serving._response(answer)
                except (RowFailure, RetryableError) as exc:
                    out[key] = _row_error(exc)
                except Exception as exc:  # a line we cannot read fails its row, never the shard
                    out[key] = RowError("MalformedResponse", f"{type(exc).__name__}: {exc}"[:300], 1)
        return out

    async def aclose(self) -> None:
        """Close the SDK client's session."""
        await self.serving.aclose()


def _content_json(content) -> dict:
    """A google-genai Content as the REST JSON (inline image bytes as URL-safe base64, as the SDK sends)."""
    parts = []
    for part in content.parts or []:
        if part.text is not None:
            parts.append({"text": part.text})
        elif part.inline_data is not None:
            parts.append({"inlineData": {"mimeType": part.inline_data.mime_type,
                                         "data": base64.urlsafe_b64encode(part.inline_data.data).decode()}})
    return {"role": content.role, "parts": parts}


#: Batchable servings and their provider (the pipelines each batches: ``ServingInfo.batch_pipelines``).
PROVIDERS = {"openai-chat": OpenAIBatchProvider, "openai-images": OpenAIBatchProvider,
             "gemini-images": GeminiBatchProvider}
