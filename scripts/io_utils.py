"""Atomic file writes (honouring the umask), file hashes and output-folder locks, shared by every stage.

Everything is written to a temporary file in the same directory and renamed into place, so a killed
job never leaves a half-written table or checkpoint behind. The feature-table format is ``scripts.feature_table``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status`` on Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief, process-wide change)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (0o666) or folder (0o777) under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by ``tempfile`` (always 0600, folders 0700) the mode a plain ``open()`` would have given it,
    so outputs written atomically stay readable by colleagues and service accounts as the umask intends."""
    os.chmod(path, umask_mode(directory))


def _write_error(path: Path, e: OSError) -> OSError:
    """The OS error (same errno, so the same subclass) with a message that names the file the user asked for.

    A full disk says only "[Errno 28] No space left on device" and names the temporary file, if anything.
    """
    message = f"cannot write {path}: {e.strerror or e}; nothing was written there (an earlier version is unchanged)"
    err = OSError(e.errno, message) if e.errno is not None else OSError(message)
    err.written_path = str(path)
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    An ``OSError`` inside the block (disk full, file too large, permission denied) is re-raised naming ``path``;
    the temporary file is removed and ``path`` keeps its previous content. The file gets the umask's mode (0644
    under umask 022), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, umask_mode())
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        if hasattr(e, "written_path"):  # a nested atomic write failed and already named its file
            raise
        raise _write_error(path, e) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove a file can be created in it, before hours of work that end in a write.

    Tries for real (``os.access`` is wrong for root, ACLs and read-only mounts); raises an ``OSError`` naming
    ``what`` and the folder.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        message = f"{what} {path} is not writable: {e.strerror or e}"
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    return path


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync before rename so a crash cannot leave a torn file)."""
    with atomic_path(path) as tmp:
        write_synced(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def py_scalar(v):
    """A numpy scalar as its Python value (for JSON and messages); anything else unchanged."""
    return v.item() if isinstance(v, np.generic) else v


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (a volume need not fit in memory twice)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file: the content key of caches, stage keys and provenance sidecars."""
    return file_digest(path, "sha256")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on the output folder itself (``flock`` on its descriptor: no lock file is left
    behind, and a killed holder's lock is released by the kernel) while one run writes its table, meta.json and
    failures report, so two concurrent extractions (or merges of sharded ones) into one folder never leave the
    three from different runs."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


WRITER_LOCK = ".siam3d_writer.lock"


class FolderInUse(RuntimeError):
    """Another live process is writing into the output folder (it holds the folder's writer lock)."""


def _holder(fd: int) -> str:
    """The lock holder's record (pid, host, start time, command) as text; a holder that has only just taken the lock
    may not have written it yet, so read again for a moment."""
    for _ in range(10):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 8192).decode("utf-8", "replace")
        try:
            h = json.loads(text)
            return f"{h['what']} pid {h['pid']} on {h['host']}, started {h['started']} ({h['command']})"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that left no record"


def acquire_writer_lock(folder: str | os.PathLike, what: str) -> int:
    """Take the folder's writer lock or refuse at once, naming the holder; returns the descriptor holding it
    (:func:`release_writer_lock` releases it; so does the kernel when the process ends, however it ends).

    One writer per output folder: two pipelines (or two trainings) into one folder would both "succeed" with one's
    results overwritten by the other's. The lock is an ``flock`` on ``<folder>/.siam3d_writer.lock``, a file that
    records the holder (pid, host, start time, command) for the refusal message and is removed when the holder
    releases it (a killed holder leaves it, unlocked: the next run takes it). A lock taken on a file that its holder
    removed meanwhile is taken again on the new one, so two processes never hold two files. It is a file rather
    than the folder itself, which :func:`output_lock` locks around each table write: a stage that writes tables into
    the folder while its pipeline holds the writer lock must not wait for its own pipeline.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WRITER_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{folder} is being written by another {holder}; two writers into one folder would overwrite each "
                f"other's results. Wait for it to finish, or write into another folder (its lock: {path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # its holder removed the file as this process locked it: lock the new one
    record = {
        "what": what,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
    return fd


def release_writer_lock(folder: str | os.PathLike, fd: int) -> None:
    """Remove the lock file (while still holding it) and release the lock."""
    try:
        (Path(folder) / WRITER_LOCK).unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, what: str):
    """:func:`acquire_writer_lock` for the length of a block."""
    fd = acquire_writer_lock(folder, what)
    try:
        yield
    finally:
        release_writer_lock(folder, fd)


_HELD: dict[str, int] = {}  # folder (real path) -> descriptor of the writer lock this process holds on it


def hold_writer_lock(folder: str | os.PathLike, what: str) -> Callable[[], None]:
    """:func:`acquire_writer_lock` for a workflow that cannot wrap its run in a block (an Ignite handler): returns the
    function that releases it (the process's end releases it too). Re-entrant within one process: a folder this
    process already holds is not refused (a test that runs two workflows in turn), and only the first holder's
    release frees it."""
    key = os.path.realpath(folder)
    if key in _HELD:
        return lambda: None
    fd = acquire_writer_lock(folder, what)
    _HELD[key] = fd

    def release() -> None:
        if _HELD.get(key) == fd:
            del _HELD[key]
            release_writer_lock(folder, fd)

    return release
