"""OpenAI's Files and Batch APIs for the fake server, wire-exact for the `openai` SDK.

`POST /v1/files` (multipart `file` + `purpose`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`, `GET /v1/batches`.
A batch walks validating -> in_progress -> finalizing -> completed (or failed, expired, cancelling ->
cancelled). Each input line is answered by the same parse and reply code as the synchronous endpoint,
so a batch answer has exactly the shape of a sync one.

Knobs (`FakeConfig`): `batch_seconds` (how long a batch takes; 0 = one state further on every
`GET /v1/batches/{id}`), `batch_line_fail` (probability a line fails with a 500 in the error file),
`batch_expire` (1: batches expire with half their lines done; the rest go to the error file as
`batch_expired`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dfk8s.testing.fake_api import gemini
from dfk8s.testing.fake_api._wire import ApiError

#: Endpoints a batch may target here, with the parse and reply methods of the sync server.
_ENDPOINTS = {"/v1/chat/completions": ("_parse_chat", "_reply_chat"),
              "/v1/images/generations": ("_parse_generate", "_reply_images")}
_EXPIRED = "This request could not be executed before the completion window expired."
_STATES = ("validating", "in_progress", "finalizing", "completed")
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024


class _LineRequest:
    """What the sync parsers read from an aiohttp request, for one batch line."""

    def __init__(self, body: dict, scheme: str, host: str):
        self._body, self.scheme, self.host = body, scheme, host
        self.content_type = "application/json"

    async def json(self) -> dict:
        return self._body


class OpenAIBatches:
    """Files and batches kept in memory by the fake server (one per FakeAPI)."""

    def __init__(self, api: Any):
        self.api = api
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created = 0

    def routes(self, app: web.Application) -> None:
        """Register the endpoints under /v1 (bare /files/{name} serves generated images)."""
        for prefix in ("/v1",):
            app.router.add_post(prefix + "/files", self.h_create_file)
            app.router.add_get(prefix + "/files/{id}", self.h_get_file)
            app.router.add_get(prefix + "/files/{id}/content", self.h_file_content)
            app.router.add_post(prefix + "/batches", self.h_create_batch)
            app.router.add_get(prefix + "/batches", self.h_list_batches)
            app.router.add_get(prefix + "/batches/{id}", self.h_get_batch)
            app.router.add_post(prefix + "/batches/{id}/cancel", self.h_cancel_batch)

    # ----- files -----------------------------------------------------------------------------------

    def _file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                "status_details": None}
        self.files[file_id] = {"meta": meta, "data": data}
        return meta

    async def h_create_file(self, request: web.Request) -> web.Response:
        """POST /v1/files: keep an uploaded file."""
        if not request.content_type.startswith("multipart/form-data"):
            return _error(400, "files takes multipart/form-data.")
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField):
            return _error(400, "Missing required parameter: 'file'.", param="file")
        if purpose not in ("batch", "assistants", "fine-tune", "vision", "user_data", "evals"):
            return _error(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        data = upload.file.read()
        if len(data) > MAX_FILE_BYTES:
            return _error(400, f"File is {len(data)} bytes; the limit is {MAX_FILE_BYTES}.", param="file")
        return web.json_response(self._file(data, upload.filename or "upload", str(purpose)))

    async def h_get_file(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}: the file object (a Gemini name under /v1 goes to the Gemini fake)."""
        if not request.match_info["id"].startswith("file-"):
            return await self.api.gemini_batches.h_file(request)
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['id']}", param="id")
        return web.json_response(found["meta"])

    async def h_file_content(self, request: web.Request) -> web.Response:
        """GET /v1/files/{id}/content: the file's bytes."""
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['id']}", param="id")
        return web.Response(body=found["data"], content_type="application/octet-stream")

    # ----- batches ---------------------------------------------------------------------------------

    async def h_create_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches: a new batch over an uploaded input file."""
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        source = self.files.get(str(body.get("input_file_id")))
        if endpoint not in _ENDPOINTS:
            return _error(400, f"Invalid value for 'endpoint': {endpoint!r}.", param="endpoint")
        if window != "24h":
            return _error(400, f"Invalid value for 'completion_window': {window!r}.",
                          param="completion_window")
        if source is None:
            return _error(400, f"No such File object: {body.get('input_file_id')}", param="input_file_id")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        batch = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": source["meta"]["id"], "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": body.get("metadata") or None}
        lines, problem = _read_lines(source["data"], endpoint)
        self.batches[batch_id] = {"batch": batch, "lines": lines, "problem": problem,
                                  "started": time.monotonic(), "polls": 0, "results": None,
                                  "host": (request.scheme, request.host)}
        with self.api._lock:
            self.created += 1
            self.api._stats["batches_created"] = self.created
        return web.json_response(batch)

    async def h_get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{id}: the batch, moved on as time (or polls) passed."""
        if not request.match_info["id"].startswith("batch_"):  # google-genai also uses /v1/batches/{name}
            return await self.api.gemini_batches.h_get(request)
        state = self.batches.get(request.match_info["id"])
        if state is None:
            return _error(404, f"No such batch: {request.match_info['id']}", param="batch_id")
        state["polls"] += 1
        await self._advance(state)
        return web.json_response(state["batch"])

    async def h_cancel_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{id}/cancel: cancelling, then cancelled with what was done."""
        state = self.batches.get(request.match_info["id"])
        if state is None:
            return _error(404, f"No such batch: {request.match_info['id']}", param="batch_id")
        batch = state["batch"]
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return _error(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        await self._advance(state)
        batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        state["cancel"] = True
        return web.json_response(batch)

    async def h_list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/batches: newest first, paged by limit and after (Gemini clients get theirs)."""
        if "x-goog-api-key" in request.headers:
            return await self.api.gemini_batches.h_list(request)
        items = sorted((s["batch"] for s in self.batches.values()), key=lambda b: b["created_at"],
                       reverse=True)
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = items[:limit]
        return web.json_response({"object": "list", "data": page,
                                  "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None,
                                  "has_more": len(items) > limit})

    # ----- progress --------------------------------------------------------------------------------

    def _stage(self, state: dict) -> int:
        """Index into _STATES the batch has reached by now."""
        seconds = self.api.config.batch_seconds
        if seconds <= 0:
            return min(state["polls"], len(_STATES) - 1)
        done = (time.monotonic() - state["started"]) / seconds
        return 0 if done < 0.1 else 1 if done < 0.9 else 2 if done < 1 else 3

    async def _advance(self, state: dict) -> None:
        batch = state["batch"]
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return
        now = int(time.time())
        if state["problem"]:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_request", "message": state["problem"], "param": None, "line": None}]})
            return
        if state.get("cancel"):
            await self._finish(state, done=len(state["lines"]) // 2 if self._stage(state) >= 1 else 0)
            batch.update(status="cancelled", cancelled_at=now)
            return
        stage = self._stage(state)
        if stage >= 1 and batch["in_progress_at"] is None:
            batch["in_progress_at"] = now
            batch["request_counts"]["total"] = len(state["lines"])
        if stage >= 2 and batch["finalizing_at"] is None:
            batch["finalizing_at"] = now
        batch["status"] = _STATES[stage]
        if stage == 3:
            expire = self.api.config.batch_expire >= 1
            await self._finish(state, done=len(state["lines"]) // 2 if expire else len(state["lines"]))
            if expire:
                batch.update(status="expired", expired_at=now)
            else:
                batch["completed_at"] = now

    async def _finish(self, state: dict, done: int) -> None:
        """Answer the first ``done`` lines and write the output and error files."""
        batch = state["batch"]
        output, errors = [], []
        for k, line in enumerate(state["lines"]):
            if k >= done:
                if self.api.config.batch_expire >= 1 and not state.get("cancel"):
                    errors.append({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                                   "response": None, "error": {"code": "batch_expired", "message": _EXPIRED}})
                continue
            status, body = await self._answer(state, line)
            record = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": f"req_fake{uuid.uuid4().hex[:16]}",
                                   "body": body}, "error": None}
            (output if status == 200 else errors).append(record)
        counts = batch["request_counts"]
        counts.update(total=len(state["lines"]), completed=len(output),
                      failed=sum(1 for e in errors if e["response"] is not None))
        if output:
            batch["output_file_id"] = self._file(_jsonl(output), f"{batch['id']}_output.jsonl",
                                                 "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._file(_jsonl(errors), f"{batch['id']}_error.jsonl",
                                                "batch_output")["id"]

    async def _answer(self, state: dict, line: dict) -> tuple[int, dict]:
        api = self.api
        parse, reply = (getattr(api, name) for name in _ENDPOINTS[state["batch"]["endpoint"]])
        with api._lock:
            fail = api.config.batch_line_fail > 0 and api._rng.random() < api.config.batch_line_fail
        if fail:
            return 500, {"error": {"message": "The server had an error processing this request (fake).",
                                   "type": "server_error", "param": None, "code": None}}
        shim = _LineRequest(line["body"], *state["host"])
        try:
            call = await parse(shim, {})
            if call.images:
                api._inspect(call)
            return 200, reply(shim, call, call.trigger())
        except ApiError as exc:
            return exc.status, {"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                                          "code": exc.code}}


def _json_lines(data: bytes) -> tuple[list[tuple[int, Any]], str | None]:
    """The file's non-blank lines as (line number, JSON value), or the message for the first bad one."""
    parsed = []
    for number, raw in enumerate(data.splitlines(), 1):
        if raw.strip():
            try:
                parsed.append((number, json.loads(raw)))
            except ValueError:
                return [], f"Line {number} is not valid JSON."
    return parsed, None


def _read_lines(data: bytes, endpoint: str) -> tuple[list[dict], str | None]:
    """The batch's lines, or the reason validation fails it (bad JSON, wrong url, duplicate ids...)."""
    lines, seen = [], set()
    parsed, problem = _json_lines(data)
    if problem:
        return [], problem
    for number, line in parsed:
        if not isinstance(line, dict) or not {"custom_id", "method", "url", "body"} <= set(line):
            return [], f"Line {number} needs custom_id, method, url and body."
        if line["url"] != endpoint:
            return [], f"Line {number}: url {line['url']!r} does not match the batch endpoint {endpoint!r}."
        if line["custom_id"] in seen:
            return [], f"Line {number}: duplicate custom_id {line['custom_id']!r}."
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines:
        return [], "The input file has no requests."
    if len(lines) > MAX_REQUESTS:
        return [], f"The input file has {len(lines)} requests; the limit is {MAX_REQUESTS}."
    return lines, None


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}}, status=status)


# ----- Gemini: Files (resumable upload) and Batch Mode ------------------------------------------------

_GEMINI_STATES = ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING", "BATCH_STATE_RUNNING",
                  "BATCH_STATE_SUCCEEDED")
_GEMINI_DONE = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                "BATCH_STATE_EXPIRED")
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
GEMINI_MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


@dataclass
class _Host:
    """Where a client reached the server (for URLs in answers)."""

    scheme: str
    host: str


class _GeminiLineRequest:
    """What `gemini.parse` reads from an aiohttp request, for one batch line."""

    def __init__(self, model: str, body: dict):
        self.match_info = {"target": f"{model}:generateContent"}
        self._body = body

    async def json(self) -> dict:
        return self._body


class GeminiBatches:
    """google-genai's `client.files.upload` / `files.download` and `client.batches.*`, in memory.

    Uploads follow the resumable protocol the SDK speaks: a `start` POST answered with an
    `X-Goog-Upload-URL`, then `upload[, finalize]` chunks at `X-Goog-Upload-Offset`, the last one answered
    `X-Goog-Upload-Status: final` and the File JSON. Batches are long-running operations named
    `batches/...` whose `metadata.state` walks BATCH_STATE_PENDING -> RUNNING -> SUCCEEDED (or FAILED,
    CANCELLED, EXPIRED); results are a JSONL file (`metadata.output.responsesFile`), one
    `{"key", "response" | "error"}` line per request.
    """

    def __init__(self, api: Any):
        self.api = api
        self.uploads: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.created = 0

    def routes(self, app: web.Application) -> None:
        """Register before the generic `models/{target}` route, so batchGenerateContent lands here."""
        for version in ("v1beta", "v1", "v1alpha"):
            app.router.add_post(f"/upload/{version}/files", self.h_upload)
            app.router.add_get(f"/{version}/files/{{name}}", self.h_file)
            app.router.add_post(f"/{version}/models/{{model}}:batchGenerateContent", self.h_create)
            app.router.add_get(f"/{version}/batches", self.h_list)
            app.router.add_get(f"/{version}/batches/{{name}}", self.h_get)
            app.router.add_post(f"/{version}/batches/{{name}}:cancel", self.h_cancel)
        app.router.add_post("/upload/files", self.h_upload)

    # ----- files -----------------------------------------------------------------------------------

    async def h_upload(self, request: web.Request) -> web.Response:
        """The resumable upload: `start`, then `upload` chunks, the last with `finalize`."""
        command = request.headers.get("X-Goog-Upload-Command", "")
        upload_id = request.query.get("upload_id")
        if upload_id is None:
            if request.headers.get("X-Goog-Upload-Protocol") != "resumable" or "start" not in command:
                return _gemini_error(400, "Uploads must use the resumable protocol "
                                          "(X-Goog-Upload-Command: start).")
            body = await request.json() if request.can_read_body else {}
            meta = (body or {}).get("file") or {}
            size = int(request.headers.get("X-Goog-Upload-Header-Content-Length", "0"))
            if size > GEMINI_MAX_FILE_BYTES:
                return _gemini_error(400, f"File is {size} bytes; the limit is {GEMINI_MAX_FILE_BYTES}.")
            upload_id = uuid.uuid4().hex
            self.uploads[upload_id] = {"meta": meta, "size": size, "data": bytearray(),
                                       "mime": request.headers.get("X-Goog-Upload-Header-Content-Type", "")}
            url = f"{request.scheme}://{request.host}{request.path}?upload_id={upload_id}&upload_protocol=resumable"
            return web.Response(headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
        session = self.uploads.get(upload_id)
        if session is None:
            return _gemini_error(404, "No such upload session.")
        offset = int(request.headers.get("X-Goog-Upload-Offset", "-1"))
        if offset != len(session["data"]):
            return _gemini_error(400, f"Upload offset {offset} does not match the {len(session['data'])} "
                                      "bytes received.")
        session["data"] += await request.read()
        if "finalize" not in command:
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        if len(session["data"]) != session["size"]:
            return _gemini_error(400, f"Uploaded {len(session['data'])} bytes, announced {session['size']}.")
        del self.uploads[upload_id]
        name = session["meta"].get("name") or f"files/{uuid.uuid4().hex[:12]}"
        mime = session["mime"] or session["meta"].get("mimeType", "")
        file = self._file(name, bytes(session["data"]), mime, session["meta"].get("displayName"),
                          _Host(request.scheme, request.host), source="UPLOADED")
        return web.json_response({"file": file}, headers={"X-Goog-Upload-Status": "final"})

    def _file(self, name: str, data: bytes, mime: str, display: str | None, request: web.Request,
              source: str) -> dict[str, Any]:
        now = time.time()
        file = {"name": name, "mimeType": mime, "sizeBytes": str(len(data)), "createTime": _iso(now),
                "updateTime": _iso(now), "expirationTime": _iso(now + 48 * 3600),
                "sha256Hash": "", "uri": f"{request.scheme}://{request.host}/v1beta/{name}",
                "state": "ACTIVE", "source": source}
        if display:
            file["displayName"] = display
        if source == "GENERATED":
            file["downloadUri"] = f"{request.scheme}://{request.host}/v1beta/{name}:download?alt=media"
        self.files[name] = {"meta": file, "data": data}
        return file

    async def h_file(self, request: web.Request) -> web.Response:
        """`files/{name}` (the File) and `files/{name}:download?alt=media` (its bytes)."""
        name, _, method = _name(request).partition(":")
        found = self.files.get(f"files/{name}")
        if found is None:
            return _gemini_error(404, f"File files/{name} not found.")
        if method == "download":
            return web.Response(body=found["data"], content_type="application/octet-stream")
        return web.json_response(found["meta"])

    # ----- batches ---------------------------------------------------------------------------------

    async def h_create(self, request: web.Request) -> web.Response:
        """`models/{model}:batchGenerateContent` with a file (or inlined requests)."""
        body = await request.json()
        batch = body.get("batch") or {}
        source = batch.get("inputConfig") or batch.get("input_config") or {}
        model = request.match_info["model"]
        if "fileName" in source:
            found = self.files.get(source["fileName"])
            if found is None:
                return _gemini_error(400, f"File {source['fileName']} not found.")
            lines, problem = _gemini_lines(found["data"])
        elif "requests" in source:
            lines = [{"key": str(k), "request": r.get("request", r)}
                     for k, r in enumerate(source["requests"].get("requests") or [])]
            problem = None if lines else "No requests."
        else:
            return _gemini_error(400, "batch.inputConfig needs fileName or requests.")
        name = f"batches/{uuid.uuid4().hex[:16]}"
        now = time.time()
        state = {"name": name, "model": f"models/{model}", "display": batch.get("displayName"),
                 "lines": lines, "problem": problem, "state": _GEMINI_STATES[0], "created": now,
                 "updated": now, "started": time.monotonic(), "polls": 0, "output": None,
                 "host": _Host(request.scheme, request.host)}
        self.batches[name] = state
        with self.api._lock:
            self.created += 1
            self.api._stats["gemini_batches_created"] = self.created
        return web.json_response(self._operation(state))

    def _operation(self, state: dict) -> dict[str, Any]:
        meta: dict[str, Any] = {"@type": _BATCH_TYPE, "name": state["name"], "model": state["model"],
                                "state": state["state"],
                                "createTime": _iso(state["created"]), "updateTime": _iso(state["updated"]),
                                "batchStats": {"requestCount": str(len(state["lines"]))}}
        if state["display"]:
            meta["displayName"] = state["display"]
        done = state["state"] in _GEMINI_DONE
        if done:
            meta["endTime"] = _iso(state["updated"])
        if state["output"]:
            meta["output"] = {"responsesFile": state["output"]}
        op: dict[str, Any] = {"name": state["name"], "metadata": meta, "done": done}
        if state["state"] == "BATCH_STATE_FAILED":
            op["error"] = {"code": 3, "message": state["problem"] or "failed"}
        return op

    async def h_get(self, request: web.Request) -> web.Response:
        """`batches/{name}`: the operation, moved on as time (or polls) passed."""
        state = self.batches.get(f"batches/{_name(request)}")
        if state is None:
            return _gemini_error(404, f"Batch batches/{_name(request)} not found.")
        state["polls"] += 1
        await self._advance(state)
        return web.json_response(self._operation(state))

    async def h_cancel(self, request: web.Request) -> web.Response:
        """`batches/{name}:cancel`: it ends cancelled, with the lines done so far."""
        state = self.batches.get(f"batches/{_name(request)}")
        if state is None:
            return _gemini_error(404, f"Batch batches/{_name(request)} not found.")
        if state["state"] not in _GEMINI_DONE:
            await self._write(state, len(state["lines"]) // 2 if state["polls"] else 0)
            state["state"], state["updated"] = "BATCH_STATE_CANCELLED", time.time()
        return web.json_response({})

    async def h_list(self, request: web.Request) -> web.Response:
        """`batches`: newest first (one page)."""
        items = sorted(self.batches.values(), key=lambda s: s["created"], reverse=True)
        return web.json_response({"operations": [self._operation(s) for s in items]})

    async def _advance(self, state: dict) -> None:
        if state["state"] in _GEMINI_DONE:
            return
        if state["problem"]:
            state["state"], state["updated"] = "BATCH_STATE_FAILED", time.time()
            return
        seconds = self.api.config.batch_seconds
        if seconds <= 0:
            stage = min(state["polls"], 3)
        else:
            done = (time.monotonic() - state["started"]) / seconds
            stage = 0 if done < 0.1 else 1 if done < 1 else 3
        state["state"], state["updated"] = _GEMINI_STATES[stage], time.time()
        if stage == 3:
            if self.api.config.batch_expire >= 1:
                state["state"] = "BATCH_STATE_EXPIRED"  # Gemini returns nothing for an expired batch
            else:
                await self._write(state, len(state["lines"]))

    async def _write(self, state: dict, done: int) -> None:

        api = self.api
        out = []
        for line in state["lines"][:done]:
            with api._lock:
                fail = api.config.batch_line_fail > 0 and api._rng.random() < api.config.batch_line_fail
            if fail:
                out.append({"key": line["key"], "error": {"code": 500, "message": "Internal error (fake).",
                                                          "status": "INTERNAL"}})
                continue
            shim = _GeminiLineRequest(state["model"].removeprefix("models/"), line["request"])
            try:
                call = await gemini.parse(api, shim, {})
                if call.images:
                    api._inspect(call)
                answer = gemini.reply(api, shim, call, call.trigger())
                out.append({"key": line["key"], "response": answer})
            except ApiError as exc:
                status = gemini.STATUS_NAMES.get(exc.status, "UNKNOWN")
                out.append({"key": line["key"], "error": {"code": exc.status, "message": exc.message,
                                                          "status": status}})
        name = f"files/batch-{state['name'].split('/')[-1]}"
        self._file(name, _jsonl(out), "application/jsonl", None, state["host"], source="GENERATED")
        state["output"] = name


def _name(request: web.Request) -> str:
    return request.match_info.get("name") or request.match_info["id"]


def _gemini_lines(data: bytes) -> tuple[list[dict], str | None]:
    lines = []
    parsed, problem = _json_lines(data)
    if problem:
        return [], problem
    for number, line in parsed:
        if not isinstance(line, dict) or "request" not in line:
            return [], f"Line {number} needs key and request."
        lines.append({"key": str(line.get("key", number)), "request": line["request"]})
    return (lines, None) if lines else ([], "The input file has no requests.")


def _gemini_error(status: int, message: str) -> web.Response:
    return web.json_response(gemini.error_body(status, message), status=status)
