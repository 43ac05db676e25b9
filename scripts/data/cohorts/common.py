"""What the cohort builders share: constants, the exclusion record, table reading, file naming, atomic volume
writes, path relativising, per-case validation and the finishing step that writes the datalist last.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.data.validation import validate_items
from scripts.io_utils import honour_umask

MODALITIES = ("flair", "t1", "t1ce", "t2")
MODALITY_ALIASES = {
    "flair": ("flair", "t2f"),
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c", "t1gd"),
    "t2": ("t2", "t2w"),
    "seg": ("seg",),
}
CENTRES = ("CBICA", "TCIA", "TMC")
BRATS_GRADE_MAP = {"HGG": 1, "LGG": 0}
NSCLC_STAGE_MAP = {"I": 1, "II": 2, "III": 3}
NSCLC_LABEL_MAP = {"1": "I", "2": "II", "3": "III"}
MISSING = {"", "na", "n/a", "nan", "none", "null", "unknown", "?", "-", "nx", "x"}
NIFTI_EXT = (".nii.gz", ".nii")
DIRECT_EXT = (".nii.gz", ".nii", ".nrrd")  # read by the bundle's loaders as they are
CONVERT_EXT = (".mha", ".mhd")  # readable by SimpleITK only: converted to NIfTI
DICOM_EXT = (".dcm", ".ima")
PROGRESS_EVERY = 25


@dataclass(frozen=True)
class Excluded:
    """One case left out of the datalist and why (the reason names the file or table at fault)."""

    id: str
    reason: str


# ------------------------------------------------------------------------------------------------ shared helpers


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a clinical/grade CSV: BOM, ``;``/tab delimiters and stray spaces are tolerated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    rows = [r for r in reader if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty table")
    columns = [c.strip() for c in rows[0]]
    return columns, [{c: (r[i].strip() if i < len(r) else "") for i, c in enumerate(columns)} for r in rows[1:]]


def find_column(columns: Sequence[str], name: str, path: str | os.PathLike, hint: str = "") -> str:
    """The column called ``name``, ignoring case, spaces, dots and underscores; a clear error otherwise."""

    def key(s: str) -> str:
        return re.sub(r"[\s._]", "", s).lower()

    for c in columns:
        if key(c) == key(name):
            return c
    raise ValueError(f"{path}: no column {name!r} (columns: {', '.join(columns)}){hint}")


def _duplicates(ids: Iterable[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


def _volume_ext(name: str) -> str | None:
    low = name.lower()
    for ext in (*DIRECT_EXT, *CONVERT_EXT, *DICOM_EXT):
        if low.endswith(ext):
            return ext
    return None


def _stem(path: Path) -> str:
    """Name without its volume extension (a folder keeps its whole name)."""
    ext = None if path.is_dir() else _volume_ext(path.name)
    return path.name[: -len(ext)] if ext else path.name


def _newer(target: Path, sources: Sequence[Path]) -> bool:
    """Whether ``target`` exists and is at least as new as every source (so a conversion can be reused)."""
    if not target.is_file():
        return False
    return target.stat().st_mtime >= max(p.stat().st_mtime for p in sources)


def _atomic_volume_write(write: Callable[[str], None], path: Path) -> None:
    """Call ``write(tmp)`` with a temporary file of the same extension next to ``path``, then rename it into place.

    The readers/writers (SimpleITK, nibabel) pick the format from the extension, so ``io_utils.atomic_path``'s
    ``.tmp`` suffix cannot be used here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        honour_umask(tmp)  # the writers reuse mkstemp's 0600 file: without this the cohort would be private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _datalist_path(path: str | os.PathLike, kind: str) -> tuple[Path, str]:
    p = Path(path)
    if p.suffix.lower() != ".json":
        raise ValueError(f"{kind}: --out must be the datalist file to write (e.g. datalist.json), got {path}")
    return p, p.stem


def _rel(path: str | os.PathLike, base: Path) -> str:
    """Path relative to the datalist folder when it lies under it (a movable cohort), absolute otherwise."""
    p = Path(path).resolve()
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


def _relativise(item: dict, base: Path) -> dict:
    out = dict(item)
    out["image"] = (
        [_rel(p, base) for p in item["image"]] if isinstance(item["image"], list) else _rel(item["image"], base)
    )
    out["mask"] = _rel(item["mask"], base)
    return out


def _validate(items: list[dict], excluded: list[Excluded], log: Callable[[str], None]) -> list[dict]:
    """Keep the cases whose files pass ``validate_items``; the others are excluded with every problem found."""
    kept = []
    t0 = time.perf_counter()
    for n, item in enumerate(items, start=1):
        problems = validate_items([item], check_finite=True)
        if problems:
            detail = "; ".join(f"{p.problem} ({p.file or '-'})" for p in problems)
            excluded.append(Excluded(item["id"], f"failed validation: {detail}"))
        else:
            kept.append(item)
        if n % PROGRESS_EVERY == 0 or n == len(items):
            log(f"validated {n}/{len(items)} cases ({n - len(kept)} failed) in {time.perf_counter() - t0:.1f} s")
    return kept
