"""A local folder as run storage; every write is a temp file renamed into place."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dfk8s.errors import NotFound, StorageError, UsageError
from dfk8s.storage._base import Storage, join_key

#: Tries to make a write's folder while concurrent deletes remove the folders they empty.
_MKDIR_ATTEMPTS = 20


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (``open()``'s 0o666 less the umask).

    A run's files hold no secret: teammates and a web server read result.jsonl, images and the report as
    the umask allows. (mkstemp, which the writes go through, would make every file 0600.)
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no /proc: read it by setting it, and put it back at once
    os.umask(umask)
    return 0o666 & ~umask


class LocalStorage(Storage):
    """Storage rooted at a local folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(self.url(key)) from None

    def _atomic(self, key: str):
        path = self._path(key)
        attempts = 0
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.fchmod(fd, _file_mode())
                return path, fd, tmp
            except (FileNotFoundError, FileExistsError) as exc:
                # Another process's delete removed a folder it emptied (parts/) while mkdir made the
                # folders (ENOENT, or EEXIST from a folder gone again before mkdir looked) or before the
                # temp file was in it: make them again. Once the temp file is in, no delete removes it.
                attempts += 1
                if _file_in_the_way(path.parent) or attempts == _MKDIR_ATTEMPTS:
                    raise StorageError(f"cannot write {path}: {_reason(exc, path.parent)}") from None
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {_reason(exc, path.parent)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path, fd, tmp = self._atomic(key)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {_reason(exc, path)}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist, atomically; returns whether this call created it.

        The bytes go to a temporary file that is then hard-linked into place: the link fails if the key
        exists, and a reader never sees a partial object.
        """
        path, fd, tmp = self._atomic(key)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {_reason(exc, path)}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_file(self, key: str, local_path: str) -> None:
        path, fd, tmp = self._atomic(key)
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open_lines(self, key: str) -> Iterator[bytes]:
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError:
            raise NotFound(self.url(key)) from None
        with f:
            for line in f:
                yield line.rstrip(b"\r\n")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix)
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a write in progress, not an object yet
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        yield from sorted(keys)

    def folders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders the delete emptied (like S3, a folder exists only while it holds objects).
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))

    def url(self, key: str = "") -> str:
        return str(self._path(join_key(key)))


def _file_in_the_way(folder: Path) -> Path | None:
    """A file where ``folder`` or one of its parents should be.

    One stat each: a folder that a concurrent delete removes between two checks is not a file.
    """
    for candidate in [folder, *folder.parents]:
        try:
            mode = candidate.stat().st_mode
        except OSError:
            continue
        if not stat.S_ISDIR(mode):
            return candidate
    return None


def _reason(exc: OSError, path: Path) -> str:
    """Why a local write failed, in words (a file where a folder should be, read-only, disk full)."""
    import errno

    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _file_in_the_way(path)
        return f"{blocker or path} is a file, not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (the folder is read-only)"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)


def check_writable_folder(root: str | os.PathLike) -> None:
    """Raise a one-line UsageError unless ``root`` is (or can become) a folder this process can write.

    A folder made read-only with chmod counts as read-only even for root, who could write it anyway.
    """
    path = Path(root).expanduser().absolute()
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"--output {path}: {blocker} is a file, not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    import stat

    mode = existing.stat().st_mode
    if not os.access(existing, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"--output {path}: {existing} is read-only (permission denied)")
