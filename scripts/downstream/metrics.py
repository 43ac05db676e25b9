"""Metrics of the downstream protocol: scikit-learn's, behind a thin NaN-safe wrapper, and their aggregation.

A test fold, a bootstrap resample or a small label fraction can lack a class; scikit-learn then warns or raises
(``roc_auc_score`` with one class present). Here such a metric is NaN, never a crash, and aggregates skip NaNs.

Binary -> sensitivity (recall of the positive label), specificity, balanced accuracy, ROC AUC; multi-class ->
overall accuracy, minority-class accuracy (recall of the least frequent class), balanced accuracy, per-class recall,
macro one-vs-rest AUC. Each metric is aggregated three ways (see :func:`summarise`), and two rows scored on the same
cases, folds and seeds can be compared by a paired difference with a bootstrap CI (:func:`paired_difference`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score


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


def fraction_key(fraction: float) -> str:
    return str(float(fraction))


# ------------------------------------------------------------------------------------------------ NaN-safe sklearn
def _nan_safe(fn: Callable[..., float], *args, **kwargs) -> float:
    """``fn(*args, **kwargs)`` as a float; NaN where it is undefined (a class absent) instead of a warning/error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning, "y_pred contains classes not in y_true"
        try:
            return float(fn(*args, **kwargs))
        except ValueError:  # "Only one class present in y_true. ROC AUC score is not defined"
            return math.nan


def recalls(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> dict:
    """``{class: recall}``; NaN for a class with no true case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=np.nan)
    return {c: float(v) for c, v in zip(classes, values)}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    return _nan_safe(balanced_accuracy_score, y_true, y_pred)


def auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties count one half); NaN when one class is absent."""
    return _nan_safe(roc_auc_score, is_pos, score)


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
    per_class = recalls(y_true, y_pred, classes)
    bacc = balanced_accuracy(y_true, y_pred)
    if len(classes) == 2:
        negative = classes[0] if classes[1] == positive_label else classes[1]
        return {
            "sensitivity": per_class[positive_label],
            "specificity": per_class[negative],
            "balanced_accuracy": bacc,
            "auc": auc(y_true == positive_label, scores) if scores is not None else math.nan,
        }
    out = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "minority_accuracy": per_class[minority_label],
        "balanced_accuracy": bacc,
    }
    if scores is not None:
        aucs = [auc(y_true == c, scores[:, k]) for k, c in enumerate(classes)]
        out["auc"] = float(np.mean(aucs)) if not np.isnan(aucs).any() else math.nan
    else:
        out["auc"] = math.nan
    out.update({f"recall_{c}": per_class[c] for c in classes})
    return out


# ------------------------------------------------------------------------------------------------------- aggregation
def _mean_sd(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def pooled_metrics(
    group: Sequence[Run], y: np.ndarray, classes: np.ndarray, positive_label, minority_label
) -> Callable[..., dict[str, float]]:
    """``metrics(idx, runs=group)``: the metrics of the runs' predictions of cases ``idx`` pooled over the runs."""

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

    return metrics


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
        metrics = pooled_metrics(group, y, classes, positive_label, minority_label)
        everyone = np.arange(y.size)
        pooled = metrics(everyone)
        per_seed = [metrics(everyone, [r]) for r in group]
        per_fold = []
        if all(r.fold is not None for r in group):
            for r in group:
                per_fold += [metrics(np.flatnonzero(r.fold == k), [r]) for k in np.unique(r.fold)]
        boot = bootstrap_ci(metrics, y, n_bootstrap, seed) if n_bootstrap else {}
        out[fraction_key(f)] = {
            name: {
                "folds": _mean_sd([m[name] for m in per_fold]) if per_fold else None,
                "seeds": _mean_sd([m[name] for m in per_seed]),
                "pooled": none_if_nan(value),
                "ci95": boot.get(name),
            }
            for name, value in pooled.items()
        }
    return out


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]], y: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, list[float] | None]:
    """Percentile 95% CI of every value of ``statistic(case indices)`` over resamples of the cases drawn with
    replacement within each class (class counts kept). The same ``seed`` gives the same resamples, so CIs of two rows
    and of their difference come from the very same resampled cases."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    samples: dict[str, list[float]] = {}
    for _ in range(n_bootstrap):
        idx = np.concatenate([rng.choice(ix, ix.size, replace=True) for ix in by_class])
        for name, v in statistic(idx).items():
            samples.setdefault(name, []).append(v)
    ci = {}
    for name, vals in samples.items():
        vals = np.asarray(vals)
        ci[name] = None if np.isnan(vals).all() else [float(v) for v in np.nanpercentile(vals, [2.5, 97.5])]
    return ci


def paired_difference(
    runs_a: Sequence[Run],
    runs_b: Sequence[Run],
    y: np.ndarray,
    classes: np.ndarray,
    positive_label,
    minority_label,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """Per label fraction and metric: ``difference`` = pooled metric of A minus that of B, both on the same cases,
    folds and seeds, with ``ci95`` from the stratified case bootstrap of :func:`summarise` (each resample scores A and
    B on the same resampled cases, so the CI is that of the paired difference, not of two independent estimates).

    Reported as it is: a CI that contains 0 says the data do not tell A from B."""
    out: dict[str, dict[str, dict]] = {}
    for f in dict.fromkeys(r.fraction for r in runs_a):
        group_a = sorted((r for r in runs_a if r.fraction == f), key=lambda r: r.seed)
        group_b = sorted((r for r in runs_b if r.fraction == f), key=lambda r: r.seed)
        if [r.seed for r in group_a] != [r.seed for r in group_b]:
            raise ValueError(f"label fraction {f}: the two rows were run with different seeds; no paired difference")
        for ra, rb in zip(group_a, group_b):
            if ra.fold is None or rb.fold is None or not np.array_equal(ra.fold, rb.fold):
                raise ValueError(f"label fraction {f}, seed {ra.seed}: the two rows were not scored on the same folds")
        metrics_a = pooled_metrics(group_a, y, classes, positive_label, minority_label)
        metrics_b = pooled_metrics(group_b, y, classes, positive_label, minority_label)

        def difference(idx: np.ndarray, ma=metrics_a, mb=metrics_b) -> dict[str, float]:
            a, b = ma(idx), mb(idx)
            return {k: a[k] - b[k] for k in a}

        point = difference(np.arange(y.size))
        boot = bootstrap_ci(difference, y, n_bootstrap, seed) if n_bootstrap else {}
        out[fraction_key(f)] = {
            name: {"difference": none_if_nan(value), "ci95": boot.get(name)} for name, value in point.items()
        }
    return out
