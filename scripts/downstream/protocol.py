"""The downstream protocol of the paper (Section 3, Table 2): the one place folds, label fractions, C and fits are made.

Used by the SVM rows (:func:`run_protocol`), the supervised baseline (:func:`splits`, so it trains on exactly the
SVM's folds and subsamples) and the saved SVM (:func:`fit_final`, the same recipe on every labelled case)::

    for seed in seeds:                                  StratifiedKFold(n_folds, shuffle, seed)
        for each fold:                                  test fold never seen until prediction
            for fraction in label_fractions:            stratified subsample of the training fold (1.0 = all)
                stratified inner split (1 - val_fraction) / val_fraction of the subsample
                StandardScaler fitted on the inner-train part; for each C: LinearSVC on inner-train,
                balanced accuracy on inner-val  ->  best C (smallest C on ties)
                (a weighted block's row: C so for each block weight, then the weight by an inner 4-fold CV)
                refit scaler + LinearSVC(best C) on the whole subsample; predict the test fold

Everything that depends on the data's randomness (folds, subsamples, inner splits, SVM) is seeded from
``(seed, fold, fraction index)`` only, never from feature values, so two feature sets are compared on exactly the
same splits and a change to a test-fold row cannot alter the model that predicts it. Metrics and their aggregation:
``scripts.downstream.metrics``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from scripts.downstream.metrics import Run, auc, balanced_accuracy, summarise
from scripts.feature_table import N_LISTED, listing
from scripts.io_utils import py_scalar
from scripts.progress import bar

logger = logging.getLogger(__name__)

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 1, 6))
SVM_MAX_ITER = 50_000


# ------------------------------------------------------------------------------------------------------------ labels
def find_label(classes: np.ndarray, label, what: str):
    """Match a label given in a config (often a string like "1") to the classes present, by string form."""
    for c in classes:
        if str(c) == str(label):
            return c
    raise ValueError(f"{what} {label!r} is not one of the classes present: {classes.tolist()}")


def task_labels(y: np.ndarray, positive_label) -> tuple[np.ndarray, object, object]:
    """(classes, positive label or None, minority label): the positive label defaults to the minority class."""
    classes, counts = np.unique(y, return_counts=True)
    minority = classes[int(np.argmin(counts))]
    if classes.size != 2:
        return classes, None, minority
    positive = minority if positive_label is None else find_label(classes, positive_label, "positive_label")
    return classes, positive, minority


# ------------------------------------------------------------------------------------------------------------ splits
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


@dataclass(frozen=True)
class Split:
    """One training of the protocol: the training subsample (global row indices) and the test fold. ``rng`` is the
    split's random stream after the subsample was drawn: the SVM's inner split continues it."""

    seed: int
    fold: int
    fraction_index: int
    fraction: float
    train: np.ndarray  # the whole training fold
    subset: np.ndarray  # the label-fraction subsample of it, what the classifier is trained on
    test: np.ndarray
    rng: np.random.Generator = field(repr=False, compare=False)


def splits(y: np.ndarray, n_folds: int, seed: int, label_fractions: Sequence[float]) -> Iterator[Split]:
    """The protocol's splits for one seed, folds then fractions: ``StratifiedKFold`` (it only looks at ``y``) and the
    subsample drawn first from ``default_rng([seed, fold, fraction index])``."""
    cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (train, test) in enumerate(cv.split(np.zeros((y.size, 1)), y)):
        for j, f in enumerate(label_fractions):
            rng = np.random.default_rng([seed, k, j])
            subset = train[stratified_subset(y[train], f, rng)]
            yield Split(int(seed), k, j, float(f), train, subset, test, rng)


def check_design(y: np.ndarray, n_folds: int, seeds: Sequence[int], label_fractions: Sequence[float]) -> None:
    """Fail before any training, naming the class and count that make the folds impossible."""
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"only one class present ({classes.tolist()}, {y.size} cases); need at least two")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    for c, n in zip(classes, counts):
        if n < n_folds:
            raise ValueError(
                f"class {py_scalar(c)!r} has {n} cases, fewer than n_folds={n_folds}: every test fold "
                "needs one case of each class"
            )
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be non-empty and distinct, got {list(seeds)}")
    if not label_fractions or len(set(label_fractions)) != len(label_fractions):
        raise ValueError(f"label fractions must be non-empty and distinct, got {list(label_fractions)}")
    for f in label_fractions:
        if not 0 < f <= 1:
            raise ValueError(f"label fractions must be in (0, 1], got {f}")


def _check_svm(
    X: np.ndarray,
    y: np.ndarray,
    n_folds: int,
    seeds: Sequence[int],
    label_fractions: Sequence[float],
    C_grid: Sequence[float],
    val_fraction: float,
) -> None:
    """Fail before any fitting, with the class and count that make the SVM protocol impossible."""
    if not seeds or len(set(seeds)) != len(seeds) or len(set(label_fractions)) != len(label_fractions):
        raise ValueError(f"seeds {list(seeds)} and label fractions {list(label_fractions)} must be non-empty, distinct")
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X has shape {X.shape} but y has {y.shape[0]} labels")
    if X.shape[1] == 0:
        raise ValueError("X has no feature columns")
    if not np.isfinite(X).all():
        rows = sorted({int(r) for r in np.nonzero(~np.isfinite(X))[0]})
        raise ValueError(f"X has NaN/Inf values in rows {rows[:N_LISTED]}")
    check_design(y, n_folds, seeds, label_fractions)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(C_grid) == 0 or min(C_grid) <= 0:
        raise ValueError(f"C_grid must be non-empty and positive, got {list(C_grid)}")
    classes, counts = np.unique(y, return_counts=True)
    for f in label_fractions:
        for c, n in zip(classes, counts):
            smallest_train = int(n - math.ceil(n / n_folds))
            kept = smallest_train if f >= 1 else _subsample_size(smallest_train, f)
            if kept < 2:
                raise ValueError(
                    f"class {py_scalar(c)!r} has {n} cases: with {n_folds} folds and label fraction {f} a training fold "
                    f"keeps only {kept} of them; at least 2 are needed to tune C on a held-out part"
                )


# --------------------------------------------------------------------------------------------------------------- SVM
def _svm(C: float, class_weight, seed: int) -> LinearSVC:
    return LinearSVC(C=C, class_weight=class_weight, dual="auto", max_iter=SVM_MAX_ITER, random_state=seed)


def _fit_svm(X: np.ndarray, y: np.ndarray, C: float, class_weight, seed: int) -> tuple[LinearSVC, bool]:
    svm = _svm(C, class_weight, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(X, y)
    return svm, any(issubclass(w.category, ConvergenceWarning) for w in caught)


@dataclass(frozen=True)
class BlockWeights:
    """A block of columns (e.g. the 256 SSL features of trad+ssl) whose standardised values are multiplied by a
    weight chosen from ``grid`` inside each training fold (``select_weight``): a block that helps nothing there gets
    weight 0 and the row falls back to the other columns (radiomics alone), with radiomics' own C."""

    columns: tuple[int, ...]
    grid: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        if not self.columns or not self.grid or min(self.grid) < 0:
            raise ValueError(f"block weights need columns and a grid of weights >= 0, got {self.grid}")
        object.__setattr__(self, "grid", tuple(sorted(float(w) for w in self.grid)))

    def apply(self, X: np.ndarray, weight: float) -> np.ndarray:
        if weight == 1.0:
            return X
        X = X.copy()
        X[:, list(self.columns)] *= weight
        return X


def _weighting(X: np.ndarray, weight: float, block: BlockWeights | None) -> np.ndarray:
    return X if block is None else block.apply(X, weight)


INNER_FOLDS = 4


def select_C(
    X: np.ndarray,
    y: np.ndarray,
    C_grid: Sequence[float],
    class_weight,
    val_fraction: float,
    rng: np.random.Generator,
    seed: int,
    block: BlockWeights | None = None,
    weight: float = 1.0,
) -> tuple[float, int]:
    """(best C, fits not converged) by balanced accuracy on a stratified held-out part of the training rows given (and
    only those); ``block``'s columns multiplied by ``weight`` after scaling."""
    tr, va = stratified_holdout(y, val_fraction, rng)
    scaler = StandardScaler().fit(X[tr])
    X_tr = _weighting(scaler.transform(X[tr]), weight, block)
    X_va = _weighting(scaler.transform(X[va]), weight, block)
    scores, not_converged = [], 0
    for C in C_grid:
        svm, nc = _fit_svm(X_tr, y[tr], C, class_weight, seed)
        not_converged += nc
        scores.append(balanced_accuracy(y[va], svm.predict(X_va)))
    return float(C_grid[int(np.argmax(scores))]), not_converged


def select_weight(
    X: np.ndarray,
    y: np.ndarray,
    block: BlockWeights,
    tune_C: Callable[[float], tuple[float, int]],
    class_weight,
    seed: int,
) -> tuple[float, int, float]:
    """(C, fits not converged, block weight) of a weighted row on the training rows given.

    For each weight of ``block.grid``, ``tune_C(weight)`` chooses C exactly as the paper's rows choose it (the same
    20 % hold-out), so weight 0 reproduces the radiomics-only row's model; the weight is then chosen by an inner
    stratified ``INNER_FOLDS``-fold CV of those models (pooled decision values' AUC, binary; balanced accuracy,
    multi-class): a single hold-out of a handful of minority cases picked it almost at random. Ties go to the
    smaller weight, so a block that helps nothing in the inner CV leaves the row at radiomics alone."""
    classes, counts = np.unique(y, return_counts=True)
    choices, not_converged = [], 0
    for w in block.grid:
        C, nc = tune_C(w)
        choices.append((C, w))
        not_converged += nc
    k = int(min(INNER_FOLDS, counts.min()))
    if k < 2:  # a class too small to cross-validate: no evidence for the block
        return choices[0][0], not_converged, choices[0][1]
    inner = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros((y.size, 1)), y))
    binary = classes.size == 2
    best, best_score = choices[0], -np.inf
    for C, w in choices:
        pred, score = np.empty_like(y), np.zeros(y.size)
        for tr, va in inner:
            p, d, svm_classes, nc = fit_predict(X[tr], y[tr], X[va], C, class_weight, seed, block, w)
            not_converged += nc
            pred[va] = p
            if binary:
                score[va] = d if svm_classes[1] == classes[1] else -d
        value = auc(y == classes[1], score) if binary else balanced_accuracy(y, pred)
        if value > best_score + 1e-12:
            best, best_score = (C, w), value
    return best[0], not_converged, best[1]


def fit_predict(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    C: float,
    class_weight,
    seed: int,
    block: BlockWeights | None = None,
    weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(predicted labels, decision values, svm classes, not converged) of a scaler + SVM fitted on training rows
    (``block``'s columns multiplied by ``weight`` after scaling)."""
    scaler = StandardScaler().fit(X_train)
    svm, nc = _fit_svm(_weighting(scaler.transform(X_train), weight, block), y_train, C, class_weight, seed)
    X_te = _weighting(scaler.transform(X_test), weight, block)
    return svm.predict(X_te), svm.decision_function(X_te), svm.classes_, nc


def fit_final(
    X: np.ndarray,
    y: np.ndarray,
    C_grid: Sequence[float] | None = None,
    class_weight: str | dict | None = "balanced",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Pipeline, float]:
    """(StandardScaler + LinearSVC fitted on all rows, chosen C): the protocol's recipe for a model to keep, C from
    the same inner split (stream ``default_rng(seed)``)."""
    if len(np.unique(y)) < 2:
        raise ValueError(f"need at least two classes to fit an SVM, got {np.unique(y).tolist()}")
    grid = list(DEFAULT_C_GRID if C_grid is None else C_grid)
    best_C, _ = select_C(X, y, grid, class_weight, val_fraction, np.random.default_rng(seed), seed)
    return make_pipeline(StandardScaler(), _svm(best_C, class_weight, seed)).fit(X, y), best_C


# ---------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ProtocolSettings:
    """The downstream protocol's settings (paper Section 3), built once from the config (``protocol`` in
    ``configs/evaluate.json`` and ``configs/supervised.json``) and passed as one object to every row: the SVM rows,
    the weighted rows, the saved SVM and the supervised baseline, so they cannot disagree.

    ``seeds``: the CV seeds (the saved SVM tunes its C with the first). ``block_weights``: the grid of a weighted
    row's SSL block (``BlockWeights``). ``positive_label``: the binary task's positive class (default: the
    minority). Values are checked here, before any data is read."""

    n_folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    label_fractions: tuple[float, ...] = (1.0, 0.5)
    C_grid: tuple[float, ...] = DEFAULT_C_GRID
    class_weight: str | dict | None = "balanced"
    val_fraction: float = 0.2
    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    positive_label: object = None
    block_weights: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)

    def __post_init__(self) -> None:
        fix = object.__setattr__
        fix(self, "seeds", tuple(int(v) for v in self.seeds))
        fix(self, "label_fractions", tuple(float(f) for f in self.label_fractions))
        fix(self, "C_grid", tuple(sorted(float(c) for c in (DEFAULT_C_GRID if self.C_grid is None else self.C_grid))))
        fix(self, "block_weights", tuple(float(w) for w in self.block_weights))
        if int(self.n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {list(self.seeds)}")
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"label fractions must be non-empty and in (0, 1], got {list(self.label_fractions)}")
        if not self.C_grid or min(self.C_grid) <= 0:
            raise ValueError(f"C_grid must be non-empty and positive, got {list(self.C_grid)}")
        if not 0 < float(self.val_fraction) < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if int(self.n_bootstrap) < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}")

    def svm_kwargs(self) -> dict:
        """Keyword arguments of :func:`run_protocol` (the SVM rows)."""
        return dict(n_folds=int(self.n_folds), seeds=self.seeds, label_fractions=self.label_fractions,
                    C_grid=self.C_grid, class_weight=self.class_weight, val_fraction=float(self.val_fraction),
                    positive_label=self.positive_label, n_bootstrap=int(self.n_bootstrap),
                    bootstrap_seed=int(self.bootstrap_seed))  # fmt: skip

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else py_scalar(v)) for k, v in self.__dict__.items()}


# ---------------------------------------------------------------------------------------------------------- protocol
@dataclass
class ProtocolResult:
    task: str  # "binary" | "multiclass"
    classes: np.ndarray
    positive_label: object
    minority_label: object
    y: np.ndarray
    runs: list[Run]
    summary: dict[str, dict[str, dict]]  # fraction key -> metric -> aggregates (see metrics.summarise)
    settings: dict

    def to_dict(self) -> dict:
        """JSON-ready view (numpy scalars/arrays turned into Python values)."""
        return {
            "task": self.task,
            "classes": self.classes.tolist(),
            "positive_label": py_scalar(self.positive_label),
            "minority_label": py_scalar(self.minority_label),
            "settings": self.settings,
            "summary": self.summary,
            "runs": [
                {
                    "seed": r.seed,
                    "fraction": r.fraction,
                    "best_C": r.best_C,
                    **({"best_weight": r.best_weight} if r.best_weight else {}),
                    "n_not_converged": r.n_not_converged,
                    "fold": None if r.fold is None else r.fold.tolist(),
                    "y_pred": r.y_pred.tolist(),
                    "scores": None if r.scores is None else np.round(r.scores, 6).tolist(),
                }
                for r in self.runs
            ],
        }


def _fit_split(X: np.ndarray, y: np.ndarray, split: Split, C_grid, class_weight, val_fraction: float, block=None):
    """(best C, best block weight, predicted labels, decision values, svm classes, fits not converged) of one
    split."""
    sub = split.subset
    if block is None:
        best_C, nc = select_C(X[sub], y[sub], C_grid, class_weight, val_fraction, split.rng, split.seed)
        w = 1.0
    else:

        def tune_C(w: float) -> tuple[float, int]:  # the paper's hold-out, the same draw for every weight
            rng = copy.deepcopy(split.rng)
            return select_C(X[sub], y[sub], C_grid, class_weight, val_fraction, rng, split.seed, block, w)

        best_C, nc, w = select_weight(X[sub], y[sub], block, tune_C, class_weight, split.seed)
    pred, decision, svm_classes, nc2 = fit_predict(
        X[sub], y[sub], X[split.test], best_C, class_weight, split.seed, block, w
    )
    return best_C, w, pred, decision, svm_classes, nc + nc2


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
    block: BlockWeights | None = None,
) -> ProtocolResult:
    """Stratified CV x seeds x label fractions of a linear SVM with C tuned inside each training fold (and, with
    ``block``, that block's weight tuned with it)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    C_grid = sorted(float(c) for c in C_grid)
    _check_svm(X, y, n_folds, seeds, label_fractions, C_grid, val_fraction)
    classes, positive, minority = task_labels(y, positive_label)
    binary = classes.size == 2

    runs: dict[tuple[int, int], Run] = {}
    progress = bar(total=len(seeds) * n_folds, desc=f"SVM protocol ({X.shape[1]} features)", unit="fold", leave=False)
    for seed in seeds:
        for j, f in enumerate(label_fractions):
            scores = np.zeros(y.size) if binary else np.zeros((y.size, classes.size))
            runs[seed, j] = Run(int(seed), float(f), np.empty_like(y), scores, np.full(y.size, -1), [], 0, [])
        for split in splits(y, n_folds, seed, label_fractions):
            if split.fraction_index == 0:
                progress.update(1)
            run, test = runs[seed, split.fraction_index], split.test
            best_C, w, pred, decision, svm_classes, nc = _fit_split(
                X, y, split, C_grid, class_weight, val_fraction, block
            )
            run.y_pred[test] = pred
            run.fold[test] = split.fold
            run.best_C.append(best_C)
            if block is not None:
                run.best_weight.append(w)
            run.n_not_converged += nc
            if binary:  # decision > 0 means svm_classes[1]; orient it towards the positive label
                run.scores[test] = decision if svm_classes[1] == positive else -decision
            else:
                run.scores[test] = decision[:, np.searchsorted(svm_classes, classes)]
    progress.close()
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
    if block is not None:
        settings["block_weights"] = {"n_columns": len(block.columns), "grid": list(block.grid)}
    run_list = list(runs.values())
    n_nc = sum(r.n_not_converged for r in run_list)
    if n_nc:
        logger.warning("%d LinearSVC fits stopped at max_iter=%d before converging", n_nc, SVM_MAX_ITER)
    summary = summarise(run_list, y, classes, positive, minority, n_bootstrap=n_bootstrap, seed=bootstrap_seed)
    return ProtocolResult(
        "binary" if binary else "multiclass", classes, positive, minority, y, run_list, summary, settings
    )


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
    ``metrics.compute_metrics`` (binary: score of the positive label). Its ids must be exactly the labelled cases.
    """
    y = np.asarray(y)
    classes, positive, minority = task_labels(y, positive_label)
    order = {i: k for k, i in enumerate(ids)}
    runs = []
    for n, rec in enumerate(records):
        what = f"{name} predictions #{n} (seed {rec.get('seed')}, fraction {rec.get('fraction')})"
        rec_ids = [str(i) for i in rec["ids"]]
        missing, extra = set(order) - set(rec_ids), set(rec_ids) - set(order)
        if missing or extra or len(rec_ids) != len(set(rec_ids)):
            raise ValueError(
                f"{what}: ids do not match the labelled cases; missing: {listing(missing) or '-'}; "
                f"extra: {listing(extra) or '-'}; duplicates: {len(rec_ids) - len(set(rec_ids))}"
            )
        perm = np.array([order[i] for i in rec_ids])
        y_pred = np.empty_like(y)
        y_pred[perm] = [find_label(classes, v, f"{what}: predicted label") for v in rec["y_pred"]]
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
