"""MONAI datalists: loading with paths resolved against the datalist file, case ids and labels (the one reader of both).

A datalist is ``{"training": [{"id", "image", "mask", "label"?, "centre"?}], "testing": [...]}`` where ``image``
is a path or a list of paths (one per channel, e.g. BraTS' four modalities). Relative paths are relative to the
datalist file (the real file, when the datalist is reached through a symlink), so a cohort folder can be moved or
zipped with its datalist. A datalist is data: it is parsed as JSON and never evaluated.

The checks of one volume file are ``scripts.data.volumes``, the lesion-mask rule ``scripts.data.lesion_mask`` and
the validator that applies both to every case ``scripts.data.validation``, in the words every entry point uses.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SECTIONS = ("training", "validation", "testing")


# Larger integers are not class labels (a typo, an exponent); they also overflow int64 collation and JSON readers.
MAX_LABEL = 2**31 - 1


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
    _, labels, unlabelled = read_cases(path, sections, require=require)
    return labels, unlabelled


def read_cases(
    path: str | os.PathLike, sections: Sequence[str] = ("training",), *, require: bool = True
) -> tuple[dict[str, dict], dict[str, object], list[str]]:
    """(``{id: item}`` with resolved paths, ``{id: label}`` of the labelled cases, ids without a label) of a
    datalist's sections, from one read of the file: what an evaluation needs (labels for the rows, items for the
    centres and the montage). An absent or empty section adds nothing."""
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
    return {str(it.get("id")): it for it in items}, labels, unlabelled


def labelled_ids(path: str | os.PathLike, sections: tuple[str, ...] = ("training",)) -> dict[str, object]:
    """``{case id: label}`` for the labelled cases of a datalist (``null`` or absent label = unlabelled)."""
    return read_labels(path, sections, require=False)[0]


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
