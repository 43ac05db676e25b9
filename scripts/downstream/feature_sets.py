"""Feature tables joined with the datalist's labels on case id: the matrices every downstream row is scored on.

``load_and_join`` reads each table once, checks that every labelled case is in it (and no stranger), and returns the
rows in one fixed order (sorted ids), so the SVM rows, the saved SVM and the supervised baseline see the same cases
in the same order. ``check_label_map`` refuses labels outside the profile's map before any fit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.feature_table import listing, read_checked


@dataclass
class FeatureSets:
    """Labelled cases in a fixed order, and one feature matrix per feature set (rows in ``ids`` order)."""

    ids: list[str]
    y: np.ndarray
    X: dict[str, np.ndarray]
    columns: dict[str, list[str]]
    excluded_unlabelled: list[str] = field(default_factory=list)
    widths: dict[str, tuple[int, ...]] = field(default_factory=dict)  # columns per table, in the set's table order


def _as_label_array(labels: Sequence) -> np.ndarray:
    """Labels as a numpy array of one type (ints stay ints); mixed types would make class order ambiguous."""
    kinds = {type(v).__name__ for v in labels}
    if len({isinstance(v, str) for v in labels}) > 1:
        raise ValueError(f"labels mix strings and numbers ({sorted(kinds)}); use one type (e.g. all int)")
    return np.asarray(labels)


def load_and_join(
    tables: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    labels: Mapping[str, object],
    *,
    unlabelled: Iterable[str] = (),
) -> FeatureSets:
    """Join feature tables with labels on case id; any mismatch is an error that lists the ids.

    ``tables`` maps a feature set name to one CSV or a list of CSVs concatenated column-wise (columns then get a
    ``<file stem>:`` prefix so they stay unique). ``unlabelled`` are ids known to have no label (e.g. datalist
    cases without ``label``): they may appear in a table and are excluded, and listed in the result.
    """
    if not tables:
        raise ValueError("no feature tables given")
    if not labels:
        raise ValueError("no labelled cases given")
    ids = sorted(str(i) for i in labels)
    label_of = {str(k): v for k, v in labels.items()}
    y = _as_label_array([label_of[i] for i in ids])
    allowed_extra = set(map(str, unlabelled)) - set(ids)
    wanted = set(ids)
    cache: dict[Path, tuple[list[str], list[str], np.ndarray]] = {}
    excluded: set[str] = set()
    X: dict[str, np.ndarray] = {}
    columns: dict[str, list[str]] = {}
    widths: dict[str, tuple[int, ...]] = {}
    for name, spec in tables.items():
        paths = [Path(p) for p in ([spec] if isinstance(spec, (str, os.PathLike)) else spec)]
        if not paths:
            raise ValueError(f"feature set {name!r} lists no tables")
        stems = [p.stem for p in paths]
        prefixes = [f"{s}:" if stems.count(s) == 1 else f"{i}_{s}:" for i, s in enumerate(stems)]
        blocks, cols = [], []
        for path, prefix in zip(paths, prefixes):
            key = path.resolve()
            if key not in cache:
                cache[key] = read_checked(path)
            t_ids, t_cols, values = cache[key]
            present = set(t_ids)
            missing = wanted - present
            extra = present - wanted - allowed_extra
            if missing:
                raise ValueError(
                    f"feature set {name!r}: table {path} lacks {len(missing)} labelled cases: {listing(missing)}"
                )
            if extra:
                raise ValueError(
                    f"feature set {name!r}: table {path} has {len(extra)} cases that are not "
                    f"labelled cases: {listing(extra)}"
                )
            excluded |= present & allowed_extra
            row = {i: r for r, i in enumerate(t_ids)}
            block = values[[row[i] for i in ids]]
            if len(ids) > 1 and np.ptp(block, axis=0).max() == 0:
                raise ValueError(
                    f"feature set {name!r}: table {path} gives all {len(ids)} labelled cases identical features "
                    "(every column is constant), so no classifier can use it: a collapsed encoder (the training log's "
                    "collapse_std near 0) or a broken export"
                )
            blocks.append(block)
            cols += [f"{prefix}{c}" if len(paths) > 1 else c for c in t_cols]
        X[name] = np.concatenate(blocks, axis=1)
        columns[name] = cols
        widths[name] = tuple(b.shape[1] for b in blocks)
    return FeatureSets(ids=ids, y=y, X=X, columns=columns, excluded_unlabelled=sorted(excluded), widths=widths)


def check_label_map(labels: Mapping[str, object], label_map: Mapping | None) -> None:
    """Refuse labels outside the profile's label map (keys = allowed values), listing the cases.

    Without it a typo (label 7 in a 0/1 cohort) silently turns a binary task into a three-class one.
    """
    if not label_map:
        return
    allowed = {str(k) for k in label_map}
    bad = {str(i): v for i, v in labels.items() if str(v) not in allowed}
    if bad:
        values = sorted({str(v) for v in bad.values()})
        raise ValueError(
            f"{len(bad)} case(s) have labels {values} that are not in the label map {sorted(allowed)}: {listing(bad)}"
        )
