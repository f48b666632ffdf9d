"""Atomic outputs and content hashes.

A stage never leaves a half-written output: it writes into a temporary sibling and renames it
over the old output only when everything succeeded, so a failed or killed run leaves the previous
output exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import DISK_ERRNOS, cannot_write


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextmanager
def atomic_output_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` when the block exits without error.

    On an exception the temporary directory is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_dead_writers(path.parent, f".{path.name}.[to][ml][pd]-*")  # .tmp-PID / .old-PID of a killed writer
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with writing(path, staging):
            yield staging
    except BaseException:
        remove(staging)
        raise
    retired = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, retired)
    os.replace(staging, path)
    shutil.rmtree(retired, ignore_errors=True)


def remove(path: Path) -> None:
    """Remove a file or folder if it is there (a read-only disk may refuse: then it holds nothing of ours)."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def writing(path: Path, staging: Path) -> Iterator[None]:
    """Writes to `staging` on their way to `path`: if the disk refuses one (full, read-only), the staging
    file or folder goes and the error is one line naming `path`, not the temporary name."""
    try:
        yield
    except OSError as error:
        remove(staging)
        if error.errno in DISK_ERRNOS:
            raise cannot_write(path, error) from None
        raise


def clear_dead_writers(folder: Path, pattern: str) -> None:
    """Remove what writers that have died left in `folder`: names matching `pattern` that end in -<pid>."""
    for leftover in folder.glob(pattern):
        if not pid_alive(leftover.name.rsplit("-", 1)[-1]):
            remove(leftover)


@contextmanager
def file_lock(path: Path, timeout_s: float, busy: Exception) -> Iterator[None]:
    """Hold the file lock at `path` for the block; raise `busy` if another process holds it past `timeout_s`."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise busy from None
    try:
        yield
    finally:
        lock.release()


def pid_alive(pid: str) -> bool:
    """Whether process `pid` (a staging folder's suffix) still runs, and so may still be writing there."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` through a temporary file and a rename: the file is the old one or the new one, whole.

    A disk that refuses the write (full, read-only) leaves no temporary file and raises one line naming `path`.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, staging):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON into a directory that is itself being built atomically."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fingerprint(*parts: Any) -> str:
    """A short hash of everything that defines a run: a checkpoint of another run is never resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_sha256(folder: Path, *patterns: str) -> dict[str, str]:
    """sha256 of the files in `folder` matching the glob patterns, by name: contents a run depends on."""
    return {path.name: sha256_file(path) for pattern in patterns for path in sorted(folder.glob(pattern))}
