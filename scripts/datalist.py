"""MONAI datalists: loading with paths resolved against the datalist file, and a validator that reports every problem.

A datalist is ``{"training": [{"id", "image", "mask", "label"?, "centre"?}], "testing": [...]}`` where ``image``
is a path or a list of paths (one per channel, e.g. BraTS' four modalities). Relative paths are relative to the
datalist file, so a cohort folder can be moved or zipped with its datalist. A datalist is data: it is parsed as
JSON and never evaluated.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SECTIONS = ("training", "validation", "testing")
# Fewer lesion voxels have no meaningful shape or texture (pyradiomics refuses a single voxel); scripts.radiomics
# skips such cases with the same threshold.
MIN_MASK_VOXELS = 8
# Largest difference between image and mask affine entries (mm, direction cosines) still read as the same grid.
AFFINE_TOL = 1e-3
AXES = "xyz"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one case; ``str()`` is the line the validator prints."""

    case_id: str
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.case_id}\t{self.file or '-'}\t{self.problem}"


def _resolve(path: str, base: Path, data_root: Path | None) -> str:
    p = Path(os.path.expanduser(path))
    p = (p if p.is_absolute() else base / p).resolve()
    if data_root is not None and not p.is_relative_to(data_root):
        raise ValueError(f"path {path!r} resolves to {p}, outside the configured data root {data_root}")
    return str(p)


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    data_root: str | os.PathLike | None = None,
    check_ids: bool = True,
) -> list[dict]:
    """Items of one section with ``image``/``mask`` paths made absolute (relative to the datalist file).

    ``data_root``, when given, confines every path: one that escapes it (``..``, an absolute path, a symlink
    pointing outside) is an error, so an untrusted datalist cannot make the bundle read arbitrary files.
    A duplicate case id is an error unless ``check_ids`` is False (the validator reports it instead).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if section not in doc:
        raise KeyError(f"datalist {path} has no {section!r} section (has: {sorted(doc)})")
    base = path.parent.resolve()
    root = Path(data_root).resolve() if data_root else None
    items = []
    for i, raw in enumerate(doc[section]):
        if not isinstance(raw, dict):
            raise ValueError(f"datalist {path}: {section}[{i}] is not an object")
        item = dict(raw)
        item.setdefault("id", f"{section}_{i:04d}")
        item["id"] = str(item["id"])
        for key in ("image", "mask"):
            if key in item:
                val = item[key]
                item[key] = (
                    [_resolve(v, base, root) for v in val] if isinstance(val, list) else _resolve(val, base, root)
                )
        items.append(item)
    if check_ids:
        _check_unique_ids(items, f"datalist {path} section {section!r}")
    return items


def _check_unique_ids(items: list[dict], where: str) -> None:
    """Two cases with one id would share a cache entry, a feature-table row and a label: refuse before any work."""
    counts = Counter(str(it["id"]) for it in items)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:20]) + (f" ... and {len(dupes) - 20} more" if len(dupes) > 20 else "")
        raise ValueError(f"{where}: duplicate case ids {shown}; every case needs its own id")


def labelled_ids(path: str | os.PathLike, sections: tuple[str, ...] = ("training",)) -> dict[str, object]:
    """``{case id: label}`` for the labelled cases of a datalist (evaluation reads labels only from here)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out: dict[str, object] = {}
    for section in sections:
        for i, item in enumerate(doc.get(section, [])):
            if "label" in item:
                out[str(item.get("id", f"{section}_{i:04d}"))] = item["label"]
    return out


def lesion_border_sides(mask: np.ndarray) -> list[str]:
    """Faces of the volume the lesion touches, e.g. ``["x-", "z+"]`` (spatial axes of a [X, Y, Z] mask).

    A lesion on the border may continue outside the field of view: its crop is padded and its shape features
    describe only the visible part. Empty list when the lesion is inside (or the mask is empty).
    """
    mask = np.asarray(mask) != 0
    sides = []
    for axis in range(mask.ndim):
        first = np.take(mask, 0, axis=axis)
        last = np.take(mask, mask.shape[axis] - 1, axis=axis)
        name = AXES[axis] if axis < len(AXES) else str(axis)
        if first.any():
            sides.append(f"{name}-")
        if last.any():
            sides.append(f"{name}+")
    return sides


def read_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(array in x,y,z order, 4x4 RAS-ish affine) with nibabel for NIfTI and SimpleITK for NRRD/MHA/others."""
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    arr = np.transpose(sitk.GetArrayFromImage(img), tuple(range(img.GetDimension()))[::-1])
    direction = np.asarray(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())
    affine = np.eye(4)
    d = min(3, img.GetDimension())
    affine[:d, :d] = (direction * np.asarray(img.GetSpacing()))[:d, :d]
    affine[:d, 3] = np.asarray(img.GetOrigin())[:d]
    affine[:2] *= -1  # ITK's world frame is LPS, nibabel's RAS: flip x and y so NIfTI and NRRD pairs compare
    return arr, affine


def _check_volume(case_id: str, path: str, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray] | None:
    if not Path(path).is_file():
        problems.append(Problem(case_id, path, "missing file"))
        return None
    try:
        arr, affine = read_volume(path)
        arr = np.asarray(arr)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        problems.append(Problem(case_id, path, f"unreadable image ({type(e).__name__}: {e})"))
        return None
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        problems.append(Problem(case_id, path, f"expected a 3D volume, got {arr.ndim}D with shape {arr.shape}"))
        return None
    return arr, affine


def validate_items(
    items: list[dict],
    label_map: dict | None = None,
    affine_tol: float = AFFINE_TOL,
    check_finite: bool = True,
    min_mask_voxels: int = MIN_MASK_VOXELS,
) -> list[Problem]:
    """Every problem of every case: missing/unreadable files, duplicate ids, geometry mismatches, empty or tiny
    masks, NaN/Inf voxels and labels outside ``label_map`` (keys are the allowed label values, as strings or ints).

    A lesion touching the volume border is not a problem here: it is kept and flagged where it is cropped
    (``TumourBoxd``) and described (radiomics), see :func:`lesion_border_sides`.
    """
    problems: list[Problem] = []
    counts = Counter(str(it.get("id")) for it in items)
    for case_id, n in counts.items():
        if n > 1:
            problems.append(Problem(case_id, "", f"duplicate case id ({n} entries)"))
    allowed = {str(k) for k in label_map} if label_map else None
    for item in items:
        case_id = str(item.get("id"))
        if "image" not in item or "mask" not in item:
            missing = [k for k in ("image", "mask") if k not in item]
            problems.append(Problem(case_id, "", f"datalist entry lacks {missing}"))
            continue
        if allowed is not None and "label" in item and str(item["label"]) not in allowed:
            problems.append(Problem(case_id, "", f"label {item['label']!r} not in the label map {sorted(allowed)}"))
        image_paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
        images = [(p, _check_volume(case_id, p, problems)) for p in image_paths]
        mask = _check_volume(case_id, item["mask"], problems)
        for p, vol in images:
            if vol is None:
                continue
            arr, affine = vol
            if check_finite and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                problems.append(Problem(case_id, p, f"{int((~np.isfinite(arr)).sum())} non-finite (NaN/Inf) voxels"))
            if mask is None:
                continue
            if arr.shape != mask[0].shape:
                problems.append(Problem(case_id, p, f"image shape {arr.shape} != mask shape {mask[0].shape}"))
            elif not np.allclose(affine, mask[1], atol=affine_tol):
                diff = float(np.abs(affine - mask[1]).max())
                problems.append(
                    Problem(case_id, p, f"image/mask affine mismatch (max difference {diff:.4g} > {affine_tol})")
                )
        if mask is not None:
            n_lesion = int(np.count_nonzero(mask[0]))
            if n_lesion == 0:
                problems.append(Problem(case_id, item["mask"], "empty mask (no lesion voxels)"))
            elif n_lesion < min_mask_voxels:
                problems.append(
                    Problem(
                        case_id,
                        item["mask"],
                        f"mask has only {n_lesion} lesion voxel(s), fewer than {min_mask_voxels}: too small for shape "
                        "and texture features (radiomics skips it); check the segmentation",
                    )
                )
    return problems


def validate_datalist(
    path: str | os.PathLike,
    label_map: dict | None = None,
    sections: tuple[str, ...] = SECTIONS,
    data_root: str | os.PathLike | None = None,
) -> list[Problem]:
    """Validate every section present in the datalist file; ids must be unique across sections."""
    return validate_items(_load_sections(path, sections, data_root), label_map=label_map)


def load_sections(
    path: str | os.PathLike,
    sections: tuple[str, ...] = ("training", "testing"),
    data_root: str | os.PathLike | None = None,
) -> list[dict]:
    """Items of every listed section present in the datalist (missing sections are skipped), in file order.

    Ids must be unique across the sections too: inference and radiomics write one table row per id.
    """
    items = _load_sections(path, sections, data_root)
    _check_unique_ids(items, f"datalist {path} sections {list(sections)}")
    return items


def _load_sections(
    path: str | os.PathLike, sections: tuple[str, ...], data_root: str | os.PathLike | None = None
) -> list[dict]:
    """``load_sections`` without the duplicate-id check: the validator reports duplicates with everything else."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return [item for s in sections if s in doc for item in load_datalist(path, s, data_root, check_ids=False)]


def check_datalist(
    path: str | os.PathLike,
    label_map: dict | None = None,
    sections: tuple[str, ...] = SECTIONS,
    data_root: str | os.PathLike | None = None,
    max_lines: int = 50,
) -> int:
    """Pre-flight for a workflow: raise one ``ValueError`` listing every problem of the datalist, else return the
    number of cases. Reads every volume once, so a bad case stops the run before the first epoch, not in it."""
    items = _load_sections(path, sections, data_root)
    problems = validate_items(items, label_map=label_map)
    if problems:
        lines = [str(p) for p in problems[:max_lines]]
        if len(problems) > max_lines:
            lines.append(f"... and {len(problems) - max_lines} more")
        n_cases = len({p.case_id for p in problems})
        raise ValueError(
            f"datalist {path}: {len(problems)} problem(s) in {n_cases} case(s) (case id, file, problem):\n"
            + "\n".join(lines)
            + f"\nFix or remove these cases; `python -m scripts.datasets validate {path}` lists them again."
        )
    return len(items)
