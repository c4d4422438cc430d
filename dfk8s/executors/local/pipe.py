"""The pipe between the local launcher and its long-lived workers: both ends of one small protocol.

The launcher starts ``dfk8s worker --run RUN --serve`` (:func:`spawn_worker`) and writes one command a
line on its stdin: ``INDEX PARALLELISM`` (:func:`send_shard`). The worker (:func:`serve`) answers each
shard with JSON lines on its stdout, read by :func:`read_replies`:

- ``{"index": N, "event": "draining"}``: every row of shard N is sent; only answers are in flight, so the
  launcher may send the next index, whose rows fill the slots shard N frees;
- ``{"index": N, "code": C, "message": ..., "ok": ..., "failed": ...}``: shard N ended; ``C`` means what
  a worker's exit code means (0 done, 42 cannot succeed, else retry); ``"breaker": true`` when the run's
  circuit breaker tripped.

EOF on stdin: the worker finishes its shards and exits. Only the standard library is imported at the top:
:mod:`dfk8s.executors.local.early` spawns workers through this module before anything else is loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from dfk8s.errors import EXIT_DO_NOT_RETRY
from dfk8s.worker.lifecycle import PARENT_PID_ENV

log = logging.getLogger(__name__)

__all__ = ["SHARDS_AT_ONCE", "close_input", "read_replies", "send_shard", "serve", "serve_on_stdio",
           "spawn_worker", "worker_log_dir", "LOG_DIR_ENV"]


# -- the launcher's end --------------------------------------------------------------------------------

#: Where local runs keep their workers' logs, one folder per run; the temporary folder when unset.
LOG_DIR_ENV = "DFK8S_LOG_DIR"


def worker_log_dir(run_id: str) -> Path:
    """Where the workers of run ``run_id`` write their logs (``$DFK8S_LOG_DIR/dfk8s-<run id>``).

    ``$DFK8S_LOG_DIR`` defaults to the temporary folder (``$TMPDIR``, else ``/tmp``).
    """
    log_dir = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir()) / f"dfk8s-{run_id}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def spawn_worker(run_url: str, number: int, *, parallelism: int, log_dir: Path, gpus: str | None = None,
                 endpoint_url: str | None = None,
                 preload: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``dfk8s worker --run RUN --serve``, its stderr in ``log_dir``; returns it and its log path.

    ``preload`` names a serving whose modules it imports while it waits for its first shard.
    """
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    env.setdefault("DFK8S_LOG_LEVEL", "INFO")
    env[PARENT_PID_ENV] = str(os.getpid())
    env["DFK8S_PARALLELISM"] = str(parallelism)  # --rpm is split by the workers really running
    if preload:
        env["DFK8S_PRELOAD_SERVING"] = preload
    env["DFK8S_ENGINE_LOG_DIR"] = str(log_dir)  # a self-hosted engine's log, beside the worker's
    log_path = log_dir / f"worker-{number:03d}.log"
    with open(log_path, "ab") as log_file:
        # A new session: Ctrl-C reaches only the launcher, which stops the workers in order.
        process = subprocess.Popen(
            [sys.executable, "-m", "dfk8s", "worker", "--run", run_url, "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
            start_new_session=True, text=True, bufsize=1)
    return process, log_path



def send_shard(process: subprocess.Popen, index: int, parallelism: int) -> bool:
    """Send shard ``index`` (with the launcher's parallelism); False when the worker is gone meanwhile."""
    try:  # the parallelism goes with it: a prestarted worker was started before it was known
        process.stdin.write(f"{index} {parallelism}\n")
        process.stdin.flush()
        return True
    except (BrokenPipeError, OSError, ValueError):
        return False  # it died meanwhile; its exit event requeues the shard


def close_input(process: subprocess.Popen) -> None:
    """EOF on the worker's stdin: it takes no new shard, finishes what it runs and exits."""
    try:
        process.stdin.close()
    except OSError:
        pass


def read_replies(process: subprocess.Popen, on_reply: Callable[[dict], None], on_exit: Callable[[int], None],
                 name: str = "worker") -> None:
    """Pass each reply line of a worker to ``on_reply``, then its exit code to ``on_exit`` (blocks)."""
    for line in process.stdout:
        try:
            on_reply(json.loads(line))
        except ValueError:
            log.debug("%s wrote a line that is not a reply: %r", name, line[:200])
    on_exit(process.wait())


# -- the worker's end ----------------------------------------------------------------------------------

def serve_on_stdio(storage, *, endpoint_url: str | None, stop) -> int:
    """:func:`serve` with commands on stdin and replies on stdout; what ``dfk8s worker --serve`` runs.

    Stray prints of libraries go to stderr (the log), never into the replies. Returns the exit code.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    code = serve(storage, endpoint_url=endpoint_url, replies=replies, stop=stop)
    replies.flush()
    return code


#: Shards a long-lived worker runs at once: the current one, and the next one while the current one's
#: last answers are in flight (it is only sent once the current one is draining).
SHARDS_AT_ONCE = 2


def serve(storage, *, endpoint_url: str | None = None, commands=None, replies=None,
          stop=None) -> int:
    """A long-lived worker: take shard indexes from ``commands`` (one a line) until EOF or a stop.

    All shards run on one session (one event loop, one serving built once, one in-flight limit), each as
    soon as its index arrives. Each is answered with one JSON line on ``replies``:
    ``{"index", "code", "message", "ok", "failed"}``; ``code`` has the meaning of a worker's exit code:
    0 done, 42 cannot succeed, else retry. Before that, ``{"index", "event": "draining"}`` says that every
    row of the shard is sent: the launcher may then send the next index, which fills the slots the
    draining shard frees (no idle tail between shards). After a retryable failure or a stop the worker
    takes no new shard, lets the others finish and exits with that code (a fresh process takes over);
    after 42 it goes on, unless the run's circuit breaker tripped.

    Returns:
        The process exit code.
    """
    from dfk8s.errors import WorkerStopped
    from dfk8s.worker.lifecycle import StopToken
    from dfk8s.worker.session import WorkerSession

    stop = stop or StopToken()
    commands = commands if commands is not None else sys.stdin
    session = WorkerSession(stop=stop)
    code = 0
    try:
        code = session.run(_serve(storage, session, endpoint_url, commands, replies))
    finally:
        if code != WorkerStopped.exit_code:
            session.close()  # a stopped worker may have a model call still running in a thread: skip
    return code


async def _serve(storage, session, endpoint_url: str | None, commands, replies) -> int:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def put(line) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, line)
        except RuntimeError:  # the loop is closed: the worker is exiting
            pass

    def read_commands() -> None:
        for line in commands:
            put(line)
        put(None)  # EOF: the launcher closed the pipe (or is gone)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")
        replies.flush()

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    stopping = session.stop.event()
    active: set[asyncio.Task] = set()
    getter: asyncio.Future | None = None
    accepting, code = True, 0
    while True:
        if accepting and getter is None and not stopping.is_set():
            getter = asyncio.ensure_future(inbox.get())
        waiting = set(active) | ({getter} if getter is not None else set())
        if not waiting:
            break
        halt = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait(waiting | {halt}, return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if getter is not None and getter in done:
            line, getter = getter.result(), None
            if line is None or not line.strip():
                accepting = False
            else:
                index, *rest = (int(word) for word in line.split())  # "INDEX [PARALLELISM]"
                active.add(asyncio.create_task(_serve_one(
                    storage, index, session, endpoint_url,
                    lambda index=index: reply({"index": index, "event": "draining"}),
                    parallelism=rest[0] if rest else None)))
        for task in done & active:
            active.discard(task)
            shard_code, message = task.result()
            reply(message)
            if shard_code not in (0, EXIT_DO_NOT_RETRY) or message.get("breaker"):
                accepting = False  # the others finish; then a fresh process takes over
                code = code or shard_code
        if stopping.is_set():
            accepting = False
            if getter is not None:
                getter.cancel()
                getter = None
    return code


async def _serve_one(storage, index: int, session, endpoint_url: str | None,
                     on_draining: Callable[[], None] | None = None,
                     parallelism: int | None = None) -> tuple[int, dict]:
    """Process one shard for :func:`serve`; returns the exit code it stands for and the reply."""
    from dfk8s.errors import Dfk8sError, SystematicFailure
    from dfk8s.run import breaker
    from dfk8s.worker.shard import run_shard

    reply: dict = {"index": index, "code": 0, "message": ""}
    try:
        stats = await run_shard(storage, index, session=session, endpoint_url=endpoint_url,
                                on_draining=on_draining, parallelism=parallelism)
        reply.update(ok=stats.ok, failed=stats.failed, message=f"shard {index}: {stats.ok} ok, "
                     f"{stats.failed} failed")
    except Exception as exc:
        code = exc.exit_code if isinstance(exc, Dfk8sError) else 1
        if not isinstance(exc, Dfk8sError):
            log.exception("shard %d failed", index)
        else:
            log.error("shard %d: %s", index, exc)
        reply.update(code=code, message=f"{type(exc).__name__}: {exc}"[:1000])
        tripped = isinstance(exc, SystematicFailure)
        if tripped:  # the breaker contract: breaker.json names the cause for the launcher's one line
            await asyncio.to_thread(breaker.trip, storage, index, exc)
        if code == EXIT_DO_NOT_RETRY and (tripped or await asyncio.to_thread(breaker.read, storage)):
            reply["breaker"] = True
    return reply["code"], reply
