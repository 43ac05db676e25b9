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
