"""scripts.downstream.protocol / metrics / evaluation / representation: the downstream CV protocol, its metrics, the
table join and the representation analyses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from scripts.downstream.feature_sets import load_and_join
from scripts.downstream.metrics import compute_metrics, paired_difference, resample_metrics
from scripts.downstream.protocol import run_protocol, stratified_holdout, stratified_subset, summarise_predictions
from scripts.downstream.representation import cluster_agreement, correlation_density
from scripts.feature_table import write_feature_table

FAST = dict(seeds=(0,), C_grid=(0.01, 1.0), n_bootstrap=50)


def _labels(counts: dict[int, int], seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(seed).permutation(y)


# ----------------------------------------------------------------------------------------------------------- metrics
def test_separable_feature_gives_perfect_sensitivity_and_specificity():
    y = _labels({0: 12, 1: 36})
    rng = np.random.default_rng(1)
    X = np.c_[y + 0.05 * rng.normal(size=y.size), rng.normal(size=(y.size, 3))]
    res = run_protocol(X, y, positive_label=1, **FAST)
    assert res.task == "binary" and res.positive_label == 1
    for f in ("1.0", "0.5"):
        s = res.summary[f]
        for m in ("sensitivity", "specificity", "balanced_accuracy", "auc"):
            assert s[m]["folds"]["mean"] == 1.0 and s[m]["folds"]["n"] == 5, (f, m)
            assert s[m]["pooled"] == pytest.approx(1.0) and s[m]["ci95"] == pytest.approx(
                [1.0, 1.0]
            )  # AUC: sklearn sums trapezoids


def test_pure_noise_gives_chance_balanced_accuracy():
    y = _labels({0: 60, 1: 120})
    X = np.random.default_rng(2).normal(size=(y.size, 5))
    res = run_protocol(X, y, seeds=(0, 1), C_grid=(0.01, 1.0), n_bootstrap=100)
    for f in ("1.0", "0.5"):
        s = res.summary[f]
        assert 0.35 <= s["balanced_accuracy"]["pooled"] <= 0.65
        assert 0.35 <= s["auc"]["pooled"] <= 0.65
        lo, hi = s["balanced_accuracy"]["ci95"]
        assert lo < 0.5 < hi + 0.05
    assert res.positive_label == 0  # default positive label: the minority class


def test_multiclass_separable_known_answer():
    y = _labels({1: 30, 2: 10, 3: 20})
    centres = {1: [0, 0], 2: [10, 0], 3: [0, 10]}
    X = np.array([centres[c] for c in y], float) + 0.3 * np.random.default_rng(3).normal(size=(y.size, 2))
    res = run_protocol(X, y, **FAST)
    assert res.task == "multiclass" and res.minority_label == 2
    s = res.summary["1.0"]
    for m in ("accuracy", "minority_accuracy", "balanced_accuracy", "auc", "recall_1", "recall_2", "recall_3"):
        assert s[m]["pooled"] == 1.0, m


def test_compute_metrics_by_hand_and_against_sklearn():
    classes = np.array([0, 1, 2])
    y_true, y_pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    m = compute_metrics(y_true, y_pred, None, classes, None, minority_label=2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["minority_accuracy"] == 1.0
    assert m["recall_0"] == pytest.approx(2 / 3) and m["recall_1"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert math.isnan(m["auc"])

    rng = np.random.default_rng(4)
    yb = rng.integers(0, 2, 50)
    score = np.round(rng.normal(size=50) + yb, 1)  # rounded: ties must count one half, as in sklearn
    b = compute_metrics(yb, (score > 0.5).astype(int), score, np.array([0, 1]), 1, minority_label=0)
    assert b["auc"] == pytest.approx(roc_auc_score(yb, score))
    assert b["sensitivity"] == pytest.approx(np.mean(score[yb == 1] > 0.5))
    assert b["specificity"] == pytest.approx(np.mean(score[yb == 0] <= 0.5))


# ------------------------------------------------------------------------------------------------ splits and leakage
def test_folds_are_stratified():
    y = _labels({0: 23, 1: 47})
    res = run_protocol(np.random.default_rng(5).normal(size=(y.size, 3)), y, **FAST)
    for run in res.runs:
        assert sorted(np.unique(run.fold)) == [0, 1, 2, 3, 4]
        for k in range(5):
            for c, n in ((0, 23), (1, 47)):
                assert abs(np.sum(y[run.fold == k] == c) - n / 5) <= 1


def test_subsample_and_holdout_keep_class_ratios():
    y = _labels({0: 20, 1: 61, 2: 9})
    rng = np.random.default_rng(6)
    sub = stratified_subset(y, 0.5, rng)
    assert len(set(sub)) == sub.size
    assert {c: int(np.sum(y[sub] == c)) for c in (0, 1, 2)} == {0: 10, 1: 31, 2: 5}
    assert np.array_equal(stratified_subset(y, 1.0, rng), np.arange(y.size))
    tr, va = stratified_holdout(y, 0.2, rng)
    assert np.intersect1d(tr, va).size == 0 and tr.size + va.size == y.size
    assert {c: int(np.sum(y[va] == c)) for c in (0, 1, 2)} == {0: 4, 1: 12, 2: 2}


def test_scaler_and_C_selection_never_see_test_rows(monkeypatch):
    """Record the rows every StandardScaler.fit and LinearSVC.fit sees (column 0 holds the row index) and check them
    against the test fold of the (seed, fold) they belong to; loop order is seed -> fold -> fraction."""
    y = _labels({0: 15, 1: 35})
    X = np.c_[np.arange(y.size), np.random.default_rng(7).normal(size=(y.size, 3)) + y[:, None]]
    scaler_fits, svm_fits, transformed = [], [], []
    fit, transform, svm_fit = StandardScaler.fit, StandardScaler.transform, LinearSVC.fit

    def rec_fit(self, data, *a, **k):
        scaler_fits.append(set(data[:, 0].astype(int)))
        return fit(self, data, *a, **k)

    def rec_transform(self, data, *a, **k):
        out = transform(self, data, *a, **k)
        transformed.append((out, set(data[:, 0].astype(int))))
        return out

    def rec_svm_fit(self, data, *a, **k):
        rows = [r for out, r in transformed if out is data]
        assert len(rows) == 1, "LinearSVC fitted on an array that is not a scaler output"
        svm_fits.append(rows[0])
        return svm_fit(self, data, *a, **k)

    monkeypatch.setattr(StandardScaler, "fit", rec_fit)
    monkeypatch.setattr(StandardScaler, "transform", rec_transform)
    monkeypatch.setattr(LinearSVC, "fit", rec_svm_fit)
    C_grid = (0.01, 0.1, 1.0)
    res = run_protocol(X, y, seeds=(0, 1), C_grid=C_grid, label_fractions=(1.0, 0.5), n_bootstrap=0)

    n_fr = 2
    assert len(scaler_fits) == 2 * 5 * n_fr * 2 and len(svm_fits) == 2 * 5 * n_fr * (len(C_grid) + 1)
    for s in range(2):
        fold_of = res.runs[s * n_fr].fold
        for k in range(5):
            test = set(np.flatnonzero(fold_of == k))
            g = s * 5 + k
            scal = scaler_fits[g * n_fr * 2 : (g + 1) * n_fr * 2]
            svms = svm_fits[g * n_fr * (len(C_grid) + 1) : (g + 1) * n_fr * (len(C_grid) + 1)]
            assert all(not (rows & test) for rows in scal + svms), f"seed {s} fold {k}: test rows leaked"
            train = set(range(y.size)) - test
            assert scal[1] == train  # fraction 1.0: the refit uses the whole training fold
            assert scal[0] < train and len(scal[0]) == pytest.approx(0.8 * len(train), abs=2)  # inner-train only
            half = scal[3]  # fraction 0.5 refit: half of each class of the training fold
            for c in (0, 1):
                n_c = sum(y[i] == c for i in train)
                assert sum(y[i] == c for i in half) == math.floor(n_c / 2 + 0.5)


def test_test_fold_outlier_cannot_change_its_own_predictions():
    y = _labels({0: 15, 1: 35})
    X = np.random.default_rng(8).normal(size=(y.size, 4)) + 0.7 * y[:, None]
    base = run_protocol(X, y, seeds=(0,), C_grid=(0.01, 0.1, 1.0), n_bootstrap=0)
    fold = base.runs[0].fold
    test0 = np.flatnonzero(fold == 0)
    X2 = X.copy()
    X2[test0[:2]] = 1e6  # wild outliers in fold 0's test rows
    moved = run_protocol(X2, y, seeds=(0,), C_grid=(0.01, 0.1, 1.0), n_bootstrap=0)
    others = np.flatnonzero(fold != 0)
    for a, b in zip(base.runs, moved.runs):
        assert np.array_equal(a.fold, b.fold)
        # fold 0's model never saw its test rows, so its other test predictions are bit-identical
        assert np.array_equal(a.scores[test0[2:]], b.scores[test0[2:]])
        # ... while the folds that train on the outliers do change (the check has teeth)
        assert not np.allclose(a.scores[others], b.scores[others])


# ------------------------------------------------------------------------------------------------------------ errors
def test_protocol_errors_name_the_problem():
    X = np.zeros((20, 2))
    with pytest.raises(ValueError, match="only one class"):
        run_protocol(X, np.ones(20, int), **FAST)
    y = np.array([0] * 16 + [1] * 4)
    with pytest.raises(ValueError, match=r"class 1 has 4 cases, fewer than n_folds=5"):
        run_protocol(X, y, **FAST)
    with pytest.raises(ValueError, match=r"class 1 has 5 cases.*label fraction 0.3.*only 1 of them"):
        run_protocol(np.zeros((21, 2)), np.array([0] * 16 + [1] * 5), n_folds=5, label_fractions=(1.0, 0.3), **FAST)
    with pytest.raises(ValueError, match=r"class 'b' has 4 cases.*label fraction 0.5.*only 1"):
        run_protocol(np.zeros((20, 2)), np.array(["a"] * 16 + ["b"] * 4), n_folds=3, **FAST)
    with pytest.raises(ValueError, match="positive_label 7"):
        run_protocol(np.random.default_rng(0).normal(size=(20, 2)), np.array([0, 1] * 10), positive_label=7, **FAST)


# ----------------------------------------------------------------------------------------------------------- joining
def _table(path, ids, values, cols=None):
    values = np.asarray(values, float)
    write_feature_table(path, ids, cols or [f"f{i}" for i in range(values.shape[1])], values, {"what": "test"})
    return path


def test_load_and_join_orders_concatenates_and_prefixes(tmp_path):
    labels = {"c3": 1, "c1": 0, "c2": 1}
    trad = _table(tmp_path / "trad.csv", ["c2", "c1", "c3"], [[2, 20], [1, 10], [3, 30]], ["a", "b"])
    ssl = _table(tmp_path / "ssl.csv", ["c1", "c3", "c2", "u9"], [[-1], [-3], [-2], [-9]], ["a"])
    fs = load_and_join({"trad": str(trad), "trad+ssl": [trad, ssl]}, labels, unlabelled=["u9"])
    assert fs.ids == ["c1", "c2", "c3"] and fs.y.tolist() == [0, 1, 1]
    assert fs.X["trad"].tolist() == [[1, 10], [2, 20], [3, 30]]
    assert fs.X["trad+ssl"].tolist() == [[1, 10, -1], [2, 20, -2], [3, 30, -3]]
    assert fs.columns["trad+ssl"] == ["trad:a", "trad:b", "ssl:a"] and fs.columns["trad"] == ["a", "b"]
    assert fs.excluded_unlabelled == ["u9"]


def test_join_errors_list_missing_and_extra_ids(tmp_path):
    labels = {f"case{i:02d}": i % 2 for i in range(30)}
    partial = _table(tmp_path / "partial.csv", [f"case{i:02d}" for i in range(5)], np.zeros((5, 1)))
    with pytest.raises(
        ValueError,
        match=r"'ssl'.*partial\.csv lacks 25 labelled cases: case05, case06.*"
        r"and 5 more \(25 in all\)",
    ):
        load_and_join({"ssl": partial}, labels)
    extra = _table(tmp_path / "extra.csv", [*labels, "ghost1", "ghost2"], np.zeros((32, 1)))
    with pytest.raises(ValueError, match=r"extra\.csv has 2 cases that are not labelled cases: ghost1, ghost2"):
        load_and_join({"ssl": extra}, labels)


def test_join_rejects_nan_and_inf_naming_cases_and_columns(tmp_path):
    bad = _table(tmp_path / "bad.csv", ["a", "b", "c"], [[0, 1], [np.nan, 1], [0, np.inf]], ["x", "y"])
    with pytest.raises(ValueError, match=r"bad\.csv has NaN/Inf.*cases: b, c; columns: x, y"):
        load_and_join({"t": bad}, {"a": 0, "b": 1, "c": 0})


# -------------------------------------------------------------------------------------------- external predictions
def test_external_predictions_summarised_like_a_protocol_run():
    y = _labels({0: 10, 1: 30})
    ids = [f"id{i}" for i in range(y.size)]
    res = run_protocol(np.c_[y + 0.8 * np.random.default_rng(9).normal(size=y.size)], y, **FAST)
    run = res.runs[0]
    perm = np.random.default_rng(1).permutation(y.size)  # records may list cases in any order
    rec = {
        "fraction": 1.0,
        "seed": 0,
        "ids": [ids[i] for i in perm],
        "y_pred": run.y_pred[perm].tolist(),
        "scores": run.scores[perm].tolist(),
        "fold": run.fold[perm].tolist(),
    }
    ext = summarise_predictions(ids, y, [rec], n_bootstrap=50)
    assert ext.summary["1.0"] == res.summary["1.0"]
    with pytest.raises(ValueError, match=rf"missing: {ids[perm[0]]}; extra: x"):
        summarise_predictions(ids, y, [dict(rec, ids=["x"] + rec["ids"][1:])], n_bootstrap=0)


# ------------------------------------------------------------------------------------------- representation analyses
def test_cluster_agreement_and_correlation_density():
    rng = np.random.default_rng(10)
    y = _labels({0: 20, 1: 40})
    X = np.c_[10 * y + rng.normal(size=y.size), 10 * y + rng.normal(size=y.size)]
    ca = cluster_agreement(X, y)
    assert ca["ari"] == 1.0 and ca["nmi"] == pytest.approx(1.0) and ca["k"] == 2

    a, b = rng.normal(size=50), rng.normal(size=50)
    X = np.c_[a, np.full(50, 3.0), 2 * a + 0.1 * rng.normal(size=50), b]
    r = correlation_density(X)
    expected = np.corrcoef(np.c_[X[:, 0], X[:, 2], X[:, 3]], rowvar=False)[np.triu_indices(3, 1)]
    assert r.shape == (3,) and np.allclose(r, expected)


# ------------------------------------------------------------------------------------------------ paired difference
def _paired(X_a: np.ndarray, X_b: np.ndarray, y: np.ndarray, n_bootstrap: int = 50) -> dict:
    kw = dict(seeds=(0, 1), C_grid=(0.01, 1.0), n_bootstrap=0, positive_label=1)
    a, b = run_protocol(X_a, y, **kw), run_protocol(X_b, y, **kw)
    return paired_difference(a.runs, b.runs, y, a.classes, 1, a.minority_label, n_bootstrap=n_bootstrap, seed=0)


def test_paired_difference_of_identical_feature_sets_is_zero_with_ci_zero():
    y = _labels({0: 12, 1: 28})
    X = np.c_[y + np.random.default_rng(2).normal(size=y.size), np.random.default_rng(3).normal(size=(y.size, 3))]
    diff = _paired(X, X.copy(), y)
    assert set(diff) == {"1.0", "0.5"}
    for metrics in diff.values():
        assert set(metrics) == {"sensitivity", "specificity", "balanced_accuracy", "auc"}
        for m in metrics.values():
            assert m["difference"] == 0.0 and m["ci95"] == [0.0, 0.0]


def test_paired_difference_of_a_strongly_better_set_is_above_zero():
    y = _labels({0: 15, 1: 30}, seed=4)
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(y.size, 3))
    better = np.c_[2.5 * y + 0.3 * rng.normal(size=y.size), noise]  # separable plus the same noise columns
    diff = _paired(better, noise, y)
    for f in ("1.0", "0.5"):
        for m in ("balanced_accuracy", "auc"):
            d = diff[f][m]
            assert d["difference"] > 0.3 and d["ci95"][0] > 0, (f, m, d)
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]


def test_paired_difference_needs_the_same_folds():
    y = _labels({0: 10, 1: 20})
    X = np.random.default_rng(6).normal(size=(y.size, 2))
    a = run_protocol(X, y, seeds=(0,), C_grid=(1.0,), n_bootstrap=0)
    b = run_protocol(X, y, seeds=(1,), C_grid=(1.0,), n_bootstrap=0)
    with pytest.raises(ValueError, match="different seeds"):
        paired_difference(a.runs, b.runs, y, a.classes, a.positive_label, a.minority_label, n_bootstrap=10)


def test_metrics_are_nan_not_a_crash_when_a_class_is_missing():
    classes = np.array([0, 1])
    m = compute_metrics(np.array([1, 1, 1]), np.array([1, 0, 1]), np.array([0.9, 0.1, 0.8]), classes, 1, 0)
    assert m["sensitivity"] == pytest.approx(2 / 3) and math.isnan(m["specificity"]) and math.isnan(m["auc"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # mean recall over the classes present
    three = np.array([0, 1, 2])
    m3 = compute_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), np.eye(3)[[0, 2, 1]], three, None, 2)
    assert math.isnan(m3["minority_accuracy"]) and math.isnan(m3["auc"]) and m3["recall_0"] == 0.5


def test_bootstrap_metrics_are_sklearns():
    """The bootstrap's count-and-rank metrics equal the scikit-learn ones, missing classes (NaN) included."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        k = 2 if trial % 2 else 3
        n = int(rng.integers(4, 40))
        classes = np.arange(k)
        y = rng.integers(0, k - (trial % 5 == 0), n)  # every fifth trial lacks the last class
        pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
        scores = np.round(rng.normal(size=n) + y, 1) if k == 2 else np.round(rng.normal(size=(n, k)), 1)
        args = (y, pred, scores, classes, 1 if k == 2 else None, k - 1)
        fast, ref = resample_metrics(*args), compute_metrics(*args)
        assert fast.keys() == ref.keys()
        for m in ref:
            assert (math.isnan(fast[m]) and math.isnan(ref[m])) or fast[m] == pytest.approx(ref[m], abs=1e-12), m
