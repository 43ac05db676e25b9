"""The cohort summary (class x centre table, exclusions), the step that finishes a build (validate, write the datalist
last, then its summary) and the profiles' datalist helpers."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from scripts.data.cohorts.common import CENTRES, Excluded, _relativise, _validate
from scripts.data.datalist import SECTIONS, default_case_id, read_datalist_doc
from scripts.io_utils import atomic_write_json, atomic_write_text


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
