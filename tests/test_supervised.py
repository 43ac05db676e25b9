"""scripts.downstream.supervised: the supervised baseline on the SVM protocol's folds, its records, cache/resume and errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from torch import nn

import scripts.downstream.protocol as protocol
from scripts.data.datalist import read_labels
from scripts.downstream.evaluation import evaluate
from scripts.downstream.protocol import ProtocolSettings, run_protocol, summarise_predictions
from scripts.downstream.supervised import (
    TrainSettings,
    class_weights,
    prepare_cohort,
    run_supervised,
    select_labelled,
)
from scripts.feature_table import meta_path, write_feature_table
from scripts.pretrain.augment import view_transforms

ROOT = Path(__file__).resolve().parent.parent
SIZE = 27  # the smallest volume Encoder3D takes


class TinyEncoder(nn.Module):
    """A cheap stand-in for Encoder3D (the protocol code is under test here; the bundle test below trains the real
    encoder): mean intensity of 27 blocks -> 8 features, with BatchNorm like the real one. A narrow Encoder3D is no
    cheaper: PyTorch's CPU convolution backward takes a slow path below ~16 channels."""

    feature_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.AvgPool3d(9), nn.Flatten(), nn.Linear(27, 8), nn.BatchNorm1d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


FAST = TrainSettings(epochs=6, batch_size=4, learning_rate=3e-3)


def _items(labels: list, seed: int = 0) -> list[dict]:
    """In-memory preprocessed cases whose label is learnable: class c has a bright cube of side 3 + 3c."""
    rng = np.random.default_rng(seed)
    items = []
    for i, lab in enumerate(labels):
        img = rng.normal(60.0, 15.0, (1, SIZE, SIZE, SIZE)).astype(np.float32)
        r = 3 + 3 * sorted(set(labels)).index(lab)
        c = SIZE // 2
        img[:, c - r : c + r, c - r : c + r, c - r : c + r] += 120.0
        items.append({"id": f"case{i:03d}", "image": torch.from_numpy(img), "label": lab})
    return items


def _binary_labels(n_pos: int = 14, n_neg: int = 7, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).permutation([1] * n_pos + [0] * n_neg).tolist()


@pytest.fixture
def one_thread():
    """The stand-in network's ops are tiny: with two threads on a loaded machine every op waits for the other thread
    to be scheduled (tens of ms per op), one thread keeps these tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(cohort, **kw):
    kw = {"n_folds": 3, "settings": FAST, "positive_label": 1, "make_encoder": TinyEncoder, **kw}
    return run_supervised(cohort, **kw)


# ------------------------------------------------------------------------------------------------------------ pieces
def test_class_weights_are_balanced_inverse_frequency():
    y = np.array([0, 0, 0, 1])
    w = class_weights(y, np.array([0, 1]))
    np.testing.assert_allclose(w, [4 / 6, 4 / 2])
    assert w[y].sum() == pytest.approx(y.size)  # same total weight as an unweighted loss
    assert w[1] / w[0] == pytest.approx(3.0)  # the 1-case class weighs as much as the 3-case class
    np.testing.assert_allclose(
        class_weights(np.array(["b", "a", "a", "c"]), np.array(["a", "b", "c"])), [2 / 3, 4 / 3, 4 / 3]
    )
    with pytest.raises(ValueError, match=r"\[2\] have no case"):
        class_weights(y, np.array([0, 1, 2]))


def test_splits_are_the_svm_protocols(monkeypatch):
    """One split generator for both: the SVM rows draw exactly the folds and label-fraction subsamples of
    ``protocol.splits`` (spy on the subsample each fit is given), which is what the supervised baseline trains on."""
    y = np.random.default_rng(0).permutation([0] * 11 + [1] * 29)
    given = []
    real = protocol._fit_split

    def spy(X, y_, split, *args):
        given.append((split.seed, split.fold, split.fraction, split.subset.copy(), split.test.copy()))
        return real(X, y_, split, *args)

    monkeypatch.setattr(protocol, "_fit_split", spy)
    X = np.random.default_rng(1).normal(size=(y.size, 3))
    res = run_protocol(X, y, n_folds=4, seeds=(0, 5), label_fractions=(1.0, 0.5), C_grid=(1.0,), n_bootstrap=0)
    ours = [s for seed in (0, 5) for s in protocol.splits(y, 4, seed, (1.0, 0.5))]
    assert len(ours) == len(given) == 16
    for split, (seed, fold, fraction, subset, test) in zip(ours, given):
        assert (split.seed, split.fold, split.fraction) == (seed, fold, fraction)
        np.testing.assert_array_equal(split.subset, subset)
        np.testing.assert_array_equal(split.test, test)
        run = next(r for r in res.runs if r.seed == split.seed and r.fraction == split.fraction)
        np.testing.assert_array_equal(np.flatnonzero(run.fold == split.fold), split.test)
    half = [s for s in ours if s.fraction == 0.5]
    assert all(s.subset.size < s.train.size for s in half)


# --------------------------------------------------------------------------------------------------------- protocol
def test_records_learn_the_signal_on_the_protocols_folds(one_thread):
    cohort = prepare_cohort(_items(_binary_labels()))
    assert cohort.ids == sorted(cohort.ids) and cohort.images.shape == (21, 1, SIZE, SIZE, SIZE)
    records, info = _run(cohort, settings=TrainSettings(epochs=15, batch_size=4, learning_rate=3e-3))
    assert len(info["trained"]) == 6 and not info["reused"]
    assert [(r["seed"], r["fraction"]) for r in records] == [(0, 1.0), (0, 0.5)]
    svm = run_protocol(
        np.zeros((21, 1)) + np.arange(21)[:, None], cohort.y, n_folds=3, seeds=(0,), C_grid=(1.0,), n_bootstrap=0
    )
    for rec in records:
        assert set(rec) == {"seed", "fraction", "ids", "y_pred", "scores", "fold"}
        assert rec["ids"] == cohort.ids and set(rec["y_pred"]) <= {0, 1}
        assert all(0.0 <= s <= 1.0 for s in rec["scores"])
        assert rec["fold"] == next(r.fold for r in svm.runs if r.fraction == rec["fraction"]).tolist()
    json.dumps(records)  # plain JSON
    res = summarise_predictions(cohort.ids, cohort.y, records, positive_label=1, n_bootstrap=0)
    full = res.summary["1.0"]
    assert full["balanced_accuracy"]["folds"]["n"] == 3
    assert full["auc"]["pooled"] > 0.8 and full["balanced_accuracy"]["pooled"] > 0.7  # scores face the positive label


def test_multiclass_scores_are_probabilities_in_sorted_class_order(one_thread):
    labels = np.random.default_rng(2).permutation([2] * 8 + [5] * 6 + [9] * 4).tolist()
    cohort = prepare_cohort(_items(labels))
    records, _ = _run(cohort, label_fractions=(1.0,), settings=TrainSettings(epochs=1, batch_size=4))
    scores = np.asarray(records[0]["scores"])
    assert scores.shape == (18, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    res = summarise_predictions(cohort.ids, cohort.y, records, n_bootstrap=0)
    assert res.task == "multiclass" and res.minority_label == 9
    y = cohort.y
    pred = np.array([2, 5, 9])[scores.argmax(axis=1)]
    assert pred.tolist() == records[0]["y_pred"]  # column k is class k of the sorted classes
    assert res.summary["1.0"]["accuracy"]["pooled"] == pytest.approx(float(np.mean(pred == y)))


def test_deterministic_and_resumable(tmp_path, one_thread):
    cohort = prepare_cohort(_items(_binary_labels(8, 4)))
    settings = TrainSettings(epochs=2, batch_size=4)
    # the bundle's augmentation without its two slowest (Gaussian filter) parts, to keep the test fast
    augment = functools.partial(view_transforms, "image", (SIZE,) * 3, prob_sharpen=0.0, prob_blur=0.0)
    first, info = _run(cohort, settings=settings, make_augment=augment, cache_dir=tmp_path / "a")
    assert len(info["trained"]) == 6
    again, info = _run(cohort, settings=settings, make_augment=augment, cache_dir=tmp_path / "b")
    assert again == first and len(info["trained"]) == 6  # same seed, fresh cache: identical predictions
    plain, _ = _run(cohort, settings=settings)
    assert plain[0]["scores"] != first[0]["scores"]  # the augmentation is applied (and is part of the cache key)

    parts = sorted((tmp_path / "a").glob("*.json"))
    assert len(parts) == 6
    parts[3].unlink()  # as if the run had been killed before this (seed, fold, fraction)
    resumed, info = _run(cohort, settings=settings, make_augment=augment, cache_dir=tmp_path / "a")
    assert len(info["trained"]) == 1 and len(info["reused"]) == 5 and resumed == first

    _, info = _run(
        cohort, settings=TrainSettings(epochs=1, batch_size=4), cache_dir=tmp_path / "a", label_fractions=(1.0,)
    )
    assert len(info["trained"]) == 3 and not info["reused"]  # other settings: the cached results are stale


# ----------------------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="only one class"):
        _run(prepare_cohort(_items([1] * 6)))
    with pytest.raises(ValueError, match=r"class 0 has 2 cases, fewer than n_folds=3"):
        _run(prepare_cohort(_items([0, 0] + [1] * 6)))
    items = _items([0, 1] * 4)
    items[3]["label"] = None
    del items[5]["label"]
    with pytest.raises(ValueError, match="2 cases have no label: case003, case005"):
        prepare_cohort(items)
    kept, excluded = select_labelled(items, "exclude")
    assert len(kept) == 6 and excluded == ["case003", "case005"]
    dup = _items([0, 1, 0, 1])
    dup[2]["id"] = "case000"
    with pytest.raises(ValueError, match="case id 'case000' appears more than once"):
        prepare_cohort(dup)
    bad = _items([0, 1, 0, 1])
    bad[1]["image"] = torch.zeros(1, SIZE, SIZE, SIZE + 1)
    with pytest.raises(ValueError, match="differ in shape.*case001"):
        prepare_cohort(bad)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        TrainSettings(batch_size=1)


# ----------------------------------------------------------------------------------------------- bundle + report
def test_bundle_config_feeds_the_report(tiny_cohort, tmp_path):
    """configs/supervised.json (over train.json, as the README runs it) on an on-disk cohort, then evaluation.evaluate with the records as an extra row: the
    baseline's folds are the SVM rows' folds."""
    wf = ConfigWorkflow(
        workflow_type="infer",
        config_file=[str(ROOT / "configs" / f) for f in ("train.json", "supervised.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        run_id="supervising",
        bundle_root=str(tmp_path),
        datalist=str(tiny_cohort),
        roi_size=[28, 28, 28],
        n_folds=3,
        label_fractions=[1.0],  # the SVM rows need 2 cases of a class after subsampling; 3 of 12 cases allow none
        supervised={"epochs": 1, "batch_size": 4, "learning_rate": 0.001, "weight_decay": 0.0, "amp": True},
    )
    wf.initialize()
    wf.run()
    out = tmp_path / "eval" / "supervised_predictions.json"
    records = json.loads(out.read_text(encoding="utf-8"))
    meta = json.loads(meta_path(out).read_text(encoding="utf-8"))
    assert len(records) == 1 and meta["n_cases"] == 12 and len(meta["trained"]) == 3
    assert meta["bundle_version"] and meta["roi_size"] == [28, 28, 28] and meta["image_shape"] == [1, 28, 28, 28]
    assert len(list((tmp_path / "eval" / "supervised_predictions.parts").glob("*.json"))) == 3

    labels, _ = read_labels(tiny_cohort)
    ids = sorted(labels)
    table = tmp_path / "random.csv"
    write_feature_table(table, ids, ["f0", "f1"], np.random.default_rng(0).normal(size=(12, 2)))
    results = evaluate(
        {"random": str(table)},
        tiny_cohort,
        tmp_path / "report",
        protocol=ProtocolSettings(n_folds=3, seeds=(0,), label_fractions=(1.0,), n_bootstrap=0, positive_label=1),
        extra_rows={"supervised": str(out)},
        plots=False,
    )
    svm_runs = results["rows"]["random"]["protocol"]["runs"]
    sup_runs = results["rows"]["supervised"]["protocol"]["runs"]
    assert [r["fold"] for r in sup_runs] == [r["fold"] for r in svm_runs]
    assert "supervised" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
