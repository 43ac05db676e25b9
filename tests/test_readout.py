"""Read-outs of frozen embeddings and the validation section of train.json (kNN / probe / effective rank)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from workflows import ROOT, train_workflow

from scripts.pretrain import readout as readout_module
from scripts.pretrain.readout import (
    PROBE_C,
    PROBE_C_GRID,
    check_probe_c,
    effective_rank,
    knn_balanced_accuracy,
    probe_scores,
    readout_items,
    stratified_folds,
    tuned_probe_c,
)


def _blobs(n=60, d=16, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 0).astype(int)  # 3:1
    z = rng.standard_normal((n, d))
    z[:, 0] += sep * y
    return z, y


def test_readouts_separate_blobs_and_not_noise():
    z, y = _blobs()
    folds = stratified_folds(y)
    assert knn_balanced_accuracy(z, y) > 0.8
    good = probe_scores(z, y, folds)
    assert good["probe_auc"] > 0.9 and good["probe_balanced_accuracy"] > 0.8
    noise = np.random.default_rng(1).standard_normal(z.shape)
    assert probe_scores(noise, y, folds)["probe_auc"] < 0.75


def test_auto_probe_c_is_chosen_on_each_training_fold_only(monkeypatch):
    """``c="auto"``: one inner cross-validation per outer training fold, never seeing that fold's test cases;
    it still separates blobs from noise, and a training fold with a one-case class falls back to ``PROBE_C``."""
    z, y = _blobs(n=80, sep=4.0)
    folds = stratified_folds(y)
    seen, chosen = [], []

    def spy(zt, yt, *args, **kwargs):
        seen.append(len(yt))
        chosen.append(tuned_probe_c(zt, yt, *args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(readout_module, "tuned_probe_c", spy)
    good = probe_scores(z, y, folds, "auto")
    assert seen == [len(train) for train, _ in folds] and set(chosen) <= set(PROBE_C_GRID)
    assert good["probe_auc"] > 0.9 and good["probe_balanced_accuracy"] > 0.8
    noise = np.random.default_rng(1).standard_normal(z.shape)
    assert probe_scores(noise, y, folds, "auto")["probe_auc"] < 0.75
    assert tuned_probe_c(z[:5], np.array([0, 0, 0, 0, 1])) == PROBE_C  # one positive: nothing to cross-validate
    assert tuned_probe_c(z, y, grid=(3.0,)) == 3.0


@pytest.mark.parametrize("bad", [0, -1.0, "nan", "inf", "often", None])
def test_probe_c_refuses_what_is_not_a_positive_number_or_auto(bad):
    with pytest.raises(ValueError, match="probe C must be a positive number or 'auto'"):
        check_probe_c(bad)
    assert check_probe_c(" AUTO ") == "auto" and check_probe_c("1e-2") == 0.01


def test_the_monitor_probe_takes_the_configs_probe_c(tiny_cohort, tmp_path):
    """train.json's ``probe_c`` reaches both probe metrics of the validation section (0.1 unless a profile says)."""
    from scripts.pretrain.handlers import ReadoutMetric

    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4)
    assert wf.parser.get_parsed_content("validate#key_metric")["probe_score"].probe_c == PROBE_C
    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, probe_c="auto")
    metrics = wf.parser.get_parsed_content("validate#additional_metrics")
    assert wf.parser.get_parsed_content("validate#key_metric")["probe_score"].probe_c == "auto"
    assert metrics["probe_balanced_accuracy"].probe_c == metrics["probe_auc"].probe_c == "auto"
    z, y = _blobs()
    metric = ReadoutMetric("probe_auc", probe_c="auto")
    metric.update((torch.as_tensor(z), torch.as_tensor(y)))
    assert metric.compute() == probe_scores(z, y, stratified_folds(y), "auto")["probe_auc"]
    with pytest.raises(ValueError, match="probe C must be"):
        ReadoutMetric("probe_auc", probe_c=0)


def test_effective_rank_sees_dimensional_collapse_that_a_common_offset_hides():
    rng = np.random.default_rng(0)
    full = rng.standard_normal((100, 32))
    assert effective_rank(full) > 25
    low = rng.standard_normal((100, 2)) @ rng.standard_normal((2, 32)) + 50.0  # 2-d subspace plus a big offset
    assert 1.0 <= effective_rank(low) < 2.5
    assert np.isnan(effective_rank(np.zeros((1, 4))))


def test_readout_items_prefer_a_labelled_validation_section(tmp_path):
    entry = {"image": "a.nii.gz", "mask": "a.nii.gz"}
    doc = {
        "training": [{**entry, "id": f"t{i}", "label": "x" if i % 2 else "y"} for i in range(4)]
        + [{**entry, "id": "u"}],
        "validation": [{**entry, "id": f"v{i}", "label": i % 2} for i in range(4)],
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    items = readout_items(str(path))
    assert [i["id"] for i in items] == ["v0", "v1", "v2", "v3"] and [i["label"] for i in items] == [0, 1, 0, 1]
    del doc["validation"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    items = readout_items(str(path))
    assert [i["id"] for i in items] == ["t0", "t1", "t2", "t3"]  # the unlabelled case is not read out
    assert [i["label"] for i in items] == [1, 0, 1, 0]  # "x" -> 0, "y" -> 1


@pytest.mark.parametrize("enabled", [True, False])
def test_validation_section_logs_readouts_and_keeps_the_best_encoder(tiny_cohort, tmp_path, enabled):
    wf = train_workflow(tmp_path, tiny_cohort, epochs=2, batch_size=4, knn_monitor=enabled)
    wf.initialize()
    wf.run()
    wf.finalize()
    rows = json.loads((tmp_path / "eval" / "training_log.json").read_text(encoding="utf-8"))["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["effective_rank"] >= 1.0  # label-free, always logged
        assert ("probe_auc" in r and "knn_balanced_accuracy" in r and "probe_balanced_accuracy" in r) is enabled
    best = tmp_path / "models" / "checkpoints" / "model_best.pt"
    assert best.is_file() is enabled
    if enabled:
        state = torch.load(best, weights_only=True)
        from scripts.pretrain.networks import Encoder3D

        Encoder3D(in_channels=1, out_bn=True).load_state_dict(
            state, strict=True
        )  # the flat encoder dict, like model.pt
        # with its input record, like model.pt: embedding with it is checked, not just warned about
        record = json.loads((best.parent / "model_best.input.json").read_text(encoding="utf-8"))
        assert record == json.loads((tmp_path / "models" / "model.input.json").read_text(encoding="utf-8"))
        assert record["roi_size"] == [28, 28, 28]
    else:
        assert not (best.parent / "model_best.input.json").exists()


def test_validator_reads_out_exactly_what_inferring_writes(tiny_cohort, tmp_path):
    """The monitor's embeddings are the downstream features: same preprocessing, same eval-mode encoder; and
    training, the validator and ``inferring`` preprocess each case once, into one label-free cache entry."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from scripts.feature_table import read_feature_table

    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, out_bn=True)
    wf.initialize()
    wf.run()
    wf.finalize()
    validator = wf.parser.get_parsed_content("validate#evaluator")
    seen = []
    validator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["pred"].clone()))
    validator.run(1)
    z = torch.cat(seen).numpy()
    infer = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        bundle_root=str(tmp_path), datalist=str(tiny_cohort), roi_size=[28, 28, 28], num_workers=0,
        cache_dir=str(tmp_path / "cache"), sections=["training"],
    )  # fmt: skip
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    infer.initialize()
    infer.run()
    infer.finalize()
    n_cases = len(json.loads(tiny_cohort.read_text(encoding="utf-8"))["training"])
    assert len(cached) == n_cases and sorted((tmp_path / "cache").glob("*.pt")) == cached
    for path in cached:  # the ROI alone: no second view, and no label where pretraining reads
        assert set(torch.load(path, weights_only=True)) == {"id", "image", "mask"}, path.name
    ids, _, values, _ = read_feature_table(tmp_path / "eval" / "ssl_features.csv")
    order = [ids.index(i["id"]) for i in validator.data_loader.dataset.data]
    np.testing.assert_allclose(values[order], z, rtol=1e-4, atol=1e-4)


def test_channels_last_encoder_matches_the_contiguous_one():
    from scripts.pretrain.networks import Encoder3D

    torch.manual_seed(0)
    enc = Encoder3D(out_bn=True).eval()
    x = torch.rand(2, 1, 30, 30, 30) * 255
    ref = enc(x)
    enc_cl = enc.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(enc_cl(x.contiguous(memory_format=torch.channels_last_3d)), ref, rtol=1e-4, atol=1e-4)


def test_paper_preset_restores_the_published_recipe():
    from monai.bundle import ConfigParser

    base = ConfigParser()
    base.read_config([str(ROOT / "configs" / f) for f in ("train.json", "data/demo.json")])
    paper = ConfigParser()
    paper.read_config([str(ROOT / "configs" / f) for f in ("train.json", "data/demo.json", "presets/paper.json")])
    assert (paper["learning_rate"], paper["weight_decay"], paper["batch_size"], paper["epochs"]) == (0.01, 1e-4, 6, 50)
    assert paper["out_bn"] is False and paper["augmentation"]["sharpen_alpha"] == [10.0, 30.0]
    assert set(paper["augmentation"]) == set(base["augmentation"])  # the preset names every augmentation setting
    assert isinstance(paper.get_parsed_content("encoder_def").bn8, torch.nn.Identity)


def test_learning_curve_default_recipe_is_the_bundle_default():
    """The benchmark's "default" and "paper" recipes are what train.json and presets/paper.json train."""
    import importlib.util
    import sys

    from monai.bundle import ConfigParser

    spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "benchmarks" / "learning_curve.py")
    lc = importlib.util.module_from_spec(spec)
    sys.modules["learning_curve"] = lc  # dataclasses look their module up there
    spec.loader.exec_module(lc)
    for recipe, files in (
        ("default", ("train.json",)),
        ("paper", ("train.json", "presets/paper.json")),
        ("default+vessel", ("train.json", "presets/vesselmnist.json")),
        ("default+cov+orth", ("train.json", "presets/complementary.json")),
    ):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / f) for f in files])
        r = lc.make_recipe(recipe.split("+"), [])
        assert r.augmentation == {k: v for k, v in parser["augmentation"].items()}, recipe
        assert (r.lr, r.weight_decay, r.batch, r.out_bn) == (
            parser["learning_rate"],
            parser["weight_decay"],
            parser["batch_size"],
            parser["out_bn"],
        ), recipe
        reg = parser["regularizer"]
        assert (r.covariance, r.variance, r.radiomics) == (reg["covariance"], reg["variance"], reg["radiomics"]), recipe


def test_the_best_encoder_metric_is_defined_for_a_three_class_cohort(tiny_cohort, tmp_path):
    """Issue 29: with three classes ``probe_auc`` is NaN every epoch, so a key metric on it never improved and
    ``model_best.pt`` stayed the first epoch's. The key metric ``probe_score`` is the probe's balanced accuracy there."""
    doc = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    for i, item in enumerate(doc["training"]):
        item.update(
            label=i % 3, image=str(tiny_cohort.parent / item["image"]), mask=str(tiny_cohort.parent / item["mask"])
        )
    datalist = tmp_path / "three_classes.json"
    datalist.write_text(json.dumps(doc), encoding="utf-8")
    wf = train_workflow(tmp_path, datalist, epochs=2, batch_size=4, steps_per_epoch=1)
    wf.initialize()
    wf.run()
    wf.finalize()
    rows = json.loads((tmp_path / "eval" / "training_log.json").read_text(encoding="utf-8"))["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isnan(r["probe_auc"])  # no single AUC for three classes
        assert np.isfinite(r["probe_score"]) and r["probe_score"] == r["probe_balanced_accuracy"]
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == "probe_score" and np.isfinite(evaluator.state.best_metric)
    assert (tmp_path / "models" / "checkpoints" / "model_best.pt").is_file()
