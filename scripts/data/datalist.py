"""MONAI datalists: loading with paths resolved against the datalist file, and a validator that reports every problem.

A datalist is ``{"training": [{"id", "image", "mask", "label"?, "centre"?}], "testing": [...]}`` where ``image``
is a path or a list of paths (one per channel, e.g. BraTS' four modalities). Relative paths are relative to the
datalist file (the real file, when the datalist is reached through a symlink), so a cohort folder can be moved or
zipped with its datalist. A datalist is data: it is parsed as JSON and never evaluated.

The checks of one volume file (:func:`file_problem`, :func:`volume_shape_problem`, :func:`affine_problem`,
:func:`float32_overflow`) and of one mask (:func:`lesion_mask`, :func:`empty_mask_reason`) live here, once, in the
words every entry point uses: the validator, training's loader (``scripts.data.transforms``) and radiomics.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.io_utils import sha256_file

SECTIONS = ("training", "validation", "testing")
# Fewer lesion voxels have no meaningful shape or texture (pyradiomics refuses a single voxel); scripts.downstream.radiomics
# skips such cases with the same threshold.
MIN_MASK_VOXELS = 8
# Largest difference between image and mask affine entries (mm, direction cosines) still read as the same grid.
AFFINE_TOL = 1e-3
AXES = "xyz"
# Larger integers are not class labels (a typo, an exponent); they also overflow int64 collation and JSON readers.
MAX_LABEL = 2**31 - 1
# A soft (probability) mask's lesion is value >= SOFT_THRESHOLD.
SOFT_THRESHOLD = 0.5
# More distinct nonzero values than this is an intensity image, not a label mask (BraTS has 3 labels, an instance mask
# of metastases a few dozen; a CT or MR intensity image hundreds to thousands).
MAX_MASK_LABELS = 64
# Every volume is computed in float32 (MONAI's loader casts to it): larger magnitudes would become Inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FOLDER_HINT = (
    "is a folder (a DICOM series?): convert it with `python -m scripts.data.build_cohort nsclc` (which reads one "
    "DICOM series folder per patient) or give a NIfTI/NRRD file"
)
ONE_VOLUME_HINT = (
    "one file must hold one 3D volume: list one file per image channel "
    '("image": ["c0.nii.gz", "c1.nii.gz"]) and give a single 3D label volume as the mask'
)


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


def read_datalist_doc(path: str | os.PathLike) -> dict:
    """The datalist file as a dict of sections, or a ``ValueError`` naming the file and what is wrong with it.

    Accepts a UTF-8 byte-order mark (Windows editors add one). The top level must be a JSON object; each of
    ``training`` / ``validation`` / ``testing`` may be absent (= empty) but, when present, must be a list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"datalist {path} is not UTF-8 text ({e})") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(doc, dict):
        raise ValueError(
            f"datalist {path}: the top level is a JSON {type(doc).__name__}, expected an object "
            f'{{"training": [...], "validation": [...], "testing": [...]}}'
        )
    for section in SECTIONS:
        if section in doc and not isinstance(doc[section], list):
            raise ValueError(
                f"datalist {path}: section {section!r} is a JSON {type(doc[section]).__name__}, expected a list of cases"
            )
    return doc


def _describe_sections(doc: dict) -> str:
    present = [f"{s} ({len(doc[s])} cases)" for s in SECTIONS if s in doc]
    other = sorted(k for k in doc if k not in SECTIONS)
    text = ", ".join(present) or "no training/validation/testing section"
    return text + (f"; other keys {other}" if other else "")


def check_labels(items: list[dict], where: str) -> list[Problem]:
    """Problems with class labels: a label must be an integer or a string (``null`` or absent = unlabelled), and
    one cohort must not mix strings and numbers ("0" and 0 would be two classes in one place and one in another).

    An integral float (``1.0``) is accepted as that integer (see :func:`normalise_label`).
    """
    problems = []
    kinds: dict[str, list[str]] = {"string": [], "number": []}
    for item in items:
        case_id = str(item.get("id"))
        if item.get("label") is None:
            continue
        value = item["label"]
        try:
            value = normalise_label(value)
        except ValueError as e:
            problems.append(Problem(case_id, "", str(e)))
            continue
        kinds["string" if isinstance(value, str) else "number"].append(case_id)
    if kinds["string"] and kinds["number"]:
        first_seen = {k: next(i for i, it in enumerate(items) if str(it.get("id")) == v[0]) for k, v in kinds.items()}
        # the rarer type is the odd one out; on a tie, the type that appears later in the file
        kind = max(kinds, key=lambda k: (-len(kinds[k]), first_seen[k]))
        other = "number" if kind == "string" else "string"
        minority = kinds[kind]
        for case_id in minority:
            problems.append(
                Problem(
                    case_id,
                    "",
                    f"label is a {kind} while {len(kinds[other])} other case(s) in {where} have {other} labels "
                    f"(e.g. {kinds[other][0]!r}); use one type for every label",
                )
            )
    return problems


def normalise_label(value):
    """A class label as used everywhere: int or str; an integral float becomes an int; anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"label {value!r} is a {type(value).__name__}: a class label must be an integer or a string")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer() and abs(value) <= MAX_LABEL):
            raise ValueError(
                f"label {value!r} is not a class label (an integer with |label| <= {MAX_LABEL}, or a string)"
            )
        return int(value)
    if isinstance(value, int) and abs(value) > MAX_LABEL:
        raise ValueError(f"label {value!r} is out of range for a class label (|label| <= {MAX_LABEL})")
    return value


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    data_root: str | os.PathLike | None = None,
    check_ids: bool = True,
    labels: str = "keep",
    allow_empty: bool = False,
) -> list[dict]:
    """Items of one section with ``image``/``mask`` paths made absolute (relative to the datalist file).

    ``data_root``, when given, confines every path: one that escapes it (``..``, an absolute path, a symlink
    pointing outside) is an error, so an untrusted datalist cannot make the bundle read arbitrary files.
    A duplicate case id is an error unless ``check_ids`` is False (the validator reports it instead).
    An absent section is empty; an empty result is an error naming the sections present unless ``allow_empty``.
    ``labels``: "keep" (``null`` labels removed: unlabelled), "drop" (no label key at all, for label-free
    inference) or "labelled" (only the labelled cases, e.g. for a label-using monitor). Bad labels are an error.
    """
    doc = read_datalist_doc(path)
    items = section_items(doc, Path(path), section, data_root, labels)
    if check_ids:
        _check_unique_ids(items, f"datalist {path} section {section!r}")
    if not items and not allow_empty:
        raise ValueError(f"datalist {path}: no cases in section {section!r} (the file has {_describe_sections(doc)})")
    return items


def section_items(
    doc: dict, path: Path, section: str, data_root: str | os.PathLike | None, labels: str = "keep", strict: bool = True
) -> list[dict]:
    """Items of one section, paths resolved; ``strict`` (loaders) raises on a bad label, otherwise (the validator)
    labels are left for :func:`validate_items` to report with everything else. A missing image or mask is left to
    the step that needs it (radiomics records it as the case's failure, training names the case; an id-only use
    such as merging table parts needs neither)."""
    if labels not in ("keep", "drop", "labelled"):
        raise ValueError(f"labels must be 'keep', 'drop' or 'labelled', got {labels!r}")
    base = datalist_base(path)
    root = Path(data_root).resolve() if data_root else None
    items = []
    for i, raw in enumerate(doc.get(section, [])):
        if not isinstance(raw, dict):
            raise ValueError(f"datalist {path}: {section}[{i}] is a JSON {type(raw).__name__}, not an object")
        item = dict(raw)
        item.setdefault("id", default_case_id(section, i))
        if isinstance(item["id"], (dict, list)) or item["id"] is None:
            raise ValueError(f"datalist {path}: {section}[{i}] has id {item['id']!r}; an id must be a string")
        item["id"] = str(item["id"])
        for key in ("image", "mask"):
            if key in item:
                val = item[key]
                ok = isinstance(val, str) or (isinstance(val, list) and val and all(isinstance(v, str) for v in val))
                if not ok:
                    raise ValueError(
                        f"datalist {path}: case {item['id']!r}: {key!r} is {val!r}; expected a path (or a non-empty "
                        "list of paths for channels)"
                    )
                item[key] = (
                    [_resolve(v, base, root) for v in val] if isinstance(val, list) else _resolve(val, base, root)
                )
        if item.get("label", 0) is None:
            del item["label"]
        if labels == "drop":
            item.pop("label", None)
        elif labels == "labelled" and "label" not in item:
            continue
        items.append(item)
    if labels != "drop" and strict:
        problems = check_labels(items, f"section {section!r}")
        if problems:
            raise ValueError(f"datalist {path}: " + "; ".join(f"case {p.case_id!r}: {p.problem}" for p in problems))
        for item in items:
            if "label" in item:
                item["label"] = normalise_label(item["label"])
    return items


def datalist_base(path: str | os.PathLike) -> Path:
    """The folder relative paths of a datalist are resolved against: the folder of the real file, so a symlink to a
    datalist that lives next to its images (``ln -s /data/cohort/datalist.json .``) finds them, as the datalist's
    author wrote them; the link's own folder is never used."""
    return Path(path).resolve().parent


def _check_unique_ids(items: list[dict], where: str) -> None:
    """Two cases with one id would share a cache entry, a feature-table row and a label: refuse before any work."""
    counts = Counter(str(it["id"]) for it in items)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:20]) + (f" ... and {len(dupes) - 20} more" if len(dupes) > 20 else "")
        raise ValueError(f"{where}: duplicate case ids {shown}; every case needs its own id")


# ------------------------------------------------------------------------------------------------ one volume file
def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as one volume file ("missing file", a name too long for the file system, a
    folder such as a DICOM series, no access), or None when it is a regular file. Never raises: a bad path is a
    problem of its case, not of the whole cohort."""
    name = os.fsencode(Path(path).name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return (
                f"file name too long ({len(name)} bytes; the file system allows {_name_max(path)} per name and "
                f"4096 per path): rename the file"
            )
        return f"cannot access the file ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return FOLDER_HINT
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, socket or pipe)"
    return None


def _name_max(path: str | os.PathLike) -> int:
    folder = Path(path).parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def volume_shape_problem(shape: Sequence[int]) -> str | None:
    """The array of one file must be one 3D volume, [X, Y, Z] or [X, Y, Z, 1]: a 4D file (two masks, or several
    image channels in one file) is refused everywhere rather than merged by one reader and refused by another."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
        return None
    problem = f"expected a 3D volume, got {len(shape)}D with shape {shape}"
    return f"{problem}: {ONE_VOLUME_HINT}" if len(shape) == 4 else problem


def affine_problem(affine) -> str | None:
    """A voxel-to-world matrix that does not describe a 3D grid: non-finite entries, a voxel axis of length 0 (a
    zero column of the sform/qform) or voxel axes that are (nearly) parallel. Reorientation, spacing and every
    millimetre would be undefined, so such a file is refused with its name rather than failing in a library."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return f"affine of shape {a.shape}, expected 4x4"
    if not np.isfinite(a).all():
        return "degenerate affine (NaN/Inf entries in the sform/qform): fix the file's header"
    linear = a[:3, :3]
    sizes = np.linalg.norm(linear, axis=0)
    zero = [AXES[i] for i in range(3) if sizes[i] < 1e-6]
    if zero:
        return (
            f"degenerate affine: voxel axis {', '.join(zero)} has length 0 (a zero column of the sform/qform), so "
            f"the voxel grid has no extent in space; fix the file's header (spacing {[round(float(x), 6) for x in sizes]})"
        )
    if abs(float(np.linalg.det(linear))) < 1e-6 * float(np.prod(sizes)):
        return (
            "degenerate affine: its voxel axes are (nearly) parallel (singular sform/qform), so the voxel grid does "
            "not span 3D space; fix the file's header"
        )
    return None


def voxel_spacing(affine) -> tuple[float, float, float]:
    """(sx, sy, sz) in mm: the lengths of the affine's voxel axes."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def float32_overflow(arr: np.ndarray) -> str | None:
    """Finite values beyond float32's range (a float64 image holding 1e300): the bundle computes in float32, where
    they become Inf, so they are named for what they are instead of as "non-finite voxels"."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating) or np.finfo(arr.dtype).max <= FLOAT32_MAX:
        return None
    magnitude = np.abs(arr[np.isfinite(arr)])
    n = int(np.count_nonzero(magnitude > FLOAT32_MAX))
    if not n:
        return None
    return (
        f"{n} voxel value(s) overflow float32 (max |value| {float(magnitude.max()):.3g} > {FLOAT32_MAX:.3g}): the "
        "bundle computes in float32, where they would become Inf; rescale the image"
    )


def nonfinite_diagnosis(paths: Sequence[str]) -> str:
    """What the files say about non-finite voxels found after loading (called on that error path only): values
    that overflowed the float32 cast, or NaN/Inf already in the file."""
    notes = []
    for path in paths:
        try:
            arr, _ = read_volume(str(path))
        except Exception:  # noqa: BLE001 - a diagnosis only; the caller's error stands without it
            continue
        overflow = float32_overflow(arr)
        if overflow:
            notes.append(f"{Path(path).name}: {overflow}")
    return "; ".join(notes)


def empty_mask_reason(raw: np.ndarray) -> str:
    """Why :func:`lesion_mask` found no lesion: no nonzero voxel at all, or a soft mask whose every value lies below
    the threshold (a faint probability map: it has nonzero voxels, which the user sees in a viewer)."""
    raw = np.asarray(raw)
    nonzero = int(np.count_nonzero(raw))
    if not nonzero:
        return "empty mask (no lesion voxels)"
    return (
        f"empty mask after the mask rule: {nonzero} voxel(s) are nonzero, but all are below the soft-mask threshold "
        f"{SOFT_THRESHOLD} (max {float(raw.max()):g}; lesion = value >= {SOFT_THRESHOLD}); threshold the probability "
        "map yourself or give a binary mask"
    )


def default_case_id(section: str, index: int) -> str:
    """The id of a case that has none: ``<section>_<index:04d>`` (its position in its section)."""
    return f"{section}_{index:04d}"


def labels_of(items: Sequence[Mapping], where: str = "the cases given") -> tuple[dict[str, object], list[str]]:
    """(``{id: label}`` of the labelled items, ids of the items without a label), in item order.

    The one place a case's label is read: ``null`` or absent = unlabelled; a case id seen twice is an error rather
    than one label silently winning; labels of mixed types (or not class labels at all) are errors naming the case.
    """
    labels: dict[str, object] = {}
    unlabelled: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        case_id = str(item.get("id", f"#{i}"))
        if case_id in seen:
            raise ValueError(f"case id {case_id!r} appears more than once")
        seen.add(case_id)
        if item.get("label") is None:
            unlabelled.append(case_id)
        else:
            labels[case_id] = item["label"]
    problems = check_labels([{"id": i, "label": v} for i, v in labels.items()], where)
    if problems:
        raise ValueError("; ".join(f"case {p.case_id!r}: {p.problem}" for p in problems))
    return {i: normalise_label(v) for i, v in labels.items()}, unlabelled


def read_labels(
    path: str | os.PathLike, sections: Sequence[str] = ("training",), *, require: bool = True
) -> tuple[dict[str, object], list[str]]:
    """(``{id: label}`` of labelled cases, ids of cases without a label) from a datalist's sections (an absent
    section is empty). Ids default to :func:`default_case_id`. ``require``: no labelled case at all is an error."""
    path = Path(path)
    doc = read_datalist_doc(path)  # a clear error for a missing file, bad JSON, a list, a section that is no list
    items = [it for section in sections for it in section_items(doc, path, section, None, strict=False)]
    try:
        labels, unlabelled = labels_of(items, f"sections {list(sections)}")
    except ValueError as e:
        raise ValueError(f"datalist {path}: {e}") from None
    if require and not labels:
        raise ValueError(
            f"datalist {path}: no labelled cases in sections {list(sections)} (present: "
            f"{', '.join(f'{s} ({len(doc[s])} cases)' for s in doc if isinstance(doc.get(s), list)) or 'none'})"
        )
    return labels, unlabelled


def labelled_ids(path: str | os.PathLike, sections: tuple[str, ...] = ("training",)) -> dict[str, object]:
    """``{case id: label}`` for the labelled cases of a datalist (``null`` or absent label = unlabelled)."""
    return read_labels(path, sections, require=False)[0]


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


def grid_match(
    image_affine, image_shape, mask_affine, mask_shape, tol: float = AFFINE_TOL
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How to put the mask array on the image's voxel grid, judged physically: ``(axes, flips)`` for
    :func:`to_image_grid` when every image voxel has a mask voxel at the same place in the body (within ``tol``
    mm), e.g. the mask stored LPS and the image RAS; ``((0, 1, 2), ())`` when already aligned; None when the grids
    differ (another spacing, origin, extent or rotation). The validator, the cohort builders, training and
    radiomics all use this one rule.
    """
    image_affine = np.asarray(image_affine, dtype=np.float64)
    mask_affine = np.asarray(mask_affine, dtype=np.float64)
    image_shape, mask_shape = tuple(image_shape), tuple(mask_shape)
    if image_shape == mask_shape and np.allclose(image_affine, mask_affine, atol=tol):
        return (0, 1, 2), ()
    if len(image_shape) != 3 or len(mask_shape) != 3:
        return None
    try:
        t_full = np.linalg.solve(mask_affine, image_affine)  # image voxel index -> mask voxel index
    except np.linalg.LinAlgError:
        return None
    perm = np.round(t_full[:3, :3])
    if not ((np.abs(perm).sum(0) == 1).all() and (np.abs(perm).sum(1) == 1).all()):
        return None
    shift = np.round(t_full[:3, 3])
    axes, flips = [], []
    for a in range(3):
        r = int(np.argmax(np.abs(perm[:, a])))
        axes.append(r)
        if mask_shape[r] != image_shape[a] or shift[r] != (0 if perm[r, a] > 0 else mask_shape[r] - 1):
            return None
        if perm[r, a] < 0:
            flips.append(a)
    exact = np.eye(4)
    exact[:3, :3], exact[:3, 3] = perm, shift
    if not np.allclose(mask_affine @ exact, image_affine, atol=tol):
        return None
    return tuple(axes), tuple(flips)


def to_image_grid(mask: np.ndarray, match: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    """The [X, Y, Z] mask array reoriented by a :func:`grid_match` result (a no-op for the identity)."""
    axes, flips = match
    out = np.transpose(mask, axes) if tuple(axes) != (0, 1, 2) else mask
    return np.flip(out, flips) if flips else out


def rule_level(rule: str) -> int:
    """Log level of an applied mask rule: a warning when lesion-like voxels are left out (a soft mask's halo, parts
    outside the box), information when nothing is (BraTS labels merged, every part inside the box)."""
    return logging.WARNING if ("left out" in rule or "outside it" in rule) else logging.INFO


def lesion_components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes) of the 26-connected components of a lesion mask, relabelled largest first: label 1 is the
    largest component and ``sizes[0]`` its voxel count."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(binary, dtype=bool), structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return labels, np.bincount(labels.ravel())[1:]
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    rank = np.zeros(n + 1, dtype=labels.dtype)
    rank[order + 1] = np.arange(1, n + 1)
    return rank[labels], sizes[order]


def lesion_mask(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """The lesion as a boolean [X, Y, Z] array and the rule applied ("binary" when there was nothing to decide).

    One rule for the validator, training (``TumourBoxd``) and radiomics, recorded where it is not "binary":

    * integer labels >= 0: nonzero = lesion, e.g. BraTS 1/2/4 -> whole tumour ("labels [1, 2, 4] merged"); more
      than ``MAX_MASK_LABELS`` distinct values is an intensity image given as the mask: ``ValueError``;
    * a soft (probability) mask, values in [0, 1] not all 0/1: lesion = value >= 0.5, so a faint halo does not
      count as lesion ("soft mask thresholded at 0.5");
    * several separate components (26-connected; a multi-focal lesion, or one split by thick slices): all are
      lesion, as pyradiomics reads one label ("2 components (3524 + 613 voxels), described together");
      ``TumourBoxd`` centres its box on all parts when it then holds the largest part whole, else on the largest
      part, and says how many lesion voxels the box leaves out;
    * negative values, NaN/Inf, non-integers outside [0, 1], or a mask covering the whole volume: ``ValueError``.

    A boolean array is a lesion already decided by this rule upstream (the ROI loader's crop of ``TumourBoxd``'s
    mask, which a box may cut into pieces): only the whole-volume check applies to it.
    """
    arr = np.asarray(mask)
    decided = arr.dtype == bool
    if decided:
        binary, rules = arr, []
    else:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"mask has {int((~np.isfinite(arr)).sum())} non-finite (NaN/Inf) values")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"mask has non-numeric type {arr.dtype}")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0:
            raise ValueError(
                f"mask has negative values (min {lo:g}): neither a label mask (labels >= 0) nor a probability mask"
            )
        integral = not np.issubdtype(arr.dtype, np.floating) or bool(np.all(arr == np.round(arr)))
        if integral:
            binary = arr != 0
            values = np.unique(arr[binary]) if hi > 1 else np.array([1])
            if len(values) > MAX_MASK_LABELS:
                raise ValueError(
                    f"mask has {len(values)} distinct nonzero values ({lo:g} .. {hi:g}): not a label mask (an "
                    f"intensity image given as the mask?); a lesion mask has at most {MAX_MASK_LABELS} labels"
                )
            rules = [] if hi <= 1 else [f"labels {[int(v) for v in values[:10]]} merged (nonzero = lesion)"]
        elif hi <= 1:
            binary = arr >= SOFT_THRESHOLD
            rules = [
                f"soft mask thresholded at {SOFT_THRESHOLD} ({int(np.count_nonzero((arr > 0) & ~binary))} voxels in "
                f"(0, {SOFT_THRESHOLD}) left out)"
            ]
        else:
            raise ValueError(
                f"mask values are neither integer labels nor probabilities in [0, 1] (range {lo:g} .. {hi:g})"
            )
    if binary.size and binary.all():
        raise ValueError(
            "mask covers the whole volume (every voxel is lesion): not a segmentation of a lesion "
            "(an inverted mask, or a crop given as the mask?)"
        )
    if binary.ndim == 3 and not decided and binary.any():
        _, sizes = lesion_components(binary)
        if len(sizes) > 1:
            shown = " + ".join(str(int(v)) for v in sizes[:5]) + (" + ..." if len(sizes) > 5 else "")
            rules.append(f"{len(sizes)} components ({shown} voxels), described together")
    return np.asarray(binary, dtype=bool), "; ".join(rules) or "binary"


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


def load_sections(
    path: str | os.PathLike,
    sections: tuple[str, ...] = ("training", "testing"),
    data_root: str | os.PathLike | None = None,
    labels: str = "keep",
) -> list[dict]:
    """Items of every listed section (an absent section is empty), in file order; no case at all is an error.

    Ids must be unique across the sections too: inference and radiomics write one table row per id. ``labels``
    as in :func:`load_datalist` ("drop" for label-free inference: unlabelled and labelled cases batch together).
    """
    doc = read_datalist_doc(path)
    items = [it for s in sections for it in section_items(doc, Path(path), s, data_root, labels)]
    _check_unique_ids(items, f"datalist {path} sections {list(sections)}")
    if not items:
        raise ValueError(
            f"datalist {path}: no cases in sections {list(sections)} (the file has {_describe_sections(doc)}); "
            "nothing to do, and no earlier output is touched"
        )
    if labels != "drop":  # one type of label across the sections too
        problems = check_labels(items, f"sections {list(sections)}")
        if problems:
            raise ValueError(f"datalist {path}: " + "; ".join(f"case {p.case_id!r}: {p.problem}" for p in problems))
    return items


def _load_sections(
    path: str | os.PathLike,
    sections: tuple[str, ...],
    data_root: str | os.PathLike | None = None,
    doc: dict | None = None,
) -> list[dict]:
    """Every listed section's items without the duplicate-id and label checks: the validator reports those with
    everything else."""
    doc = read_datalist_doc(path) if doc is None else doc
    return [it for s in sections for it in section_items(doc, Path(path), s, data_root, strict=False)]


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
