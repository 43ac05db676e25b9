"""What SSL features carry beyond radiomics (scripts.downstream.complementarity), on tables with known content."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.downstream.complementarity import complementarity, folds_for, r2_from_radiomics, residual_probe


def _cohort(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 0).astype(int)  # 3:1
    trad = rng.standard_normal((n, 20))
    trad[:, 0] += 1.5 * y  # radiomics see the phenotype
    return rng, y, trad


def test_a_linear_function_of_radiomics_is_explained_and_adds_nothing():
    rng, y, trad = _cohort()
    ssl = trad[:, :6] @ rng.standard_normal((6, 32)) + 0.05 * rng.standard_normal((120, 32))
    out = complementarity(ssl, trad, y, seeds=(0, 1))
    assert out["r2_from_radiomics"] > 0.9
    assert out["probe_auc"] > 0.75  # alone it reads the phenotype (through radiomics' own signal)
    assert out["residual_probe_auc"] < 0.65  # beyond radiomics it carries nothing


def test_features_with_their_own_signal_are_unexplained_and_add():
    rng, y, trad = _cohort()
    ssl = rng.standard_normal((120, 32))
    ssl[:, :4] += 1.5 * y[:, None]  # a phenotype signal radiomics do not carry
    out = complementarity(ssl, trad, y, seeds=(0,))
    assert out["r2_from_radiomics"] < 0.1
    assert out["residual_probe_auc"] > 0.85
    assert 20 < out["effective_rank"] <= 32


def test_noise_is_neither_explained_nor_informative():
    rng, y, trad = _cohort()
    out = complementarity(rng.standard_normal((120, 32)), trad, y, seeds=(0,))
    assert abs(out["r2_from_radiomics"]) < 0.1 and abs(out["residual_probe_auc"] - 0.5) < 0.15


def test_nothing_is_fitted_on_the_rows_it_scores():
    """Wide noise: a probe or ridge that saw its test rows would score them near perfectly (in-sample fits of 200
    noise features on 60 cases are exact); out-of-fold they are at chance."""
    rng = np.random.default_rng(3)
    y = (np.arange(60) % 3 == 0).astype(int)
    ssl, trad = rng.standard_normal((60, 200)), rng.standard_normal((60, 80))
    folds = folds_for(60, y, 5, 0)
    assert residual_probe(ssl, trad, y, folds)["probe_auc"] < 0.75
    assert r2_from_radiomics(ssl, trad, folds) < 0.05


def test_unlabelled_and_bad_tables():
    rng, y, trad = _cohort()
    out = complementarity(rng.standard_normal((120, 8)), trad)
    assert "residual_probe_auc" not in out and np.isfinite(out["r2_from_radiomics"])
    with pytest.raises(ValueError, match="same|one cohort"):
        complementarity(rng.standard_normal((100, 8)), trad, y)
    bad = rng.standard_normal((120, 8))
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        complementarity(bad, trad, y)


# ------------------------------------------------------------------------------------- weighted block and verdict
def _protocol_data(signal_in_ssl: bool, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(120) % 4 == 0).astype(int)
    trad = rng.standard_normal((120, 10))
    trad[:, 0] += 1.2 * y
    ssl = rng.standard_normal((120, 60))
    if signal_in_ssl:
        ssl[:, :3] += 1.2 * y[:, None]
    return np.concatenate([trad, ssl], axis=1), y


def test_weighted_block_falls_back_to_radiomics_when_the_block_is_noise():
    from scripts.downstream.protocol import BlockWeights, run_protocol

    X, y = _protocol_data(signal_in_ssl=False)
    block = BlockWeights(tuple(range(10, 70)))
    fast = dict(seeds=(0,), C_grid=(0.01, 0.1, 1.0), n_bootstrap=0, label_fractions=(1.0,))
    weighted = run_protocol(X, y, block=block, **fast)
    plain = run_protocol(X, y, **fast)
    trad = run_protocol(X[:, :10], y, **fast)
    chosen = weighted.runs[0].best_weight
    assert np.mean(chosen) < 0.3, chosen  # 60 noise columns get little or no weight
    auc = {n: r.summary["1.0"]["auc"]["pooled"] for n, r in (("w", weighted), ("p", plain), ("t", trad))}
    assert auc["w"] > auc["p"] + 0.05 and auc["w"] >= auc["t"] - 0.05, auc  # near radiomics, far above plain


def test_weighted_block_keeps_a_block_that_helps():
    from scripts.downstream.protocol import BlockWeights, run_protocol

    X, y = _protocol_data(signal_in_ssl=True)
    weighted = run_protocol(X, y, block=BlockWeights(tuple(range(10, 70))), seeds=(0,), C_grid=(0.01, 0.1, 1.0),
                            n_bootstrap=0, label_fractions=(1.0,))  # fmt: skip
    assert np.mean(weighted.runs[0].best_weight) > 0.2 and weighted.settings["block_weights"]["n_columns"] == 60


def _results(diff: float, ci: list[float] | None, ssl_auc=0.8, control_auc=0.7):
    def row(a):
        return {"protocol": {"summary": {"1.0": {"auc": {"pooled": a}}}}}

    return {
        "task": "binary",
        "label_fractions": [1.0, 0.5],
        "rows": {"trad": row(0.85), "ssl": row(ssl_auc), "ssl (random init)": row(control_auc)},
        "paired_differences": {
            "trad+ssl - trad": {"summary": {"1.0": {"auc": {"difference": diff, "ci95": ci}}}},
            "trad+ssl (weighted) - trad": {"summary": {"1.0": {"auc": {"difference": 0.0, "ci95": [-0.01, 0.01]}}}},
        },
        "complementarity": {
            "ssl": {"radiomics_set": "trad", "control": False, "r2_from_radiomics": 0.87, "residual_probe_auc": 0.54},
            "ssl (random init)": {
                "radiomics_set": "trad",
                "control": True,
                "r2_from_radiomics": 0.35,
                "residual_probe_auc": 0.55,
            },  # fmt: skip
        },
    }


@pytest.mark.parametrize(
    "diff, ci, words",
    [(0.05, [0.01, 0.09], "**adds**"), (-0.05, [-0.09, -0.01], "**hurts**"), (0.0, [-0.01, 0.01], "no evidence")],
)
def test_verdict_says_what_the_paired_ci_says(diff, ci, words):
    from scripts.downstream.complementarity import verdict

    v = verdict(_results(diff, ci))
    assert list(v["entries"]) == ["ssl"] and v["control"] == "ssl (random init)"
    text = v["text"]
    assert words in text.split("With the SSL block")[0]
    assert "pretraining beats a random network" in text and "87 % of their variance" in text and "(35 %" in text
    worse = verdict(_results(diff, ci, ssl_auc=0.6))["text"]
    assert "pretraining does not beat a random network" in worse


def test_the_evaluation_scores_the_random_init_control_the_same_way(tmp_path):
    """With a control table, the report has trad+ssl (random init), its paired gain over trad, the pretrained
    encoder's gain over it, and the verdict says whether pretraining added more than a random network."""
    from scripts.downstream.evaluation import evaluate_cohort, with_control
    from scripts.downstream.protocol import ProtocolSettings
    from scripts.feature_table import write_feature_table

    rng, y, trad = _cohort(n=80)
    ids = [f"c{i:02d}" for i in range(80)]
    ssl = rng.standard_normal((80, 12))
    ssl[:, 0] += 1.5 * y  # the pretrained table carries a signal radiomics lack; the control does not
    paths = {}
    for name, values in (
        ("radiomics_features", trad),
        ("ssl_features", ssl),
        ("ssl_random_init", rng.standard_normal((80, 12))),
    ):
        paths[name] = tmp_path / f"{name}.csv"
        write_feature_table(paths[name], ids, [f"f{j}" for j in range(values.shape[1])], values)
    tables = {"trad": str(paths["radiomics_features"]), "ssl": str(paths["ssl_features"])}
    tables["trad+ssl"] = [tables["trad"], tables["ssl"]]
    tables = with_control(tables, paths["ssl_random_init"])
    protocol = ProtocolSettings(seeds=(0,), C_grid=(0.01, 1.0), n_bootstrap=50, label_fractions=(1.0,))
    ev = evaluate_cohort(tables, dict(zip(ids, y.tolist())), protocol=protocol, explorer=False)
    rows, diffs = ev.results["rows"], ev.results["paired_differences"]
    assert {"ssl (random init)", "trad+ssl (random init)", "trad+ssl (random init, weighted)"} <= set(rows)
    assert {"trad+ssl (random init) - trad", "trad+ssl - trad+ssl (random init)",
            "trad+ssl (weighted) - trad+ssl (random init, weighted)"} <= set(diffs)  # fmt: skip
    entry = ev.results["verdict"]["entries"]["ssl"]
    assert entry["control"]["plain"] is not None and entry["vs_control"]["plain"]["difference"] > 0
    assert "trad+ssl − trad+random" in ev.results["verdict"]["text"]
    assert list(ev.results["verdict"]["entries"]) == ["ssl"]  # the control is not judged against itself


def test_one_extreme_case_does_not_dominate_r2():
    """A heavy-tailed radiomics feature (one lesion 1000 SDs out, as a degenerate shape gives) must not turn the
    pooled out-of-fold R² into a large negative number through that case's extrapolated prediction (VesselMNIST3D's
    random network read -120 before the clipping)."""
    rng, y, trad = _cohort()
    ssl = rng.standard_normal((120, 16))
    trad[:, 1] = ssl[:, 0] + 0.3 * rng.standard_normal(120)  # radiomics explain one SSL feature...
    trad[7, 1] = 1000.0  # ...and one case is far out on that radiomics feature
    r2 = r2_from_radiomics(ssl, trad, folds_for(120, y, 5, 0))
    assert 0.0 < r2 < 0.2, r2  # about 1/16 of the variance is explained
