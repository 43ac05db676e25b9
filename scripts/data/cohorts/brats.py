"""BraTS (2018-2021 layouts) -> a validated datalist (``build_brats_datalist``); see ``scripts.data.cohorts``."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from scripts.data.cohorts.common import (
    BRATS_GRADE_MAP,
    CENTRES,
    MISSING,
    MODALITIES,
    MODALITY_ALIASES,
    NIFTI_EXT,
    Excluded,
    _atomic_volume_write,
    _datalist_path,
    _newer,
    find_column,
    read_table,
)
from scripts.data.cohorts.summary import _finish


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
