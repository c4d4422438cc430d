"""A local stand-in for the Hugging Face Hub's file API, serving model repos from local folders.

The Hub cannot be reached from the test machines (only loopback is allowed), so ``dfk8s model pull`` is
tested against this server through the real huggingface_hub client (``HF_ENDPOINT=fake.url``). It speaks
the endpoints huggingface_hub 1.x/2.x calls for ``model_info``, ``list_repo_tree``, ``hf_hub_download``
and ``snapshot_download``:

- ``GET /api/models/{repo}/revision/{rev}``: id, sha, siblings (with sizes), gated;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``recursive``), LFS entries for
  ``.safetensors``/``.bin`` and files over 10 MB, as the Hub stores them;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (git sha1, or
  ``X-Linked-Etag``/``X-Linked-Size`` with the sha256 for LFS files), ``Content-Length``, and
  ``Range: bytes=N-`` answered with 206 and ``Content-Range`` (what a resumed download sends);
- errors as the Hub signals them: ``X-Error-Code: RepoNotFound | RevisionNotFound | GatedRepo``.

``cdn_redirect`` answers LFS files with a 302 to another host, as the Hub's CDN does.
Fault knobs for tests: ``cut_once`` (file -> byte count: the first GET of that file closes the
connection after that many bytes), ``slow`` (file -> seconds per 8 KiB chunk). Every file request is
recorded in :attr:`FakeHub.requests` with the bytes sent, so a test can count what was fetched.

Run it by hand: ``python -m tests.helpers.fake_hub ORG/NAME=FOLDER [--port N]``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "FileRequest"]

_CHUNK = 8192
_LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".ckpt", ".pt", ".model", ".msgpack", ".onnx", ".gguf")


@dataclass
class FileRequest:
    """One request for a file: method, path in the repo, first byte asked for, bytes sent."""

    method: str
    repo: str
    path: str
    start: int
    sent: int
    status: int


@dataclass
class _Repo:
    folder: Path
    gated: bool
    files: dict[str, Path] = field(default_factory=dict)
    sha1: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    commit: str = ""


class FakeHub:
    """The stand-in Hub on a free loopback port; use as a context manager or call start/stop.

    Args:
        repos: Repo id (``org/name``) -> local folder whose files are the repo at its one commit.
        gated: Repo ids that need ``Authorization: Bearer <token>``.
        token: The token gated repos accept.

    """

    def __init__(self, repos: dict[str, str | Path], *, gated: tuple[str, ...] = (), token: str = "hf_fake",
                 host: str = "127.0.0.1"):
        self.token = token
        self.host = host
        self.repos = {
            repo_id: self._load(Path(folder), repo_id in gated) for repo_id, folder in repos.items()
        }
        self.cut_once: dict[str, int] = {}
        #: Serve LFS files as the Hub does: the resolve URL answers 302 to a signed URL on another host
        #: (``localhost`` instead of ``127.0.0.1``: still loopback), where :attr:`cdn_auth` records whether
        #: an ``Authorization`` header came along (it must not).
        self.cdn_redirect = False
        self.cdn_auth: list[bool] = []
        self.slow: dict[str, float] = {}
        self.requests: list[FileRequest] = []
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _load(folder: Path, gated: bool) -> _Repo:
        repo = _Repo(folder=folder, gated=gated)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            repo.files[rel] = path
            repo.sha1[rel] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            repo.sha256[rel] = hashlib.sha256(data).hexdigest()
        digest = hashlib.sha1("".join(f"{k}:{v}" for k, v in repo.sha1.items()).encode()).hexdigest()
        repo.commit = digest
        return repo

    @property
    def url(self) -> str:
        """Base URL, for ``HF_ENDPOINT``."""
        assert self._server is not None, "not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def commit(self, repo_id: str) -> str:
        """The commit hash the repo's ``main`` points at."""
        return self.repos[repo_id].commit

    def bytes_sent(self, path: str | None = None) -> int:
        """Bytes of file content sent by GETs (of one repo path, or of all)."""
        return sum(r.sent for r in self.requests if r.method == "GET" and (path is None or r.path == path))

    def fetched(self) -> set[str]:
        """Repo paths at least one GET sent content of."""
        return {r.path for r in self.requests if r.method == "GET" and r.sent}

    def start(self, port: int = 0) -> FakeHub:
        """Start serving on ``host:port`` (0: a free port)."""
        self._server = ThreadingHTTPServer((self.host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-hub")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- what the handler asks ------------------------------------------------------------------

    def _lfs(self, repo: _Repo, path: str) -> bool:
        return path.endswith(_LFS_SUFFIXES) or repo.files[path].stat().st_size > 10 * 2**20

    def _entry(self, repo: _Repo, path: str) -> dict:
        size = repo.files[path].stat().st_size
        entry = {"type": "file", "oid": repo.sha1[path], "size": size, "path": path}
        if self._lfs(repo, path):
            entry["lfs"] = {"oid": repo.sha256[path], "size": size, "pointerSize": 134}
        return entry

    def _record(self, request: FileRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            if path in self.cut_once and path not in self._cut_done:
                self._cut_done.add(path)
                return self.cut_once[path]
        return None


_API_RE = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"
)
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._route(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._route(send_body=False)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo(self, repo_id: str, rev: str, *, needs_access: bool) -> _Repo | None:
            repo = hub.repos.get(unquote(repo_id))
            if repo is None:
                self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}")
                return None
            if unquote(rev) not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
                return None
            if needs_access and repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return None
            return repo

        def _route(self, send_body: bool) -> None:
            url = urlsplit(self.path)
            api = _API_RE.match(url.path)
            if api and send_body:
                repo = self._repo(api["repo"], api["rev"], needs_access=False)
                if repo is None:
                    return
                repo_id = unquote(api["repo"])
                if api["kind"] == "revision":
                    self._json(
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": repo.commit,
                            "private": False,
                            "gated": "manual" if repo.gated else False,
                            "disabled": False,
                            "downloads": 0,
                            "likes": 0,
                            "tags": ["diffusers"],
                            "lastModified": "2026-01-01T00:00:00.000Z",
                            "siblings": [
                                {"rfilename": p, "size": repo.files[p].stat().st_size} for p in repo.files
                            ],
                        }
                    )
                    return
                prefix = (unquote(api["path"] or "")).strip("/")
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("1", "true")
                entries = [
                    hub._entry(repo, p)
                    for p in repo.files
                    if (not prefix or p.startswith(prefix + "/"))
                    and (recursive or "/" not in p[len(prefix) + 1 if prefix else 0 :])
                ]
                self._json(entries)
                return
            cdn = re.match(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<path>.+)$", url.path)
            if cdn:
                repo = hub.repos.get(unquote(cdn["repo"]))
                path = unquote(cdn["path"])
                if repo is None or path not in repo.files:
                    self._error(404, "EntryNotFound", "no such blob")
                    return
                with hub._lock:
                    hub.cdn_auth.append("Authorization" in self.headers)
                self._send_file(repo, unquote(cdn["repo"]), path, send_body)
                return
            resolve = _RESOLVE_RE.match(url.path)
            if not resolve:
                self._error(404, "EntryNotFound", f"no route {url.path}")
                return
            repo = self._repo(resolve["repo"], resolve["rev"], needs_access=True)
            if repo is None:
                return
            path = unquote(resolve["path"])
            if path not in repo.files:
                self._error(404, "EntryNotFound", f"{path} does not exist at this revision")
                return
            if hub.cdn_redirect and hub._lfs(repo, path):
                self._redirect_to_cdn(repo, unquote(resolve["repo"]), path)
                return
            self._send_file(repo, unquote(resolve["repo"]), path, send_body)

        def _redirect_to_cdn(self, repo: _Repo, repo_id: str, path: str) -> None:
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/cdn/{repo_id}/{path}?signature=fake")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{repo.sha256[path]}"')
            self.send_header("X-Linked-Size", str(repo.files[path].stat().st_size))
            self.send_header("ETag", f'"{repo.sha1[path]}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_file(self, repo: _Repo, repo_id: str, path: str, send_body: bool) -> None:
            data = repo.files[path].read_bytes()
            start = 0
            match = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
            if match:
                start = min(int(match.group(1)), len(data))
            body = data[start:]
            status = 206 if match else 200
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{repo.sha1[path]}"')
            if hub._lfs(repo, path):
                self.send_header("X-Linked-Etag", f'"{repo.sha256[path]}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if match:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            sent = 0
            try:
                if send_body:
                    cut = hub._take_cut(path)
                    delay = hub.slow.get(path, 0.0)
                    for offset in range(0, len(body), _CHUNK):
                        chunk = body[offset : offset + _CHUNK]
                        if cut is not None and sent + len(chunk) > cut:
                            chunk = chunk[: max(0, cut - sent)]
                            self.wfile.write(chunk)
                            sent += len(chunk)
                            self.wfile.flush()
                            # Closed after the headers promised more: the client sees the body end early.
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if delay:
                            self.wfile.flush()
                            time.sleep(delay)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.close_connection = True
            finally:
                hub._record(FileRequest(self.command, repo_id, path, start, sent, status))

    return Handler


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve local folders as Hugging Face Hub model repos.")
    parser.add_argument("repos", nargs="+", metavar="ORG/NAME=FOLDER")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    hub = FakeHub(dict(item.split("=", 1) for item in args.repos)).start(args.port)
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    _main()
