"""Validation of a datalist before any work: every case's files read once, every problem named with its case and file.

``validate_items`` checks each case (files, volumes, grids, the lesion-mask rule, labels, duplicate files) and
returns ``Problem`` rows; ``validate_datalist`` does it for a datalist file, ``check_datalist`` raises one error
listing them (a workflow's pre-flight), and ``python -m scripts.data.build_cohort validate`` prints them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from scripts.data.datalist import SECTIONS, Problem, _describe_sections, _load_sections, check_labels, read_datalist_doc
from scripts.data.lesion_mask import MIN_MASK_VOXELS, empty_mask_reason, lesion_mask
from scripts.data.volumes import (
    AFFINE_TOL,
    affine_problem,
    file_problem,
    float32_overflow,
    grid_match,
    read_volume,
    volume_shape_problem,
)
from scripts.io_utils import sha256_file


def _check_volume(case_id: str, path: str, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray] | None:
    """(array [X, Y, Z], affine) of one file, or None with its problem appended: the file, its shape, its affine."""
    problem = file_problem(path)
    if problem:
        problems.append(Problem(case_id, path, problem))
        return None
    try:
        arr, affine = read_volume(path)
        arr = np.asarray(arr)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        problems.append(Problem(case_id, path, f"unreadable image ({type(e).__name__}: {e})"))
        return None
    problem = volume_shape_problem(arr.shape) or affine_problem(affine)
    if problem:
        problems.append(Problem(case_id, path, problem))
        return None
    return (arr[..., 0] if arr.ndim == 4 else arr), affine


def validate_items(
    items: list[dict],
    label_map: dict | None = None,
    affine_tol: float = AFFINE_TOL,
    check_finite: bool = True,
    min_mask_voxels: int = MIN_MASK_VOXELS,
    on_lesion: Callable[[dict, np.ndarray, np.ndarray], None] | None = None,
) -> list[Problem]:
    """Every problem of every case: missing/unreadable files, duplicate ids, geometry mismatches, empty or tiny
    masks, NaN/Inf voxels and labels outside ``label_map`` (keys are the allowed label values, as strings or ints).

    A lesion touching the volume border is not a problem here: it is kept and flagged where it is cropped
    (``TumourBoxd``) and described (radiomics), see :func:`lesion_border_sides`. Nor is what the tumour box will do
    to a lesion: ``on_lesion(item, lesion, mask_affine)`` is called for each usable case with the mask already read
    here (``scripts.data.geometry.collect`` records the box's geometry per case, for ``build_cohort validate``).
    """
    problems: list[Problem] = []
    counts = Counter(str(it.get("id")) for it in items)
    for case_id, n in counts.items():
        if n > 1:
            problems.append(Problem(case_id, "", f"duplicate case id ({n} entries)"))
    allowed = {str(k) for k in label_map} if label_map else None
    problems.extend(check_labels(items, "the datalist"))
    for item in items:
        case_id = str(item.get("id"))
        if "image" not in item or "mask" not in item:
            missing = [k for k in ("image", "mask") if k not in item]
            problems.append(Problem(case_id, "", f"datalist entry lacks {missing}"))
            continue
        if allowed is not None and item.get("label") is not None and str(item["label"]) not in allowed:
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
            overflow = float32_overflow(arr) if check_finite else None
            if overflow:
                problems.append(Problem(case_id, p, overflow))
            if mask is None:
                continue
            if grid_match(affine, arr.shape, mask[1], mask[0].shape, affine_tol) is None:
                if arr.shape != mask[0].shape:
                    problems.append(Problem(case_id, p, f"image shape {arr.shape} != mask shape {mask[0].shape}"))
                else:
                    diff = float(np.abs(affine - mask[1]).max())
                    problems.append(
                        Problem(case_id, p, f"image/mask affine mismatch (max difference {diff:.4g} > {affine_tol})")
                    )
        if mask is not None:
            try:
                lesion, _ = lesion_mask(mask[0])
            except ValueError as e:
                problems.append(Problem(case_id, item["mask"], str(e)))
                continue
            n_lesion = int(np.count_nonzero(lesion))
            if n_lesion == 0:
                problems.append(Problem(case_id, item["mask"], empty_mask_reason(mask[0])))
            elif n_lesion < min_mask_voxels:
                problems.append(
                    Problem(
                        case_id,
                        item["mask"],
                        f"mask has only {n_lesion} lesion voxel(s), fewer than {min_mask_voxels}: too small for shape "
                        "and texture features (radiomics skips it); check the segmentation",
                    )
                )
            elif on_lesion is not None:
                on_lesion(item, lesion, mask[1])
    problems.extend(duplicate_files(items))
    return problems


def duplicate_files(items: Sequence[Mapping]) -> list[Problem]:
    """Entries whose image and mask are the same files (the same real path, or the same bytes at another path) under
    different ids: one lesion listed twice would sit in a training and a test fold at once (a leak) and count twice.
    Files are hashed only where sizes coincide, so a clean cohort costs one ``stat`` per file."""
    by_path: dict[tuple[str, ...], list[Mapping]] = {}
    for item in items:
        if "image" not in item or "mask" not in item:
            continue
        files = [*(item["image"] if isinstance(item["image"], list) else [item["image"]]), item["mask"]]
        if any(not isinstance(f, str) or file_problem(f) for f in files):
            continue
        by_path.setdefault(tuple(os.path.realpath(f) for f in files), []).append(item)
    by_size: dict[tuple[int, ...], list[tuple[str, ...]]] = {}
    for key in by_path:
        by_size.setdefault(tuple(os.path.getsize(f) for f in key), []).append(key)
    groups = [(entries, "the same paths") for entries in by_path.values() if len(entries) > 1]
    for keys in by_size.values():
        by_content: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for key in keys if len(keys) > 1 else []:
            by_content.setdefault(tuple(sha256_file(f) for f in key), []).append(key)
        for same in by_content.values():
            if len(same) > 1:
                groups.append(([it for key in same for it in by_path[key]], "identical content at different paths"))
    problems = []
    for entries, how in groups:
        for item in entries:
            case_id = str(item.get("id"))
            others = sorted({str(o.get("id")) for o in entries} - {case_id})
            if not others:  # the same id twice: reported as a duplicate case id
                continue
            labels = {str(o.get("label")) for o in entries}
            problems.append(
                Problem(
                    case_id,
                    str(item["mask"]),
                    f"same image and mask files as case(s) {', '.join(repr(o) for o in others)} ({how}"
                    f"{', with different labels' if len(labels) > 1 else ''}): one lesion listed twice would sit in "
                    "a training and a test fold at once (a leak); keep one entry",
                )
            )
    return problems


def validate_datalist(
    path: str | os.PathLike,
    label_map: dict | None = None,
    sections: tuple[str, ...] = SECTIONS,
    data_root: str | os.PathLike | None = None,
    **box,
) -> list[Problem]:
    """Validate every section present in the datalist file; ids must be unique across sections. A file that is
    not a datalist (not JSON, a list, no case in any section) is one problem naming the file. ``box``: the
    ``on_lesion`` callback of :func:`validate_items` (the tumour box's record per case)."""
    try:
        doc = read_datalist_doc(path)
        items = _load_sections(path, sections, data_root, doc=doc)
    except ValueError as e:
        return [Problem("-", str(path), str(e))]
    if not items:
        return [
            Problem("-", str(path), f"no cases in sections {list(sections)} (the file has {_describe_sections(doc)})")
        ]
    return validate_items(items, label_map=label_map, **box)


def check_datalist(
    path: str | os.PathLike,
    label_map: dict | None = None,
    sections: tuple[str, ...] = SECTIONS,
    data_root: str | os.PathLike | None = None,
    max_lines: int = 50,
) -> int:
    """Pre-flight for a workflow: raise one ``ValueError`` listing every problem of the datalist, else return the
    number of cases. Reads every volume once, so a bad case stops the run before the first epoch, not in it."""
    problems = validate_datalist(path, label_map=label_map, sections=sections, data_root=data_root)
    items = _load_sections(path, sections, data_root) if not problems else []
    if problems:
        lines = [str(p) for p in problems[:max_lines]]
        if len(problems) > max_lines:
            lines.append(f"... and {len(problems) - max_lines} more")
        n_cases = len({p.case_id for p in problems})
        raise ValueError(
            f"datalist {path}: {len(problems)} problem(s) in {n_cases} case(s) (case id, file, problem):\n"
            + "\n".join(lines)
            + f"\nFix or remove these cases; `python -m scripts.data.build_cohort validate {path}` lists them again."
        )
    return len(items)
