"""The label-free terms beside the SimSiam loss (scripts.pretrain.regularizers) and their place in the one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.feature_table import write_feature_table
from scripts.pretrain.losses import simsiam_loss_per_sample
from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D
from scripts.pretrain.regularizers import (
    Regularizer,
    covariance_penalty,
    cross_correlation_penalty,
    make_regularizer,
    radiomics_components,
    variance_penalty,
)
from scripts.pretrain.step import simsiam_step


def test_covariance_penalty_sees_repeated_features_not_independent_ones():
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(4096, 8, generator=g)
    repeated = independent[:, :1].repeat(1, 8)
    assert covariance_penalty(independent) < 0.01
    assert covariance_penalty(repeated) == pytest.approx(7.0, rel=0.05)  # 8*7 off-diagonal ones / 8


def test_variance_penalty_is_a_hinge_on_the_std():
    g = torch.Generator().manual_seed(0)
    assert variance_penalty(torch.randn(2048, 4, generator=g) * 2) == 0
    assert variance_penalty(torch.zeros(16, 4)) == pytest.approx(1 - 1e-2, abs=1e-3)  # sqrt(EPS) = 0.01


def test_cross_correlation_is_one_for_copies_and_small_for_independent_columns():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(512, 3, generator=g)
    assert cross_correlation_penalty(r.repeat(1, 2), r) == pytest.approx(1 / 3, rel=0.05)  # each copy matches 1 of 3
    assert cross_correlation_penalty(torch.randn(512, 6, generator=g), r) < 0.01
    with pytest.raises(ValueError, match="radiomics rows"):
        cross_correlation_penalty(r, r[:5])


def test_radiomics_components_are_whitened_and_count_independent_directions_once():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 3))
    table = np.concatenate([base[:, [0]] * np.arange(1, 11), base[:, 1:], np.ones((200, 1))], axis=1)  # 10 copies
    comps = radiomics_components({f"c{i}": row for i, row in enumerate(table)})
    x = np.stack(list(comps.values()))
    assert x.shape == (200, 3)  # the 10 size-like copies are one direction; the constant column is dropped
    np.testing.assert_allclose(np.cov(x.T, bias=True), np.eye(3), atol=1e-4)
    bad = {f"c{i}": row for i, row in enumerate(table)} | {"c0": [np.nan] * table.shape[1]}
    with pytest.raises(ValueError, match="NaN"):
        radiomics_components(bad)


def test_regularizer_checks_its_weights_and_names_a_missing_case():
    with pytest.raises(ValueError, match="regularizer#covariance"):
        Regularizer(covariance=-1)
    with pytest.raises(ValueError, match="radiomics_table"):
        Regularizer(radiomics=1.0)
    reg = Regularizer(radiomics=1.0, components={"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)})
    with pytest.raises(KeyError, match="case_9"):
        reg(torch.randn(2, 4), torch.randn(2, 4), ["a", "case_9"])


def test_make_regularizer_reads_a_radiomics_table_and_is_none_when_off(tmp_path):
    assert make_regularizer() is None  # the paper's loss: nothing added, the step unchanged
    rng = np.random.default_rng(0)
    ids = [f"case{i}" for i in range(12)]
    path = tmp_path / "radiomics_features.csv"
    write_feature_table(path, ids, ["original_a", "original_b", "original_c"], rng.standard_normal((12, 3)))
    reg = make_regularizer(covariance=0.1, radiomics=2.0, radiomics_table=str(path), case_ids=ids[:10])
    term, parts = reg(torch.randn(4, 8), torch.randn(4, 8), ids[:4])
    assert set(parts) == {"covariance", "radiomics"}
    assert float(term) == pytest.approx(0.1 * parts["covariance"] + 2.0 * parts["radiomics"], rel=1e-5)
    with pytest.raises(ValueError, match="lacks 1 training case"):
        make_regularizer(radiomics=1.0, radiomics_table=str(path), case_ids=[*ids, "case99"])
    with pytest.raises(ValueError, match="radiomics_table"):
        make_regularizer(radiomics=1.0)


def _net(seed=0):
    torch.manual_seed(seed)
    return SimSiam3D(Encoder3D(1, 32, 40, out_bn=True), Predictor(32, 8))


def test_step_adds_the_penalty_to_the_simsiam_loss():
    x1, x2 = torch.rand(4, 1, 28, 28, 28) * 255, torch.rand(4, 1, 28, 28, 28) * 255
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # no update: the loss is read before and after alike
    with torch.no_grad():
        p1, p2, z1, z2 = _net().train()(x1, x2)
        plain = simsiam_loss_per_sample(p1, p2, z1, z2).mean()
    reg = Regularizer(covariance=0.5)
    out = simsiam_step(net, opt, x1, x2, penalty=lambda a, b: reg(a, b))
    assert float(out["loss"]) == pytest.approx(float(plain) + 0.5 * out["penalty"]["covariance"], rel=1e-4)


def test_orthogonality_term_moves_features_away_from_radiomics():
    """A linear encoder trained on the radiomics term alone ends less correlated with the cases' radiomics than
    it started (a term whose gradient did nothing, or pointed the wrong way, fails this)."""
    g = torch.Generator().manual_seed(0)
    n, d = 96, 16
    r = torch.randn(n, 3, generator=g)
    x = torch.cat([r, torch.randn(n, 5, generator=g)], dim=1)  # inputs carry radiomics and other content
    enc = torch.nn.Linear(8, d)
    torch.nn.init.normal_(enc.weight, generator=g)
    comps = radiomics_components({str(i): r[i].numpy() for i in range(n)})
    reg = Regularizer(radiomics=1.0, components=comps)
    ids = [str(i) for i in range(n)]
    before = float(cross_correlation_penalty(enc(x).detach(), r))
    opt = torch.optim.Adam(enc.parameters(), lr=0.05)
    for _ in range(200):
        idx = torch.randperm(n, generator=g)[:24]
        z = enc(x[idx])
        term, _ = reg(z, z, [ids[i] for i in idx])
        opt.zero_grad()
        term.backward()
        opt.step()
    after = float(cross_correlation_penalty(enc(x).detach(), r))
    assert after < before / 4, (before, after)


def test_bundle_training_with_the_terms_logs_them(tiny_cohort, tmp_path):
    """``--regularizer#covariance`` and ``--regularizer#radiomics`` (with the cohort's radiomics table) reach the
    trainer's step; their epoch means are in the epoch metrics and the training log."""
    import json

    from workflows import train_workflow

    from scripts.data.datalist import load_datalist

    ids = [str(item["id"]) for item in load_datalist(str(tiny_cohort), "training")]
    table = tmp_path / "radiomics_features.csv"
    rng = np.random.default_rng(0)
    write_feature_table(table, ids, [f"original_f{i}" for i in range(5)], rng.standard_normal((len(ids), 5)))
    wf = train_workflow(
        tmp_path,
        tiny_cohort,
        epochs=1,
        batch_size=4,
        knn_monitor=False,
        **{"regularizer#covariance": 0.01, "regularizer#radiomics": 1.0, "regularizer#radiomics_table": str(table)},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    metrics = wf.trainer.state.metrics
    assert metrics["regularizer/covariance"] > 0 and 0 < metrics["regularizer/radiomics"] <= 1
    log = json.loads((tmp_path / "eval" / "training_log.json").read_text())
    assert "regularizer/radiomics" in json.dumps(log)
