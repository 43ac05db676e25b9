"""NSCLC-Radiomics -> a validated datalist (``build_nsclc_datalist``): CT as NIfTI/NRRD/MHA or a DICOM series,
GTV masks, ``Overall.Stage`` parsed leniently; see ``scripts.data.cohorts``.
"""

from __future__ import annotations

import fnmatch
import functools
import locale
import os
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scripts.data.cohorts.common import (
    CONVERT_EXT,
    DICOM_EXT,
    DIRECT_EXT,
    MISSING,
    NIFTI_EXT,
    NSCLC_LABEL_MAP,
    NSCLC_STAGE_MAP,
    Excluded,
    _atomic_volume_write,
    _datalist_path,
    _duplicates,
    _newer,
    _stem,
    _volume_ext,
    find_column,
    read_table,
)
from scripts.data.cohorts.summary import _finish


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
