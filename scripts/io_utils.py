"""Atomic file writes (honouring the umask) and file hashes, shared by every stage.

Everything is written to a temporary file in the same directory and renamed into place, so a killed
job never leaves a half-written table or checkpoint behind. The feature-table format is ``scripts.feature_table``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
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


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
