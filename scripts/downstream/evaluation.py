"""Downstream evaluation protocol of the paper (Section 3, Table 2): linear SVM on frozen features.

Feature tables (``scripts.io_utils`` format) are joined on case id with the labels of a datalist, then each
feature set goes through the same protocol:

    for seed in seeds:                                  StratifiedKFold(n_folds, shuffle, seed)
        for each fold:                                  test fold never seen until prediction
            for fraction in label_fractions:            stratified subsample of the training fold (1.0 = all)
                stratified inner split (1 - val_fraction) / val_fraction of the subsample
                StandardScaler fitted on the inner-train part; for each C: LinearSVC on inner-train,
                balanced accuracy on inner-val  ->  best C (smallest C on ties)
                refit scaler + LinearSVC(best C) on the whole subsample; predict the test fold

Everything that depends on the data's randomness (folds, subsamples, inner splits, SVM) is seeded from
``(seed, fold, fraction index)`` only, never from feature values, so two feature sets are compared on exactly the
same splits and a change to a test-fold row cannot alter the model that predicts it.

Metrics: binary -> sensitivity (recall of the positive label), specificity, balanced accuracy, ROC AUC; multi-class
-> overall accuracy, minority-class accuracy (recall of the least frequent class), balanced accuracy, per-class
recall, macro one-vs-rest AUC. Each metric is aggregated three ways (see :func:`summarise`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from scripts.io_utils import read_feature_table
from scripts.progress import bar

logger = logging.getLogger(__name__)

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 1, 6))
SVM_MAX_ITER = 50_000
N_LISTED = 20  # ids listed in an error message before "... and N more"


# ----------------------------------------------------------------------------------------------------------- joining
@dataclass
class FeatureSets:
    """Labelled cases in a fixed order, and one feature matrix per feature set (rows in ``ids`` order)."""

    ids: list[str]
    y: np.ndarray
    X: dict[str, np.ndarray]
    columns: dict[str, list[str]]
    excluded_unlabelled: list[str] = field(default_factory=list)


def _listing(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:N_LISTED])
    return f"{shown} ... and {len(ids) - N_LISTED} more ({len(ids)} in all)" if len(ids) > N_LISTED else shown


def _as_label_array(labels: Sequence) -> np.ndarray:
    """Labels as a numpy array of one type (ints stay ints); mixed types would make class order ambiguous."""
    kinds = {type(v).__name__ for v in labels}
    if len({isinstance(v, str) for v in labels}) > 1:
        raise ValueError(f"labels mix strings and numbers ({sorted(kinds)}); use one type (e.g. all int)")
    return np.asarray(labels)


def _read_table_checked(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    ids, columns, values, _ = read_feature_table(path)
    if not columns:
        raise ValueError(f"feature table {path} has no feature columns")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"feature table {path} has duplicate case ids: {_listing(dupes)}")
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        bad_ids = sorted({ids[r] for r in rows})
        bad_cols = sorted({columns[c] for c in cols})
        raise ValueError(
            f"feature table {path} has NaN/Inf values in {int(bad.sum())} cells; cases: {_listing(bad_ids)}; "
            f"columns: {', '.join(bad_cols[:N_LISTED])}{' ...' if len(bad_cols) > N_LISTED else ''}"
        )
    return ids, columns, values


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
                cache[key] = _read_table_checked(path)
            t_ids, t_cols, values = cache[key]
            present = set(t_ids)
            missing = wanted - present
            extra = present - wanted - allowed_extra
            if missing:
                raise ValueError(
                    f"feature set {name!r}: table {path} lacks {len(missing)} labelled cases: {_listing(missing)}"
                )
            if extra:
                raise ValueError(
                    f"feature set {name!r}: table {path} has {len(extra)} cases that are not "
                    f"labelled cases: {_listing(extra)}"
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
    return FeatureSets(ids=ids, y=y, X=X, columns=columns, excluded_unlabelled=sorted(excluded))


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
            f"{len(bad)} case(s) have labels {values} that are not in the label map {sorted(allowed)}: {_listing(bad)}"
        )


# ----------------------------------------------------------------------------------------------------------- metrics
def _recall(y_true: np.ndarray, y_pred: np.ndarray, c) -> float:
    mask = y_true == c
    return float(np.mean(y_pred[mask] == c)) if mask.any() else math.nan


def _auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank statistic (ties count one half); NaN when one class is absent."""
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    classes: np.ndarray,
    positive_label,
    minority_label,
) -> dict[str, float]:
    """Metrics of one set of predictions. ``scores``: binary -> (n,) score of the positive label; multi-class ->
    (n, K) decision values in ``classes`` order; None -> AUC is NaN (e.g. a baseline that gives labels only)."""
    recalls = {c: _recall(y_true, y_pred, c) for c in classes}
    bacc = float(np.nanmean(list(recalls.values())))
    if len(classes) == 2:
        negative = classes[0] if classes[1] == positive_label else classes[1]
        auc = _auc(y_true == positive_label, scores) if scores is not None else math.nan
        return {
            "sensitivity": recalls[positive_label],
            "specificity": recalls[negative],
            "balanced_accuracy": bacc,
            "auc": auc,
        }
    out = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "minority_accuracy": recalls[minority_label],
        "balanced_accuracy": bacc,
    }
    if scores is not None:
        per_class = [_auc(y_true == c, scores[:, k]) for k, c in enumerate(classes)]
        out["auc"] = float(np.mean(per_class)) if not np.isnan(per_class).any() else math.nan
    else:
        out["auc"] = math.nan
    out.update({f"recall_{c}": recalls[c] for c in classes})
    return out


# ---------------------------------------------------------------------------------------------------------- protocol
@dataclass
class Run:
    """Out-of-fold predictions of one (seed, fraction): every case predicted once, by the model of its test fold."""

    seed: int
    fraction: float
    y_pred: np.ndarray
    scores: np.ndarray | None  # binary: (n,) positive-label score; multi-class: (n, K); None if not available
    fold: np.ndarray | None  # (n,) test-fold index of each case; None if unknown (external predictions)
    best_C: list[float] | None = None
    n_not_converged: int = 0  # SVM fits that hit max_iter (reported, not hidden)


@dataclass
class ProtocolResult:
    task: str  # "binary" | "multiclass"
    classes: np.ndarray
    positive_label: object
    minority_label: object
    y: np.ndarray
    runs: list[Run]
    summary: dict[str, dict[str, dict]]  # fraction key -> metric -> aggregates (see summarise)
    settings: dict

    def to_dict(self) -> dict:
        """JSON-ready view (numpy scalars/arrays turned into Python values)."""
        return {
            "task": self.task,
            "classes": self.classes.tolist(),
            "positive_label": _py(self.positive_label),
            "minority_label": _py(self.minority_label),
            "settings": self.settings,
            "summary": self.summary,
            "runs": [
                {
                    "seed": r.seed,
                    "fraction": r.fraction,
                    "best_C": r.best_C,
                    "n_not_converged": r.n_not_converged,
                    "fold": None if r.fold is None else r.fold.tolist(),
                    "y_pred": r.y_pred.tolist(),
                    "scores": None if r.scores is None else np.round(r.scores, 6).tolist(),
                }
                for r in self.runs
            ],
        }


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


def fraction_key(fraction: float) -> str:
    return str(float(fraction))


def _find_label(classes: np.ndarray, label, what: str):
    """Match a label given in a config (often a string like "1") to the classes present, by string form."""
    for c in classes:
        if str(c) == str(label):
            return c
    raise ValueError(f"{what} {label!r} is not one of the classes present: {classes.tolist()}")


def _subsample_size(n: int, fraction: float) -> int:
    return max(1, math.floor(fraction * n + 0.5))


def stratified_subset(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a per-class random subsample keeping round(fraction * n_c) of each class (sorted)."""
    if fraction >= 1.0:
        return np.arange(y.size)
    keep = [
        rng.choice(np.flatnonzero(y == c), _subsample_size(int((y == c).sum()), fraction), replace=False)
        for c in np.unique(y)
    ]
    return np.sort(np.concatenate(keep))


def stratified_holdout(y: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices with round(val_fraction * n_c) of each class in val, at least 1 and at most n_c - 1."""
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_val = min(idx.size - 1, max(1, math.floor(val_fraction * idx.size + 0.5)))
        val.append(rng.choice(idx, n_val, replace=False))
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(y.size), val), val


def _check_protocol(
    X: np.ndarray,
    y: np.ndarray,
    n_folds: int,
    label_fractions: Sequence[float],
    C_grid: Sequence[float],
    val_fraction: float,
) -> None:
    """Fail before any fitting, with the class and count that make the protocol impossible."""
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X has shape {X.shape} but y has {y.shape[0]} labels")
    if X.shape[1] == 0:
        raise ValueError("X has no feature columns")
    if not np.isfinite(X).all():
        rows = sorted({int(r) for r in np.nonzero(~np.isfinite(X))[0]})
        raise ValueError(f"X has NaN/Inf values in rows {rows[:N_LISTED]}")
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"only one class present ({classes.tolist()}, {y.size} cases); need at least two")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    for c, n in zip(classes, counts):
        if n < n_folds:
            raise ValueError(
                f"class {_py(c)!r} has {n} cases, fewer than n_folds={n_folds}: every test fold "
                "needs one case of each class"
            )
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(C_grid) == 0 or min(C_grid) <= 0:
        raise ValueError(f"C_grid must be non-empty and positive, got {list(C_grid)}")
    for f in label_fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fractions must be in (0, 1], got {f}")
        for c, n in zip(classes, counts):
            smallest_train = int(n - math.ceil(n / n_folds))
            kept = smallest_train if f >= 1 else _subsample_size(smallest_train, f)
            if kept < 2:
                raise ValueError(
                    f"class {_py(c)!r} has {n} cases: with {n_folds} folds and label fraction {f} a training fold "
                    f"keeps only {kept} of them; at least 2 are needed to tune C on a held-out part"
                )


def _fit_svm(X: np.ndarray, y: np.ndarray, C: float, class_weight, seed: int) -> tuple[LinearSVC, bool]:
    svm = LinearSVC(C=C, class_weight=class_weight, dual="auto", max_iter=SVM_MAX_ITER, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(X, y)
    return svm, any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def select_C(
    X: np.ndarray,
    y: np.ndarray,
    C_grid: Sequence[float],
    class_weight,
    val_fraction: float,
    rng: np.random.Generator,
    seed: int,
) -> tuple[float, int]:
    """Best C by balanced accuracy on a stratified held-out part of the training rows given (and only those)."""
    tr, va = stratified_holdout(y, val_fraction, rng)
    scaler = StandardScaler().fit(X[tr])
    X_tr, X_va = scaler.transform(X[tr]), scaler.transform(X[va])
    scores, not_converged = [], 0
    for C in C_grid:
        svm, nc = _fit_svm(X_tr, y[tr], C, class_weight, seed)
        not_converged += nc
        scores.append(_balanced_accuracy(y[va], svm.predict(X_va)))
    return float(C_grid[int(np.argmax(scores))]), not_converged


def fit_predict(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, C: float, class_weight, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(predicted labels, decision values, svm classes, not converged) of a scaler + SVM fitted on training rows."""
    scaler = StandardScaler().fit(X_train)
    svm, nc = _fit_svm(scaler.transform(X_train), y_train, C, class_weight, seed)
    X_te = scaler.transform(X_test)
    return svm.predict(X_te), svm.decision_function(X_te), svm.classes_, nc


def run_protocol(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    label_fractions: Sequence[float] = (1.0, 0.5),
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    class_weight: str | dict | None = "balanced",
    val_fraction: float = 0.2,
    positive_label=None,
    n_bootstrap: int = 1000,
    bootstrap_seed: int = 0,
) -> ProtocolResult:
    """Stratified CV x seeds x label fractions of a linear SVM with C tuned inside each training fold."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    C_grid = sorted(float(c) for c in C_grid)
    if not seeds or len(set(seeds)) != len(seeds) or len(set(label_fractions)) != len(label_fractions):
        raise ValueError(f"seeds {list(seeds)} and label fractions {list(label_fractions)} must be non-empty, distinct")
    _check_protocol(X, y, n_folds, label_fractions, C_grid, val_fraction)
    classes, positive, minority = _task_labels(y, positive_label)
    binary = classes.size == 2

    runs: dict[tuple[int, int], Run] = {}
    progress = bar(total=len(seeds) * n_folds, desc=f"SVM protocol ({X.shape[1]} features)", unit="fold", leave=False)
    for seed in seeds:
        for j, f in enumerate(label_fractions):
            scores = np.zeros(y.size) if binary else np.zeros((y.size, classes.size))
            runs[seed, j] = Run(int(seed), float(f), np.empty_like(y), scores, np.full(y.size, -1), [])
        cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (train, test) in enumerate(cv.split(X, y)):
            progress.update(1)
            for j, f in enumerate(label_fractions):
                run = runs[seed, j]
                rng = np.random.default_rng([seed, k, j])
                sub = train[stratified_subset(y[train], f, rng)]
                best_C, nc = select_C(X[sub], y[sub], C_grid, class_weight, val_fraction, rng, seed)
                pred, decision, svm_classes, nc2 = fit_predict(X[sub], y[sub], X[test], best_C, class_weight, seed)
                run.y_pred[test] = pred
                run.fold[test] = k
                run.best_C.append(best_C)
                run.n_not_converged += nc + nc2
                if binary:  # decision > 0 means svm_classes[1]; orient it towards the positive label
                    run.scores[test] = decision if svm_classes[1] == positive else -decision
                else:
                    run.scores[test] = decision[:, np.searchsorted(svm_classes, classes)]
    settings = {
        "n_folds": n_folds,
        "seeds": [int(s) for s in seeds],
        "label_fractions": [float(f) for f in label_fractions],
        "C_grid": C_grid,
        "class_weight": class_weight,
        "val_fraction": val_fraction,
        "svm": f"LinearSVC(dual='auto', max_iter={SVM_MAX_ITER})",
        "n_bootstrap": n_bootstrap,
        "bootstrap_seed": bootstrap_seed,
    }
    progress.close()
    run_list = list(runs.values())
    n_nc = sum(r.n_not_converged for r in run_list)
    if n_nc:
        logger.warning("%d LinearSVC fits stopped at max_iter=%d before converging", n_nc, SVM_MAX_ITER)
    summary = summarise(run_list, y, classes, positive, minority, n_bootstrap=n_bootstrap, seed=bootstrap_seed)
    return ProtocolResult(
        "binary" if binary else "multiclass", classes, positive, minority, y, run_list, summary, settings
    )


def _task_labels(y: np.ndarray, positive_label) -> tuple[np.ndarray, object, object]:
    """(classes, positive label or None, minority label): the positive label defaults to the minority class."""
    classes, counts = np.unique(y, return_counts=True)
    minority = classes[int(np.argmin(counts))]
    if classes.size != 2:
        return classes, None, minority
    positive = minority if positive_label is None else _find_label(classes, positive_label, "positive_label")
    return classes, positive, minority


# ------------------------------------------------------------------------------------------------------- aggregation
def _mean_sd(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def _none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def summarise(
    runs: Sequence[Run],
    y: np.ndarray,
    classes: np.ndarray,
    positive_label,
    minority_label,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """Per label fraction and metric:

    * ``folds``: mean ± sd (ddof 1) over every test fold of every seed (the paper's "mean ± sd over folds");
    * ``seeds``: mean ± sd over seeds of the metric of each seed's pooled out-of-fold predictions;
    * ``pooled``: the metric of all seeds' out-of-fold predictions together, with ``ci95`` from a stratified
      bootstrap over cases (each resample keeps the class counts and takes a case's predictions from every seed).
    """
    out: dict[str, dict[str, dict]] = {}
    for f in dict.fromkeys(r.fraction for r in runs):
        group = [r for r in runs if r.fraction == f]

        def metrics(idx: np.ndarray, rs: Sequence[Run] = group) -> dict[str, float]:
            has_scores = all(r.scores is not None for r in rs)
            return compute_metrics(
                np.tile(y[idx], len(rs)),
                np.concatenate([r.y_pred[idx] for r in rs]),
                np.concatenate([r.scores[idx] for r in rs]) if has_scores else None,
                classes,
                positive_label,
                minority_label,
            )

        everyone = np.arange(y.size)
        pooled = metrics(everyone)
        per_seed = [metrics(everyone, [r]) for r in group]
        per_fold = []
        if all(r.fold is not None for r in group):
            for r in group:
                per_fold += [metrics(np.flatnonzero(r.fold == k), [r]) for k in np.unique(r.fold)]
        boot = _bootstrap(metrics, y, n_bootstrap, seed) if n_bootstrap else {}
        out[fraction_key(f)] = {
            name: {
                "folds": _mean_sd([m[name] for m in per_fold]) if per_fold else None,
                "seeds": _mean_sd([m[name] for m in per_seed]),
                "pooled": _none_if_nan(value),
                "ci95": boot.get(name),
            }
            for name, value in pooled.items()
        }
    return out


def _bootstrap(metrics, y: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, list[float] | None]:
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    samples: dict[str, list[float]] = {}
    for _ in range(n_bootstrap):
        idx = np.concatenate([rng.choice(ix, ix.size, replace=True) for ix in by_class])
        for name, v in metrics(idx).items():
            samples.setdefault(name, []).append(v)
    ci = {}
    for name, vals in samples.items():
        vals = np.asarray(vals)
        ci[name] = None if np.isnan(vals).all() else [float(v) for v in np.nanpercentile(vals, [2.5, 97.5])]
    return ci


def summarise_predictions(
    ids: Sequence[str],
    y: np.ndarray,
    records: Sequence[Mapping],
    *,
    positive_label=None,
    name: str = "baseline",
    n_bootstrap: int = 1000,
    bootstrap_seed: int = 0,
) -> ProtocolResult:
    """Summarise externally produced out-of-fold predictions (e.g. the supervised baseline) like a protocol run.

    Each record: ``{"fraction", "seed", "ids", "y_pred", "scores"?, "fold"?}``; ``scores`` as in
    :func:`compute_metrics` (binary: score of the positive label). Its ids must be exactly the labelled cases.
    """
    y = np.asarray(y)
    classes, positive, minority = _task_labels(y, positive_label)
    order = {i: k for k, i in enumerate(ids)}
    runs = []
    for n, rec in enumerate(records):
        what = f"{name} predictions #{n} (seed {rec.get('seed')}, fraction {rec.get('fraction')})"
        rec_ids = [str(i) for i in rec["ids"]]
        missing, extra = set(order) - set(rec_ids), set(rec_ids) - set(order)
        if missing or extra or len(rec_ids) != len(set(rec_ids)):
            raise ValueError(
                f"{what}: ids do not match the labelled cases; missing: {_listing(missing) or '-'}; "
                f"extra: {_listing(extra) or '-'}; duplicates: {len(rec_ids) - len(set(rec_ids))}"
            )
        perm = np.array([order[i] for i in rec_ids])
        y_pred = np.empty_like(y)
        y_pred[perm] = [_find_label(classes, v, f"{what}: predicted label") for v in rec["y_pred"]]
        scores = fold = None
        if rec.get("scores") is not None:
            s = np.asarray(rec["scores"], dtype=np.float64)
            scores = np.empty_like(s)
            scores[perm] = s
        if rec.get("fold") is not None:
            fold = np.empty(y.size, dtype=int)
            fold[perm] = np.asarray(rec["fold"], dtype=int)
        runs.append(Run(int(rec.get("seed", 0)), float(rec["fraction"]), y_pred, scores, fold))
    summary = summarise(runs, y, classes, positive, minority, n_bootstrap=n_bootstrap, seed=bootstrap_seed)
    return ProtocolResult(
        "binary" if classes.size == 2 else "multiclass",
        classes,
        positive,
        minority,
        y,
        runs,
        summary,
        {"source": "external out-of-fold predictions"},
    )


# -------------------------------------------------------------------------------------------- representation analysis
def standardise_columns(X: np.ndarray) -> tuple[np.ndarray, int]:
    """Columns with non-zero spread, standardised; and how many constant columns were dropped."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(X.mean(axis=0)))
    Xk = X[:, keep]
    return (Xk - Xk.mean(axis=0)) / Xk.std(axis=0), int((~keep).sum())


def kmeans_clusters(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels of standardised features (constant columns dropped), as in the RE/SE clustering view."""
    Z, _ = standardise_columns(X)
    if Z.shape[1] == 0:
        raise ValueError("every feature column is constant; nothing to cluster")
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Z)


def cluster_agreement(X: np.ndarray, y: np.ndarray, k: int | None = None, seed: int = 0) -> dict:
    """How well unsupervised k-means clusters of the features recover the labels: ARI and NMI (1 = identical)."""
    y = np.asarray(y)
    k = int(np.unique(y).size) if k is None else int(k)
    clusters = kmeans_clusters(X, k, seed)
    return {
        "ari": float(adjusted_rand_score(y, clusters)),
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "k": k,
        "clusters": clusters.tolist(),
    }


def pairwise_correlations(X: np.ndarray) -> tuple[np.ndarray, int]:
    """(upper-triangle Pearson correlations between non-constant features, number of constant columns dropped)."""
    Z, n_dropped = standardise_columns(X)
    if Z.shape[1] < 2:
        return np.empty(0), n_dropped
    r = (Z.T @ Z) / Z.shape[0]
    return np.clip(r[np.triu_indices(Z.shape[1], k=1)], -1.0, 1.0), n_dropped


def correlation_density(X: np.ndarray) -> np.ndarray:
    """Upper-triangle Pearson correlations between features (paper Fig. 2); constant columns are dropped."""
    r, n_dropped = pairwise_correlations(X)
    if n_dropped:
        logger.warning("correlation density: dropped %d constant feature columns", n_dropped)
    return r


def correlation_summary(X: np.ndarray, bins: int = 50) -> dict:
    """JSON-ready Fig.-2 data: histogram of pairwise correlations on [-1, 1] plus simple statistics."""
    r, n_dropped = pairwise_correlations(X)
    counts, edges = np.histogram(r, bins=bins, range=(-1.0, 1.0))
    return {
        "n_features": int(np.asarray(X).shape[1]),
        "n_constant_dropped": n_dropped,
        "n_pairs": int(r.size),
        "mean": float(r.mean()) if r.size else None,
        "mean_abs": float(np.abs(r).mean()) if r.size else None,
        "median_abs": float(np.median(np.abs(r))) if r.size else None,
        "hist_edges": edges.tolist(),
        "hist_counts": counts.tolist(),
    }
