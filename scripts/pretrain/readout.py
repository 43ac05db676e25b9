"""Label-using read-outs of frozen embeddings, and a label-free quality monitor.

These never train the encoder; they say whether what it learnt separates the phenotypes:

* ``knn_balanced_accuracy`` — leave-one-out cosine kNN (the cheapest read-out, no fitting);
* ``probe_scores`` — a linear probe (standardised logistic regression, balanced class weights) scored
  out-of-fold on a fixed stratified split, the usual "linear evaluation" of self-supervised learning;
* ``effective_rank`` — RankMe (Garrido et al., ICML 2023): exp of the entropy of the normalised singular
  values. No labels. It sees *dimensional* collapse (all embeddings in a low-dimensional subspace), which the
  mean std of ``collapse_std`` does not.

Plain NumPy / scikit-learn; no Ignite, no config.
"""

from __future__ import annotations

import numpy as np


def knn_balanced_accuracy(z: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """Leave-one-out cosine kNN balanced accuracy (majority vote of the ``k`` nearest other cases)."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y)
    z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, : min(k, len(y) - 1)]
    classes = np.unique(y)
    votes = np.stack([(y[nn] == c).sum(1) for c in classes], axis=1)
    pred = classes[votes.argmax(1)]
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes]))


def effective_rank(z: np.ndarray) -> float:
    """RankMe: exp(entropy of the singular values of the centred ``z`` normalised to sum 1); 1 to min(N-1, D).

    1 means every embedding lies on one line (complete dimensional collapse); ``min(N-1, D)`` means the
    embeddings spread evenly over every available direction. We centre first (unlike RankMe), so a large common
    offset, which every cosine read-out sees but which carries no information, cannot pass for one good dimension.
    """
    z = np.asarray(z, dtype=np.float64)
    z = z - z.mean(axis=0, keepdims=True)
    if z.ndim != 2 or min(z.shape) < 2:
        return float("nan")
    s = np.linalg.svd(z, compute_uv=False)
    if not np.isfinite(s).all() or s.sum() <= 0:
        return float("nan")
    p = s / s.sum() + 1e-12
    return float(np.exp(-(p * np.log(p)).sum()))


def stratified_folds(y: np.ndarray, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed stratified split: the same (train, test) index pairs for every read-out of one run."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    n_folds = max(2, min(n_folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min())))
    return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


PROBE_C = 0.1  # the monitor's fixed probe C (docs/learning.md: "The probe's C")
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


def check_probe_c(c: float | str) -> float | str:
    """``c`` as ``probe_scores`` takes it: a positive number, or ``"auto"``; anything else is refused by value."""
    if isinstance(c, str) and c.strip().lower() == "auto":
        return "auto"
    try:
        value = float(c)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"probe C must be a positive number or 'auto', got {c!r}")
    return value


def _probe(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))


def fit_probe(z: np.ndarray, y: np.ndarray, c: float | str = PROBE_C):
    """The probe (scaler + balanced logistic regression) fitted on these rows; ``c="auto"`` tunes C on them."""
    return _probe(tuned_probe_c(z, y) if c == "auto" else c).fit(z, y)


def tuned_probe_c(z: np.ndarray, y: np.ndarray, grid=PROBE_C_GRID, n_folds: int = 4) -> float:
    """The C of ``grid`` with the best inner out-of-fold AUC (binary) or balanced accuracy, on these cases only.

    Called on an outer training fold, so the outer test fold never chooses its own C. Ties go to the smaller C
    (stronger regularisation). A class with a single case cannot be cross-validated: ``PROBE_C`` then."""
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        return PROBE_C
    inner = stratified_folds(y, n_folds, seed=1)
    metric = "probe_auc" if len(classes) == 2 else "probe_balanced_accuracy"
    best, best_score = grid[0], -np.inf
    for c in grid:
        value = probe_scores(z, y, inner, c)[metric]
        if value > best_score + 1e-12:
            best, best_score = c, value
    return float(best)


def probe_scores(
    z: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None,
    c: float | str = PROBE_C,
) -> dict[str, float]:
    """Out-of-fold linear-probe ROC AUC and balanced accuracy (binary) or balanced accuracy (multi-class).

    The scaler and the logistic regression are fitted on each training fold only; predictions of the test folds
    are pooled, so each case is scored once by a probe that never saw it. ``c`` is the inverse L2 strength:
    strong-ish regularisation (0.1, the monitor's default) suits a few dozen cases and 256 features, and is too
    strong for a cohort of a thousand (docs/learning.md); ``"auto"`` picks it per training fold from
    ``PROBE_C_GRID`` by an inner cross-validation (``tuned_probe_c``), as the downstream SVM tunes its C.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    c = check_probe_c(c)
    z = np.nan_to_num(np.asarray(z, dtype=np.float64))
    y = np.asarray(y)
    classes = np.unique(y)
    if len(classes) < 2:
        return {"probe_auc": float("nan"), "probe_balanced_accuracy": float("nan")}
    if np.unique(y, return_counts=True)[1].min() < 2:  # a class with one case cannot be in a training and a test fold
        return {"probe_auc": float("nan"), "probe_balanced_accuracy": float("nan")}
    folds = folds if folds is not None else stratified_folds(y)
    pred = np.empty(len(y), dtype=y.dtype)
    score = np.zeros(len(y))
    for train, test in folds:
        model = fit_probe(z[train], y[train], c)
        pred[test] = model.predict(z[test])
        if len(classes) == 2:
            score[test] = model.decision_function(z[test])
    out = {"probe_balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    out["probe_auc"] = float(roc_auc_score(y == classes[1], score)) if len(classes) == 2 else float("nan")
    return out


def readout(
    z: np.ndarray, y: np.ndarray | None, folds=None, k: int = 5, probe_c: float | str = PROBE_C
) -> dict[str, float]:
    """Every monitor figure of one set of embeddings: RankMe always, kNN and probe when labels allow."""
    out = {"effective_rank": effective_rank(z)}
    if y is not None and len(y) >= 3 and len(np.unique(y)) >= 2:
        out["knn_balanced_accuracy"] = knn_balanced_accuracy(z, y, k)
        out.update(probe_scores(z, y, folds, probe_c))
    return out


def readout_items(datalist: str, data_root: str | None = None) -> list[dict]:
    """The labelled cases the validation read-out scores, labels mapped to class indices 0..C-1.

    The datalist's ``validation`` section when it has labelled cases, else the labelled ``training`` cases
    (pretraining never reads labels, so reading out on them tests the representation, not a fit). Classes are
    ordered by their text, the order ``label_map`` keys use. Cases without a label are left out.
    """
    from scripts.data.datalist import load_datalist

    for name in ("validation", "training"):
        items = load_datalist(datalist, name, data_root, labels="labelled", allow_empty=True)
        classes = sorted({str(i["label"]) for i in items}, key=lambda c: (len(c), c))
        if len(classes) >= 2:
            for i in items:
                i["label"] = classes.index(str(i["label"]))
            return items
    return []


def without_labels(items: list[dict]) -> list[dict]:
    """``items`` without their labels: what pretraining reads (it never sees a label), and the form under which the
    read-out shares pretraining's cache entries (its labels are attached after the cache, ``AttachLabels``)."""
    return [{k: v for k, v in item.items() if k != "label"} for item in items]


class AttachLabels:
    """Adds each case's read-out label (``readout_items``) to its preprocessed dict, by case id.

    Deliberately a plain callable, not a MONAI ``Transform``: ``PersistentDataset`` caches up to the first object
    that is not one, so the label is applied to the cached entry on every read and never written into the cache
    that pretraining reads.
    """

    def __init__(self, items: list[dict]) -> None:
        self.labels = {str(item["id"]): item["label"] for item in items}

    def __call__(self, data: dict) -> dict:
        case = str(data["id"])
        if case not in self.labels:
            raise KeyError(f"read-out case {case!r} has no label")
        return {**data, "label": self.labels[case]}
