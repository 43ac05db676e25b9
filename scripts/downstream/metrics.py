"""Metrics of the downstream protocol: scikit-learn's, behind a thin NaN-safe wrapper, and their aggregation.

A test fold, a bootstrap resample or a small label fraction can lack a class; scikit-learn then warns or raises
(``roc_auc_score`` with one class present). Here such a metric is NaN, never a crash, and aggregates skip NaNs.

Every reported figure (per fold, per seed, pooled, and the C selection) comes from scikit-learn. The bootstrap
scores the same metrics on 1,000 resamples per row and label fraction, where scikit-learn's input checks cost ~10 ms
a call (a default evaluation would take minutes instead of seconds); there :func:`resample_metrics` computes them
from class counts and ranks, the same definitions (a test holds it to scikit-learn within 1e-12).

Binary -> sensitivity (recall of the positive label), specificity, balanced accuracy, ROC AUC; multi-class ->
overall accuracy, minority-class accuracy (recall of the least frequent class), balanced accuracy, per-class recall,
macro one-vs-rest AUC. Each metric is aggregated three ways (see :func:`summarise`), and two rows scored on the same
cases, folds and seeds can be compared by a paired difference with a bootstrap CI (:func:`paired_difference`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
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
    best_weight: list[float] = field(default_factory=list)  # a weighted block's weight per fold (protocol.BlockWeights)


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
    return _assemble(per_class, bacc, auc, y_true, y_pred, scores, classes, positive_label, minority_label)


def _assemble(per_class, bacc, auc_of, y_true, y_pred, scores, classes, positive_label, minority_label) -> dict:
    """The metric dictionary shared by :func:`compute_metrics` and :func:`resample_metrics`, which differ only in
    how they compute the per-class recalls, the balanced accuracy and the AUC (``auc_of``)."""
    if len(classes) == 2:
        negative = classes[0] if classes[1] == positive_label else classes[1]
        return {
            "sensitivity": per_class[positive_label],
            "specificity": per_class[negative],
            "balanced_accuracy": bacc,
            "auc": auc_of(y_true == positive_label, scores) if scores is not None else math.nan,
        }
    out = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "minority_accuracy": per_class[minority_label],
        "balanced_accuracy": bacc,
    }
    if scores is not None:
        aucs = [auc_of(y_true == c, scores[:, k]) for k, c in enumerate(classes)]
        out["auc"] = float(np.mean(aucs)) if not np.isnan(aucs).any() else math.nan
    else:
        out["auc"] = math.nan
    out.update({f"recall_{c}": per_class[c] for c in classes})
    return out


def _count_recall(y_true: np.ndarray, y_pred: np.ndarray, c) -> float:
    mask = y_true == c
    return float(np.mean(y_pred[mask] == c)) if mask.any() else math.nan


def _rank_auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half), ``roc_auc_score``'s value; NaN for one class."""
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def resample_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    classes: np.ndarray,
    positive_label,
    minority_label,
) -> dict[str, float]:
    """:func:`compute_metrics` from class counts and ranks, for the bootstrap's thousands of resamples (see the
    module docstring); same keys, same definitions, same NaN rules."""
    per_class = {c: _count_recall(y_true, y_pred, c) for c in classes}
    bacc = float(np.nanmean(list(per_class.values())))
    return _assemble(per_class, bacc, _rank_auc, y_true, y_pred, scores, classes, positive_label, minority_label)


# ------------------------------------------------------------------------------------------------------- aggregation
def _mean_sd(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def pooled_metrics(
    group: Sequence[Run], y: np.ndarray, classes: np.ndarray, positive_label, minority_label, score=compute_metrics
) -> Callable[..., dict[str, float]]:
    """``metrics(idx, runs=group)``: the metrics of the runs' predictions of cases ``idx`` pooled over the runs
    (``score``: :func:`compute_metrics`, or :func:`resample_metrics` inside the bootstrap)."""

    def metrics(idx: np.ndarray, rs: Sequence[Run] = group) -> dict[str, float]:
        has_scores = all(r.scores is not None for r in rs)
        return score(
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
        resampled = pooled_metrics(group, y, classes, positive_label, minority_label, resample_metrics)
        boot = bootstrap_ci(resampled, y, n_bootstrap, seed) if n_bootstrap else {}
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


def _difference(group_a: Sequence[Run], group_b: Sequence[Run], labels: tuple, score) -> Callable:
    """``idx -> {metric: A - B}`` with both rows scored on the cases ``idx`` by ``score``."""
    metrics_a, metrics_b = pooled_metrics(group_a, *labels, score), pooled_metrics(group_b, *labels, score)

    def difference(idx: np.ndarray) -> dict[str, float]:
        a, b = metrics_a(idx), metrics_b(idx)
        return {k: a[k] - b[k] for k in a}

    return difference


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
        labels = (y, classes, positive_label, minority_label)
        point = _difference(group_a, group_b, labels, compute_metrics)(np.arange(y.size))
        resampled = _difference(group_a, group_b, labels, resample_metrics)
        boot = bootstrap_ci(resampled, y, n_bootstrap, seed) if n_bootstrap else {}
        out[fraction_key(f)] = {
            name: {"difference": none_if_nan(value), "ci95": boot.get(name)} for name, value in point.items()
        }
    return out
