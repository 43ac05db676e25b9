"""Real cohorts -> validated datalists: BraTS (2018-2021 layouts) and NSCLC-Radiomics, plus the cohort summary.

A researcher arrives with a download folder; one call turns it into a datalist the bundle can train on and says
exactly which cases were left out and why. Nothing is dropped silently: every case that cannot be used is
recorded in the datalist's ``"excluded"`` list as ``{"id", "reason"}`` (missing modality or mask file, no grade or
stage, an unparseable or out-of-scope stage, a duplicate id, a file that fails validation...), and the summary
writes it as a CSV next to the datalist.

BraTS (``build_brats_datalist``)
    one folder per case, ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or ``.nii``; 2023 names t2f/t1n/t1c/t2w
    are accepted as aliases), anywhere under the root (2018/2019 put them under ``HGG/`` and ``LGG/``). Grades
    come from a CSV (``name_mapping.csv`` style: an id column, found automatically as the column whose values
    match the most case folders, and a ``Grade`` column) or, without one, from an ``HGG``/``LGG`` parent folder;
    ``grade_map`` turns them into labels (HGG -> 1, LGG -> 0). The image is one modality or several as channels;
    the mask is the whole tumour (the segmentation as is: every non-zero label) unless ``mask_labels`` picks
    labels, in which case a derived mask is written. ``centre`` is read from the case name or, for 2020/2021
    names, from the older ids in the same CSV row (CBICA, TCIA01..13 -> TCIA, TMC; other BraTS 2017-2019 names,
    e.g. the 2013 cases, -> "others"; nothing to go on -> "unknown"), so the paper's Table 1 can be reproduced.

NSCLC-Radiomics (``build_nsclc_datalist``)
    CT per patient as NIfTI/NRRD (used in place), MHA/MHD (converted) or a DICOM series folder (read with
    SimpleITK's ImageSeriesReader and converted to NIfTI once); GTV masks as NIfTI/NRRD/MHA, flat
    (``<id>.nii.gz``, ``<id>_gtv.nii.gz``) or in a per-patient folder (``<id>/mask_GTV-1.nii.gz``, picked by
    ``mask_pattern``). RTSTRUCT/SEG masks are not read: no DICOM-RT library is part of the bundle's environment,
    so the error says to convert the GTV to NIfTI/NRRD first. ``Overall.Stage`` is parsed leniently (see
    ``parse_stage``) into I/II/III -> 1/2/3; stage IV, a missing stage ("NA", "") and anything unparseable are
    excluded with the raw value in the reason (the paper used I/II/III and excluded two patients without one).

Paths in the datalist are relative to the datalist file when the file lies under its folder, absolute otherwise.
The datalist is written last and atomically, after the optional per-case validation (``validate_items``: files
readable, image and mask on the same grid, mask not empty, no NaN), so it never points at a case that fails.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import io
import locale
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.datalist import SECTIONS, default_case_id, read_datalist_doc, validate_items
from scripts.io_utils import atomic_write_json, atomic_write_text, honour_umask

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


def _finish(
    out: Path,
    items: list[dict],
    excluded: list[Excluded],
    meta: dict,
    validate: bool,
    log: Callable[[str], None],
) -> Path:
    """Validate, then write the datalist (last, atomically) and its summary; fail if no case is usable."""
    items = sorted(items, key=lambda it: it["id"])
    if validate:
        items = _validate(items, excluded, log)
    base = out.parent.resolve()
    excluded = sorted(excluded, key=lambda e: (e.id, e.reason))
    doc = {
        **meta,
        "training": [_relativise(it, base) for it in items],
        "testing": [],
        "excluded": [{"id": e.id, "reason": e.reason} for e in excluded],
    }
    if not items:
        write_summary(doc, out, log)
        reasons = Counter(_reason_kind(e.reason) for e in excluded).most_common(3)
        raise ValueError(
            f"no usable case: {len(excluded)} excluded (most common: {reasons}); "
            f"see {summary_paths(out)['excluded']} - the datalist was not written"
        )
    atomic_write_json(out, doc)
    write_summary(doc, out, log)
    log(f"{meta.get('name', 'cohort')}: {len(items)} cases, {len(excluded)} excluded -> {out}")
    return out


# ------------------------------------------------------------------------------------------------------- BraTS


def centre_of(names: Iterable[str], centres: Sequence[str] = CENTRES) -> str | None:
    """Acquisition centre from BraTS ids: the first name that carries one wins.

    ``Brats18_CBICA_AAB_1`` -> CBICA, ``BraTS19_TCIA08_162_1`` -> TCIA, ``BraTS19_TMC_06290_1`` -> TMC; a BraTS
    2017-2019 name with another institution slot (``Brats18_2013_10_1``) -> "others"; names with no institution
    (``BraTS20_Training_001``, ``BraTS2021_00000``, "NA") -> None, so the caller can look at other ids.
    """
    wanted = {c.upper(): c for c in centres}
    for name in names:
        name = str(name or "").strip()
        for token in re.split(r"[_\-\s]+", name):
            base = re.sub(r"\d+$", "", token.upper())  # TCIA01 -> TCIA
            if token.upper() in wanted or base in wanted:
                return wanted.get(token.upper(), wanted.get(base))
        if re.match(r"(?i)^brats_?1[789]_[^_]+_", name):
            return "others"
    return None


def find_case_folders(root: Path, skip: Sequence[Path] = ()) -> dict[str, list[Path]]:
    """``{case id: [folders]}``: every folder under ``root`` that holds NIfTI files is a case named after it."""
    skip = [s.resolve() for s in skip]
    found: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        if any(f.lower().endswith(NIFTI_EXT) and not f.startswith(".") for f in filenames):
            if here.resolve() == root.resolve():
                raise ValueError(
                    f"{root} holds NIfTI files directly; the BraTS layout is one folder per case "
                    "(<case>/<case>_flair.nii.gz, ...): pass the folder that contains the case folders"
                )
            found[here.name].append(here)
    return dict(found)


def modality_file(folder: Path, case_id: str, modality: str) -> tuple[Path | None, str | None]:
    """(file, None) or (None, why not) for one modality (or "seg") of a BraTS case folder.

    Exact names first (``<case>_<alias>.nii.gz`` / ``.nii``, ``-`` for 2023), then a single file in the folder
    ending in ``_<alias>.nii[.gz]`` (a renamed folder), and for the segmentation a single file whose name holds
    "seg" (BraTS 2020 ships case 355's as ``W39_1998.09.19_Segm.nii``).
    """
    aliases = MODALITY_ALIASES[modality]
    for alias in aliases:
        for sep in ("_", "-"):
            for ext in NIFTI_EXT:
                p = folder / f"{case_id}{sep}{alias}{ext}"
                if p.is_file():
                    return p, None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_EXT))
    pattern = re.compile(r"[_\-.](" + "|".join(aliases) + r")\.nii(\.gz)?$", re.IGNORECASE)
    hits = [p for p in files if pattern.search(p.name)]
    if not hits and modality == "seg":
        hits = [p for p in files if "seg" in p.name.lower()]
    if len(hits) == 1:
        return hits[0], None
    what = "segmentation" if modality == "seg" else f"{modality} file"
    if hits:
        return None, f"ambiguous {what}: {', '.join(p.name for p in hits)} in {folder}"
    return None, f"missing {what}: no {case_id}_{aliases[0]}.nii.gz (or .nii) in {folder}"


def read_grades(
    path: str | os.PathLike,
    case_ids: Iterable[str],
    id_column: str | None = None,
    grade_column: str = "Grade",
) -> tuple[str, str, dict[str, list[dict[str, str]]]]:
    """(id column, grade column, ``{case id: [rows]}``) of a grades CSV.

    Without ``id_column`` the id column is the one whose values match the most case folders, which finds
    ``BraTS_2020_subject_ID`` in ``name_mapping.csv``, ``Brats20ID`` in ``survival_info.csv`` and the like.
    """
    columns, rows = read_table(path)
    hint = "; pass --grade_column NAME, or leave --grades out to take grades from HGG/LGG parent folders"
    g_col = find_column(columns, grade_column, path, hint)
    ids = set(case_ids)
    if id_column is not None:
        i_col = find_column(columns, id_column, path)
    else:
        matches = {c: sum(r[c] in ids for r in rows) for c in columns if c != g_col}
        i_col = max(matches, key=lambda c: matches[c]) if matches else ""
        if not matches or matches[i_col] == 0:
            raise ValueError(
                f"{path}: no column holds the case folder names (e.g. {sorted(ids)[:3]}); pass --id_column NAME "
                f"(columns: {', '.join(columns)})"
            )
    by_id: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r[i_col] and r[i_col].lower() not in MISSING:
            by_id[r[i_col]].append(r)
    return i_col, g_col, dict(by_id)


def _parse_list(value: str | Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip())
    if items == ("all",):
        return tuple(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items or len(set(items)) != len(items):
        raise ValueError(f"{what} must be distinct names from {list(allowed)} (or 'all'), got {list(items)}")
    return items


def _derived_mask(seg: Path, labels: Sequence[int], out: Path) -> None:
    """Write ``isin(seg, labels)`` as uint8 NIfTI on the segmentation's grid (reused while newer than ``seg``)."""
    if _newer(out, [seg]):
        return
    import nibabel as nib

    img = nib.load(seg)
    mask = np.isin(np.asanyarray(img.dataobj), np.asarray(labels)).astype(np.uint8)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    _atomic_volume_write(lambda tmp: nib.save(nib.Nifti1Image(mask, img.affine, header), tmp), out)


def build_brats_datalist(
    root: str | os.PathLike,
    out: str | os.PathLike,
    grades: str | os.PathLike | None = None,
    modalities: str | Sequence[str] = MODALITIES,
    grade_map: Mapping[str, int] | None = None,
    id_column: str | None = None,
    grade_column: str = "Grade",
    mask_labels: Sequence[int] | None = None,
    centres: Sequence[str] = CENTRES,
    validate: bool = True,
    files_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a BraTS datalist to ``out`` (a .json path) with every unusable case in ``"excluded"``; returns ``out``.

    ``modalities``: names from flair/t1/t1ce/t2 (or "all"), stacked as channels in that order; one name gives a
    single-channel image. ``grade_map``: grade text -> label (default HGG -> 1, LGG -> 0; case-insensitive).
    ``mask_labels``: None = whole tumour (the segmentation file itself, every non-zero label); e.g. ``[1, 4]``
    (tumour core, BraTS 2017-2021 labels) writes derived masks under ``files_dir`` (default
    ``<datalist folder>/<datalist stem>_files``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS root folder not found: {root}")
    out, stem = _datalist_path(out, "brats")
    files_dir = Path(files_dir) if files_dir else out.parent / f"{stem}_files"
    mods = _parse_list(modalities, MODALITIES, "modalities")
    gmap = {str(k).strip().upper(): int(v) for k, v in (grade_map or BRATS_GRADE_MAP).items()}
    labels = tuple(int(v) for v in mask_labels) if mask_labels is not None else None
    folders = find_case_folders(root, skip=[files_dir])
    if not folders:
        raise ValueError(f"no case folders with NIfTI files under {root}")
    excluded: list[Excluded] = []
    table: dict[str, list[dict[str, str]]] = {}
    i_col = g_col = ""
    if grades is not None:
        i_col, g_col, table = read_grades(grades, folders, id_column, grade_column)
        for cid in sorted(set(table) - set(folders)):
            excluded.append(
                Excluded(cid, f"no case folder: listed in {grades} (column {i_col!r}), not found under {root}")
            )
    items = []
    for cid in sorted(folders):
        places = folders[cid]
        if len(places) > 1:
            excluded.append(Excluded(cid, f"duplicate id: {len(places)} case folders ({', '.join(map(str, places))})"))
            continue
        folder = places[0]
        rows = table.get(cid, [])
        if len(rows) > 1:
            excluded.append(Excluded(cid, f"duplicate id: {len(rows)} rows in {grades} (column {i_col!r})"))
            continue
        label, grade_text, why = _brats_grade(folder, rows[0] if rows else None, g_col, gmap, grades)
        files, problems = {}, []
        for m in (*mods, "seg"):
            files[m], problem = modality_file(folder, cid, m)
            if problem:
                problems.append(problem)
        if why:
            problems.append(why)
        if problems:
            excluded.append(Excluded(cid, "; ".join(problems)))
            continue
        mask = files["seg"]
        if labels is not None:
            mask = files_dir / "masks" / f"{cid}_mask.nii.gz"
            _derived_mask(files["seg"], labels, mask)
        image = [str(files[m]) for m in mods]
        centre = centre_of([cid, *(rows[0].values() if rows else [])], centres) or "unknown"
        items.append(
            {
                "id": cid,
                "image": image if len(image) > 1 else image[0],
                "mask": str(mask),
                "label": label,
                "grade": grade_text,
                "centre": centre,
            }
        )
    label_map: dict[str, str] = {}
    for name, value in gmap.items():
        label_map[str(value)] = f"{label_map[str(value)]}/{name}" if str(value) in label_map else name
    meta = {
        "name": "BraTS",
        "description": "built by scripts.data.cohorts.build_brats_datalist; 'excluded' lists every case left out",
        "source": {
            "root": str(root.resolve()),
            "grades": str(Path(grades).resolve()) if grades else None,
            "id_column": i_col or None,
            "grade_column": g_col or None,
            "modalities": list(mods),
            "mask": "whole tumour (segmentation > 0)" if labels is None else f"segmentation in {list(labels)}",
        },
        "label_map": label_map,
        "centres": [*centres, "others", "unknown"],
    }
    return _finish(out, items, excluded, meta, validate, log)


def _brats_grade(
    folder: Path, row: dict[str, str] | None, g_col: str, gmap: Mapping[str, int], grades
) -> tuple[int | None, str, str | None]:
    """(label, grade text, None) or (None, "", reason) from the CSV row and/or an HGG/LGG parent folder, which
    must agree when both are there."""
    from_folder = folder.parent.name.strip().upper()
    from_folder = from_folder if from_folder in gmap else None
    if row is not None:
        raw = row[g_col]
        if raw.lower() in MISSING:
            if from_folder is None:
                return None, "", f"no grade: {raw!r} in column {g_col!r} of {grades} and no HGG/LGG parent folder"
        else:
            grade = raw.upper()
            if grade not in gmap:
                return None, "", f"unknown grade: {raw!r} in {grades} is not in the grade map ({', '.join(gmap)})"
            if from_folder is not None and gmap[from_folder] != gmap[grade]:
                return (
                    None,
                    "",
                    f"grade conflict: {grades} says {raw!r}, parent folder {folder.parent} says {from_folder}",
                )
            return gmap[grade], raw, None
    if from_folder is not None:
        return gmap[from_folder], folder.parent.name, None
    where = f"not in {grades}" if grades else "no --grades table given"
    return None, "", f"no grade: {where} and no HGG/LGG parent folder"


# ------------------------------------------------------------------------------------------------------- NSCLC


def _stage_key(value: str) -> str:
    s = re.sub(r"(?i)^\s*stage", "", str(value)).strip().upper()
    return re.sub(r"[\s.]+", "", s)


def parse_stage(value: str | None, stage_map: Mapping[str, int] | None = None) -> tuple[int | None, str | None]:
    """(label, None) or (None, reason) for a messy ``Overall.Stage`` value.

    Tolerated: case, spaces, a "Stage" prefix, sub-stages ('IIIa', 'iiib', ' II ', 'Stage IB' -> III, III, II, I)
    and arabic numerals ('3a'). I/II/III -> 1/2/3. Excluded with a reason: missing ('NA', '', 'nan', 'unknown'),
    stage IV (outside the paper's three classes; ``stage_map={"IV": 3}`` keeps it) and anything else.
    ``stage_map`` keys are matched after the same normalisation, first on the full value ('IIIB'), then on the
    main stage ('III'), so it can relabel sub-stages or stages.
    """
    raw = "" if value is None else str(value)
    if raw.strip().lower() in MISSING:
        return None, f"no stage: {raw!r}"
    key = _stage_key(raw)
    user = {_stage_key(k): int(v) for k, v in (stage_map or {}).items()}
    if key in user:
        return user[key], None
    m = re.fullmatch(r"(IV|III|II|I|[1-4])([ABC]\d?)?", key)
    if not m:
        return None, f"unparseable stage: {raw!r}"
    main = {"1": "I", "2": "II", "3": "III", "4": "IV"}.get(m.group(1), m.group(1))
    for k in (main + (m.group(2) or ""), main):
        if k in user:
            return user[k], None
    if main in NSCLC_STAGE_MAP:
        return NSCLC_STAGE_MAP[main], None
    return None, f"stage IV: {raw!r} is outside the paper's classes I/II/III (a stage_map such as {{'IV': 3}} keeps it)"


def _keeps_locale(fn):
    """Restore the process locale after ``fn``: GDCM (SimpleITK's DICOM reader) switches it to "C", after which
    Python's default text encoding is ASCII and any later ``open()`` of a UTF-8 file in the process fails."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = locale.setlocale(locale.LC_ALL, None)
        try:
            return fn(*args, **kwargs)
        finally:
            locale.setlocale(locale.LC_ALL, saved)

    return wrapper


@_keeps_locale
def dicom_series(folder: Path) -> list[tuple[str, str, list[str]]]:
    """Every DICOM series under ``folder`` (recursively) as (series UID, modality, files)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    found = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns for every folder without DICOM files
    try:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            if not any(not f.startswith(".") for f in filenames):
                continue
            for uid in reader.GetGDCMSeriesIDs(dirpath):
                files = list(reader.GetGDCMSeriesFileNames(dirpath, uid))
                info = sitk.ImageFileReader()
                info.SetFileName(files[0])
                modality = ""
                try:
                    info.ReadImageInformation()
                    modality = info.GetMetaData("0008|0060").strip() if info.HasMetaDataKey("0008|0060") else ""
                except RuntimeError:
                    modality = "unreadable"
                found.append((uid, modality.upper(), files))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    return found


@_keeps_locale
def read_dicom_ct(folder: Path):
    """The one CT series under ``folder`` as a SimpleITK image (HU: GDCM applies the rescale slope/intercept)."""
    import SimpleITK as sitk

    series = dicom_series(folder)
    ct = [s for s in series if s[1] in ("CT", "")]
    if not ct:
        found = ", ".join(sorted({s[1] or "?" for s in series})) or "no DICOM files"
        raise ValueError(f"no CT series in DICOM folder {folder} (found: {found})")
    if len(ct) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, _, files in ct)
        raise ValueError(f"{len(ct)} CT series in DICOM folder {folder}: {listing}; keep one per patient")
    uid, _, files = ct[0]
    if len(files) < 2:
        raise ValueError(f"CT series {uid} in {folder} has a single slice, not a volume")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _convert_to_nifti(source: Path, target: Path) -> Path:
    """DICOM folder / MHA / MHD -> NIfTI with SimpleITK, once (reused while newer than its sources)."""
    import SimpleITK as sitk

    sources = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    if sources and _newer(target, sources):
        return target
    image = read_dicom_ct(source) if source.is_dir() else sitk.ReadImage(str(source))
    _atomic_volume_write(lambda tmp: sitk.WriteImage(image, tmp, useCompression=True), target)
    return target


def _index(folder: Path, skip: Path) -> list[Path]:
    """Volume files and folders directly in ``folder`` (not hidden ones, nor the builder's own output folder)."""
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or _volume_ext(p.name)) and p.resolve() != skip.resolve()
    )


def _entries_for(entries: Sequence[Path], case_id: str) -> list[Path]:
    """Entries named ``<id>`` or ``<id>_<anything>`` (ids hold '-', so only '_' separates a suffix)."""
    return [p for p in entries if _stem(p) == case_id or _stem(p).startswith(case_id + "_")]


def _matches(path: Path, pattern: str) -> bool:
    return fnmatch.fnmatch(path.name.lower(), pattern.lower())


def _rtstruct_hint(where: Path) -> str:
    return (
        f"DICOM mask: {where} is DICOM (RTSTRUCT/SEG), which the bundle does not read; convert the GTV to NIfTI or NRRD "
        "on the CT grid first (e.g. dcmrtstruct2nii or plastimatch convert) and point --masks at those files"
    )


def _pick_ct(entries: list[Path], case_id: str, folder: Path, mask_pattern: str) -> tuple[Path | None, str | None]:
    cands = _entries_for(entries, case_id)
    if len(cands) > 1:  # images and masks side by side (lung1_image.nrrd, lung1_label.nrrd)
        cands = [p for p in cands if not _matches(p, mask_pattern)]
    if not cands:
        return None, f"no CT: expected {case_id}.nii.gz / .nii / .nrrd / .mha or a DICOM folder {case_id}/ in {folder}"
    if len(cands) > 1:
        return None, f"several CTs: {', '.join(p.name for p in cands)} in {folder}"
    return cands[0], None


def _pick_mask(entries: list[Path], case_id: str, folder: Path, pattern: str) -> tuple[Path | None, str | None]:
    cands = _entries_for(entries, case_id)
    if len(cands) > 1:
        cands = [p for p in cands if _matches(p, pattern)]
    if len(cands) == 1 and cands[0].is_dir():  # a per-patient folder (dcmrtstruct2nii writes mask_GTV-1.nii.gz)
        inside = sorted(p for p in cands[0].rglob("*") if p.is_file() and not p.name.startswith("."))
        vols = [p for p in inside if _volume_ext(p.name) in (*DIRECT_EXT, *CONVERT_EXT) and _matches(p, pattern)]
        if not vols:
            if any(_volume_ext(p.name) in DICOM_EXT or "." not in p.name for p in inside):
                return None, _rtstruct_hint(cands[0])
            return None, f"no mask: no file matching {pattern!r} in {cands[0]}"
        cands = vols
    if not cands:
        return (
            None,
            f"no mask: expected {case_id}.nii.gz / .nrrd, {case_id}_<name>.nii.gz or a folder {case_id}/ in {folder}",
        )
    if len(cands) > 1:
        return None, (
            f"several masks: {', '.join(p.name for p in cands)} match {pattern!r}; "
            "pass --mask_pattern to pick one (e.g. '*GTV-1*')"
        )
    if _volume_ext(cands[0].name) in DICOM_EXT:
        return None, _rtstruct_hint(cands[0])
    return cands[0], None


def _is_nifti(path: Path) -> bool:
    return path.is_file() and _volume_ext(path.name) in NIFTI_EXT


def _usable(path: Path, target: Path, to_nifti: bool = False) -> Path:
    """The file itself when the bundle reads it directly (and ``to_nifti`` does not ask for NIfTI), else its
    NIfTI conversion."""
    if path.is_file() and _volume_ext(path.name) in DIRECT_EXT and (_is_nifti(path) or not to_nifti):
        return path
    return _convert_to_nifti(path, target)


def build_nsclc_datalist(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    clinical: str | os.PathLike,
    out: str | os.PathLike,
    id_column: str = "PatientID",
    stage_column: str = "Overall.Stage",
    stage_map: Mapping[str, int] | None = None,
    mask_pattern: str = "*gtv*",
    validate: bool = True,
    files_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write an NSCLC-Radiomics datalist to ``out`` (a .json path), labels I/II/III -> 1/2/3; returns ``out``.

    Patients come from the clinical table; each needs a CT in ``images`` and a mask in ``masks`` (matching rules
    in the module docstring). DICOM/MHA inputs are converted to NIfTI under ``files_dir`` (default
    ``<datalist folder>/<datalist stem>_files``). Files in ``images``/``masks`` that match no patient of the table
    are reported as excluded too.
    """
    images, masks = Path(images), Path(masks)
    for what, folder in (("images", images), ("masks", masks)):
        if not folder.is_dir():
            raise FileNotFoundError(f"nsclc: {what} folder not found: {folder}")
    out, stem = _datalist_path(out, "nsclc")
    files_dir = Path(files_dir) if files_dir else out.parent / f"{stem}_files"
    columns, rows = read_table(clinical)
    i_col = find_column(columns, id_column, clinical, "; pass --id_column NAME")
    s_col = find_column(columns, stage_column, clinical, "; pass --stage_column NAME")
    excluded: list[Excluded] = []
    ids = [r[i_col] for r in rows]
    for n, r in enumerate(rows, start=2):
        if not r[i_col]:
            excluded.append(Excluded(f"row {n}", f"no id: empty {i_col!r} in row {n} of {clinical}"))
    dupes = _duplicates(i for i in ids if i)
    img_entries, mask_entries = _index(images, files_dir), _index(masks, files_dir)
    items, reported = [], set()
    for row in rows:
        cid = row[i_col]
        if not cid:
            continue
        if cid in dupes:
            if cid not in reported:
                excluded.append(Excluded(cid, f"duplicate id: {dupes[cid]} rows in {clinical}"))
                reported.add(cid)
            continue
        problems = []
        label, why = parse_stage(row[s_col], stage_map)
        if why:
            problems.append(f"{why} in column {s_col!r} of {clinical}")
        ct, why = _pick_ct(img_entries, cid, images, mask_pattern)
        if why:
            problems.append(why)
        mask, why = _pick_mask(mask_entries, cid, masks, mask_pattern)
        if why:
            problems.append(why)
        if problems:
            excluded.append(Excluded(cid, "; ".join(problems)))
            continue
        try:
            # a NIfTI next to a NRRD is converted too: one format per case keeps the geometry check exact
            # (world coordinates are RAS in NIfTI and LPS in NRRD/DICOM readers)
            mixed = _is_nifti(ct) != _is_nifti(mask)
            ct_file = _usable(ct, files_dir / "ct" / f"{cid}.nii.gz", to_nifti=mixed)
            mask_file = _usable(mask, files_dir / "masks" / f"{cid}_mask.nii.gz", to_nifti=mixed)
        except (ValueError, RuntimeError) as e:
            excluded.append(Excluded(cid, f"conversion failed: {e}"))
            continue
        items.append({"id": cid, "image": str(ct_file), "mask": str(mask_file), "label": label, "stage": row[s_col]})
    known = set(ids)
    stray: dict[str, list[str]] = defaultdict(list)
    for p in dict.fromkeys([*img_entries, *mask_entries]):  # once, also when images and masks are one folder
        stem_ = _stem(p)
        if not any(stem_ == k or stem_.startswith(k + "_") for k in known):
            stray[stem_.split("_")[0]].append(str(p))
    for guess, paths in sorted(stray.items()):
        excluded.append(
            Excluded(guess, f"not in the clinical table: {', '.join(paths)} match no {i_col!r} of {clinical}")
        )
    label_map = dict(NSCLC_LABEL_MAP)
    for value in sorted({int(v) for v in (stage_map or {}).values()} - {1, 2, 3}):
        label_map[str(value)] = str(value)
    meta = {
        "name": "NSCLC-Radiomics",
        "description": "built by scripts.data.cohorts.build_nsclc_datalist; 'excluded' lists every patient left out",
        "source": {
            "images": str(images.resolve()),
            "masks": str(masks.resolve()),
            "clinical": str(Path(clinical).resolve()),
            "id_column": i_col,
            "stage_column": s_col,
            "stage_map": dict(stage_map or {}),
            "mask_pattern": mask_pattern,
        },
        "label_map": label_map,
    }
    return _finish(out, items, excluded, meta, validate, log)


# ----------------------------------------------------------------------------------------- profiles and summary


def profile_datalist(profile: str) -> str:
    """The datalist a real-cohort profile trains on: ``--datalist`` replaces this; else ``$SIAM3D_DATALIST``."""
    path = os.environ.get("SIAM3D_DATALIST")
    if not path:
        raise ValueError(
            f"the {profile} profile needs a datalist: pass --datalist PATH (build one with "
            f"`python -m scripts.data.build_cohort {profile} ...`) or set SIAM3D_DATALIST"
        )
    return path


def image_channels(datalist: str | os.PathLike) -> int:
    """Channels of the datalist's images (a list of files = one channel each): the encoder's ``in_channels``.

    Lets one profile serve a 4-modality and a FLAIR-only BraTS datalist; mixed counts are an error naming cases.
    """
    doc = read_datalist_doc(datalist)
    counts: dict[int, list[str]] = defaultdict(list)
    for section in SECTIONS:
        for i, item in enumerate(doc.get(section, [])):
            img = item.get("image")
            counts[len(img) if isinstance(img, list) else 1].append(str(item.get("id", default_case_id(section, i))))
    if not counts:
        raise ValueError(f"datalist {datalist} has no cases")
    if len(counts) > 1:
        detail = "; ".join(
            f"{n} channel(s): {', '.join(ids[:3])}{'...' if len(ids) > 3 else ''}" for n, ids in counts.items()
        )
        raise ValueError(f"datalist {datalist} mixes image channel counts ({detail})")
    return next(iter(counts))


def cohort_table(
    items: Sequence[Mapping], label_map: Mapping | None = None, centres: Sequence[str] = CENTRES
) -> tuple[list[str], list[list]]:
    """(header, rows) of the class x centre counts with totals, like the paper's Table 1.

    Rows follow ``label_map``'s order (then other labels, then "unlabelled"); columns the ``centres`` order,
    then other centres alphabetically, "others"/"unknown" last. Without any centre there is only the total.
    """
    names = {str(k): str(v) for k, v in (label_map or {}).items()}
    labels = [str(it["label"]) if it.get("label") is not None else None for it in items]
    order = [k for k in names if k in labels] + sorted({lb for lb in labels if lb is not None} - set(names))
    if None in labels:
        order.append(None)
    has_centre = any(it.get("centre") for it in items)
    cents = [str(it.get("centre") or "unknown") for it in items] if has_centre else [""] * len(items)
    tail = ("others", "unknown")
    present = set(cents)
    cols = [c for c in centres if c in present] + sorted(present - set(centres) - set(tail) - {""})
    cols += [c for c in tail if c in present and c not in cols]
    counts = Counter(zip(labels, cents))
    header = ["class", *cols, "Total"]
    rows = []
    for lb in order:
        row = [counts[(lb, c)] for c in cols]
        rows.append(
            [names.get(lb, lb) if lb is not None else "unlabelled", *row, sum(counts[(lb, c)] for c in present)]
        )
    rows.append(["Total", *[sum(counts[(lb, c)] for lb in order) for c in cols], len(items)])
    return header, rows


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_paths(datalist: str | os.PathLike) -> dict[str, Path]:
    """Where the summary of ``<dir>/<stem>.json`` goes: ``<stem>_table.csv/.md`` and ``<stem>_excluded.csv``."""
    p = Path(datalist)
    return {
        "table_csv": p.with_name(f"{p.stem}_table.csv"),
        "table_md": p.with_name(f"{p.stem}_table.md"),
        "excluded": p.with_name(f"{p.stem}_excluded.csv"),
    }


def _csv_text(header: Sequence, rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_summary(doc: Mapping, datalist: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Print and write (atomically) the class x centre table and the excluded cases of a datalist document."""
    items = [it for s in SECTIONS for it in doc.get(s, [])]
    excluded = list(doc.get("excluded", []))
    header, rows = cohort_table(items, doc.get("label_map"), doc.get("centres") or CENTRES)
    paths = summary_paths(datalist)
    reasons = Counter(_reason_kind(e["reason"]) for e in excluded)
    md = [
        f"# {doc.get('name', 'Cohort')}: {len(items)} cases, {len(excluded)} excluded",
        "",
        markdown_table(header, rows),
    ]
    if excluded:
        md += ["", "Excluded, by reason:", ""] + [f"- {k}: {n}" for k, n in reasons.most_common()]
        md += ["", f"Every excluded case with its reason: {paths['excluded'].name}"]
    atomic_write_text(paths["table_csv"], _csv_text(header, rows))
    atomic_write_text(paths["table_md"], "\n".join(md) + "\n")
    atomic_write_text(paths["excluded"], _csv_text(["id", "reason"], ([e["id"], e["reason"]] for e in excluded)))
    log("\n".join(md[:3]))
    if excluded:
        log(f"\nExcluded ({len(excluded)}):")
        for e in excluded:
            log(f"  {e['id']}: {e['reason']}")
    log(f"\nwrote {paths['table_csv']}, {paths['table_md']}, {paths['excluded']}")
    return paths


def _reason_kind(reason: str) -> str:
    """The kind of a reason, for counting: every reason reads 'kind: detail' ('missing t1ce file', 'no stage'...)."""
    return reason.split(":", 1)[0].strip()


def summarise(datalist: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The summary of a datalist file (any datalist: BraTS, NSCLC, the demo cohort...)."""
    path = Path(datalist)
    return write_summary(read_datalist_doc(path), path, log)
