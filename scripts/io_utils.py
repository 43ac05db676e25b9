"""Atomic file writes and the feature-table format shared by inference, radiomics and evaluation.

A feature table is a CSV whose first column is ``id`` (the case id) followed by one column per feature,
plus a provenance sidecar ``<table>.meta.json`` (bundle version, inputs' hashes, settings, time).
Everything is written to a temporary file in the same directory and renamed into place, so a killed
job never leaves a half-written table or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
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


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync before rename so a crash cannot leave a torn file)."""
    with atomic_path(path) as tmp:
        _write_synced(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
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


def meta_path(table_path: str | os.PathLike) -> Path:
    """Provenance sidecar of a feature table: ``features.csv`` -> ``features.meta.json``."""
    p = Path(table_path)
    return p.with_name(p.stem + ".meta.json")


def write_feature_table(
    path: str | os.PathLike,
    ids: Sequence[str],
    columns: Sequence[str],
    values: np.ndarray,
    provenance: dict | None = None,
) -> None:
    """Write an ``id`` + feature-columns CSV atomically, plus its provenance sidecar."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(ids), len(columns)):
        raise ValueError(f"table shape {values.shape} does not match {len(ids)} ids x {len(columns)} columns")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if list(ids).count(i) > 1})
        raise ValueError(f"duplicate case ids in feature table {path}: {dupes}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", *columns])
    for case_id, row in zip(ids, values):
        writer.writerow([case_id, *(repr(float(v)) for v in row)])
    meta = json.dumps(provenance or {}, indent=2, sort_keys=False, default=_json_default) + "\n"
    # the new table is fully on disk before the sidecar is replaced, and is renamed last: a full disk leaves both old
    # files in place, never a new sidecar next to an old table or a torn file
    with atomic_path(path) as table_tmp:
        _write_synced(table_tmp, buf.getvalue().encode("utf-8"))
        atomic_write_bytes(meta_path(path), meta.encode("utf-8"))


def read_feature_table(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray, dict]:
    """Read a table written by :func:`write_feature_table`: ``(ids, columns, values, provenance)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature table not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["id"]:
        raise ValueError(f"{path}: not a feature table (first column must be 'id')")
    columns = rows[0][1:]
    ids = [r[0] for r in rows[1:]]
    try:
        values = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float64).reshape(len(ids), -1)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric feature value ({e})") from e
    mp = meta_path(path)
    provenance = json.loads(mp.read_text(encoding="utf-8")) if mp.is_file() else {}
    return ids, columns, values, provenance
