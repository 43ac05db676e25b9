"""The feature-table contract shared by embedding, radiomics, sharding and the downstream evaluation.

A feature table is three files next to each other (pyradiomics' lesson: provenance travels with every output):

* ``<stem>.csv``: first column ``id`` (the case id), then one column per feature, one row per case;
* ``<stem>.meta.json``: the provenance sidecar (``kind`` such as ``radiomics`` / ``ssl_embeddings``, bundle version,
  input hashes, settings, time);
* ``<stem>.failures.csv`` (radiomics): ``id,file,reason`` of every case that has no row, so a case is never
  silently dropped; the evaluation leaves these cases out of every feature set and lists the reasons.

Writes are atomic (``scripts.io_utils``): a killed job never leaves a half-written table, and a new table never sits
next to an old sidecar. The table, its sidecar and (when the writer has one) its failure report are one set: all three
are written to temporary files first and renamed into place only when every one is complete, so a failed write (a
full disk, ``ulimit -f``) leaves the earlier run's three files as they were, never a new failure report beside an old
table.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from scripts.io_utils import atomic_path, atomic_write_text, json_default, write_synced

FAILURE_COLUMNS = ("id", "file", "reason")
N_LISTED = 20  # ids listed in an error message before "... and N more"


def meta_path(table_path: str | os.PathLike) -> Path:
    """Provenance sidecar of a feature table: ``features.csv`` -> ``features.meta.json``."""
    p = Path(table_path)
    return p.with_name(p.stem + ".meta.json")


def failures_path(table_path: str | os.PathLike) -> Path:
    """Failure report of a feature table: ``radiomics.csv`` -> ``radiomics.failures.csv``."""
    p = Path(table_path)
    return p.with_name(p.stem + ".failures.csv")


def listing(ids: Iterable[str]) -> str:
    """Sorted ids for an error message, at most ``N_LISTED`` of them then "... and N more"."""
    ids = sorted(ids)
    shown = ", ".join(ids[:N_LISTED])
    return f"{shown} ... and {len(ids) - N_LISTED} more ({len(ids)} in all)" if len(ids) > N_LISTED else shown


# ------------------------------------------------------------------------------------------------------------ tables
def write_feature_table(
    path: str | os.PathLike,
    ids: Sequence[str],
    columns: Sequence[str],
    values: np.ndarray,
    provenance: dict | None = None,
    failures: Iterable[Sequence[str]] | None = None,
) -> None:
    """Write an ``id`` + feature-columns CSV atomically, plus its provenance sidecar and, with ``failures``
    (``[id, file, reason]`` rows, possibly none), its failure report: all or nothing (:func:`write_all_or_nothing`)."""
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
    meta = json.dumps(provenance or {}, indent=2, sort_keys=False, default=json_default) + "\n"
    files = {Path(path): buf.getvalue(), meta_path(path): meta}
    if failures is not None:
        files[failures_path(path)] = failures_text(failures)
    write_all_or_nothing(files)


def write_all_or_nothing(files: dict[Path, str]) -> None:
    """Write every ``{path: text}`` to a temporary file beside it, then rename them all into place, the first path
    (the table) last; a failed write (disk full, file too large) removes the temporaries and leaves every earlier
    file unchanged, so the set on disk is always one run's."""
    with contextlib.ExitStack() as stack:
        for path, text in files.items():  # the ExitStack renames in reverse: the first path (the table) goes last
            tmp = stack.enter_context(atomic_path(path))
            write_synced(tmp, text.encode("utf-8"))


def read_provenance(table_path: str | os.PathLike) -> dict:
    """The table's sidecar (empty when there is none)."""
    mp = meta_path(table_path)
    return json.loads(mp.read_text(encoding="utf-8")) if mp.is_file() else {}


def table_kind(table_path: str | os.PathLike) -> str | None:
    """The ``kind`` in a table's sidecar (``radiomics``, ``ssl_embeddings``...); None without one."""
    return read_provenance(table_path).get("kind")


def read_feature_table(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray, dict]:
    """Read a table written by :func:`write_feature_table`: ``(ids, columns, values, provenance)``.

    Checked on read, as a table edited by hand or cut by a copy can be anything: the header (``id`` first, every
    column named once), each row's width, a case id in each row and a number in each cell (``nan``/``inf`` are
    numbers: :func:`read_checked` refuses them for the evaluation). An error names the file, the line, the case id
    and the column. Blank lines are skipped. A table without rows (a radiomics part whose cases all failed) reads
    as zero rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature table not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if r]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a CSV feature table ({e})") from e
    if not rows or rows[0][1][:1] != ["id"]:
        raise ValueError(f"{path}: not a feature table (first column must be 'id')")
    columns = _checked_header(path, rows[0][1])
    body = rows[1:]
    for line, row in body:
        where = f"{path} line {line} (case {row[0]!r})"
        if len(row) != len(columns) + 1:
            missing = f"; the first missing column is {columns[len(row) - 1]!r}" if len(row) <= len(columns) else ""
            raise ValueError(
                f"{where}: {len(row)} cells where the header has {len(columns) + 1} (id + {len(columns)} "
                f"features){missing}"
            )
        if not row[0].strip():
            raise ValueError(f"{path} line {line}: empty case id")
    ids = [r[0] for _, r in body]
    try:
        values = np.array([r[1:] for _, r in body], dtype=np.float64).reshape(len(ids), len(columns))
    except ValueError:
        _raise_first_bad_cell(path, columns, body)
        raise
    return ids, columns, values, read_provenance(path)


def _checked_header(path: Path, header: list[str]) -> list[str]:
    columns = header[1:]
    unnamed = [i + 2 for i, c in enumerate(columns) if not c.strip()]
    if unnamed:
        raise ValueError(f"{path} line 1: header column(s) {unnamed[:N_LISTED]} have no name")
    dupes = sorted(c for c, n in Counter(columns).items() if n > 1)
    if dupes or "id" in columns:
        raise ValueError(f"{path} line 1: column(s) {(dupes or ['id'])[:N_LISTED]} appear more than once in the header")
    return columns


def _raise_first_bad_cell(path: Path, columns: list[str], body: list[tuple[int, list[str]]]) -> None:
    """The first cell that is not a number, named by line, case id and column (the slow path of an error only)."""
    for line, row in body:
        for column, cell in zip(columns, row[1:]):
            try:
                float(cell)
            except ValueError:
                what = "empty cell" if not cell.strip() else f"{cell!r} is not a number"
                raise ValueError(f"{path} line {line} (case {row[0]!r}), column {column!r}: {what}") from None


def read_checked(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """``(ids, columns, values)`` of a table fit for the evaluation: feature columns, unique ids, finite values."""
    ids, columns, values, _ = read_feature_table(path)
    if not columns:
        raise ValueError(f"feature table {path} has no feature columns")
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"feature table {path} has duplicate case ids: {listing(dupes)}")
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        bad_ids = sorted({ids[r] for r in rows})
        bad_cols = sorted({columns[c] for c in cols})
        raise ValueError(
            f"feature table {path} has NaN/Inf values in {int(bad.sum())} cells; cases: {listing(bad_ids)}; "
            f"columns: {', '.join(bad_cols[:N_LISTED])}{' ...' if len(bad_cols) > N_LISTED else ''}"
        )
    return ids, columns, values


# ---------------------------------------------------------------------------------------------------- failure report
def failures_text(rows: Iterable[Sequence[str]]) -> str:
    """CSV text of a failure report: the header, then ``[id, file, reason]`` rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FAILURE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def write_failures(path: str | os.PathLike, rows: Iterable[Sequence[str]]) -> None:
    atomic_write_text(path, failures_text(rows))


def read_failures(path: str | os.PathLike) -> list[list[str]]:
    """``[id, file, reason]`` rows of a failure report; a file with another header is refused."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != FAILURE_COLUMNS:
        raise ValueError(f"{path}: not a failure report (header must be {','.join(FAILURE_COLUMNS)})")
    for line, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(FAILURE_COLUMNS):
            raise ValueError(f"{path} line {line} (case {row[0]!r}): {len(row)} cells, expected id,file,reason")
    return [r for r in rows[1:] if r]


def failed_cases(table_path: str | os.PathLike) -> dict[str, str]:
    """``{id: reason}`` from the failure report next to a radiomics table (empty when there is none): the cases
    the evaluation must leave out of every feature set, with the reason shown in the report."""
    path = failures_path(table_path)
    if not path.is_file():
        return {}
    return {row[0]: f"radiomics failed: {row[2]}" for row in read_failures(path)}
