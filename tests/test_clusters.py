"""scripts.downstream.clusters: k by silhouette, contingency tables, radiomic profiles, central cases, lesion mid-slices."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from scripts.downstream.clusters import (
    cluster_explorer,
    contingency,
    explore,
    hedges_g,
    mid_slice,
    montage_slices,
    radiomic_profile,
    silhouette_by_k,
)
from scripts.downstream.protocol import ProtocolSettings


def _blobs(k: int = 4, n: int = 15, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(k, dim))
    y = np.repeat(np.arange(k), n)
    return centres[y] + rng.normal(size=(y.size, dim)), y


def test_silhouette_finds_the_number_of_blobs_and_the_explorer_adds_the_papers_k():
    X, y = _blobs(k=4)
    sil = silhouette_by_k(X, (2, 7))
    assert max(sil, key=sil.get) == 4 and set(sil) == set(range(2, 8))
    ids = [f"c{i:02d}" for i in range(len(y))]
    ex = cluster_explorer(X, ids, y.tolist(), k_range=(2, 7))
    assert ex["best_k"] == 4 and [r["k"] for r in ex["runs"]] == [4, 3]
    best = ex["runs"][0]
    assert best["labels"]["ari"] == pytest.approx(1.0) and best["labels"]["nmi"] == pytest.approx(1.0)
    assert sorted(best["sizes"].values()) == [15, 15, 15, 15]
    with pytest.raises(ValueError, match="k range"):
        silhouette_by_k(X[:3], (3, 5))


def test_contingency_counts_and_agreement():
    ct = contingency([0, 0, 1, 1, 1], ["A", "A", "B", "B", "A"])
    assert ct["columns"] == ["A", "B"]
    assert ct["counts"] == {"0": {"A": 2, "B": 0}, "1": {"A": 1, "B": 2}}
    assert 0 < ct["nmi"] < 1
    assert contingency([0, 1, 0, 1], ["x", "y", "x", "y"])["ari"] == pytest.approx(1.0)


def test_hedges_g_and_profile_rank_the_feature_that_separates_a_cluster():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    assert hedges_g(a, b) == pytest.approx(-3.0 * (1 - 3 / (4 * 6 - 9)))
    assert math.isnan(hedges_g(np.ones(4), np.ones(5)))  # no spread: undefined, not infinite
    rng = np.random.default_rng(1)
    clusters = np.repeat([0, 1], 20)
    feats = rng.normal(size=(40, 3))
    feats[:, 1] += 3.0 * clusters  # feature "shape" is high in cluster 1
    feats[:, 2] = 5.0  # constant: no effect size, left out
    prof = radiomic_profile(clusters, feats, ["noise", "shape", "constant"], top=2)
    assert prof["1"][0]["feature"] == "shape" and prof["1"][0]["g"] > 2
    assert prof["0"][0]["feature"] == "shape" and prof["0"][0]["g"] < -2
    assert all(r["feature"] != "constant" for rows in prof.values() for r in rows)


def test_explore_reports_centres_and_central_cases_nearest_first():
    X, y = _blobs(k=3, n=10, seed=2)
    ids = [f"c{i:02d}" for i in range(len(y))]
    centres = ["A" if i % 2 else "B" for i in range(len(y))]
    run = explore(X, ids, y.tolist(), 3, centres=centres, radiomics=X[:, :2], radiomics_columns=["f0", "f1"])
    assert run["centres"]["columns"] == ["A", "B"] and abs(run["centres"]["ari"]) < 0.2
    assert set(run["profile"]) == {"0", "1", "2"}
    for c, central in run["central_ids"].items():
        members = [i for i, cl in zip(ids, run["clusters"]) if str(cl) == c]
        assert len(central) == 4 and set(central) <= set(members)
        Z = (X - X.mean(0)) / X.std(0)
        idx = [ids.index(i) for i in members]
        centroid = Z[idx].mean(0)
        dist = {i: np.linalg.norm(Z[ids.index(i)] - centroid) for i in members}
        assert central == sorted(members, key=dist.get)[:4]


def test_mid_slice_is_the_lesion_centre_slice_cropped_to_the_mask(tmp_path):
    img = np.zeros((40, 40, 30), dtype=np.int16)
    mask = np.zeros_like(img, dtype=np.uint8)
    mask[10:20, 12:18, 5:15] = 1
    img[:, :, 9] = 500  # the mid slice of the lesion (z 5..14 -> 9)
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    item = {"id": "x", "image": str(tmp_path / "img.nii.gz"), "mask": str(tmp_path / "mask.nii.gz")}
    s = mid_slice(item, margin=2)
    assert s.shape == (14, 10) and np.all(s == 500)
    slices = montage_slices({"x": item, "gone": {"id": "gone", "image": str(tmp_path / "no.nii.gz")}}, ["x", "gone"])
    assert set(slices) == {"x"}  # an unreadable case is left blank, not fatal


@pytest.mark.parametrize("testing", [[], None])
def test_an_empty_or_absent_testing_section_keeps_the_centre_analysis(tiny_cohort, tmp_path, testing):
    """Issue 29: ``"testing": []`` (the demo cohort's own datalist) made the explorer's datalist read fail, so the
    report lost its clusters x centres table; the evaluation reads ``training`` and ``testing`` (evaluate.json)."""
    import json

    from scripts.downstream.evaluation import evaluate_cohort
    from scripts.feature_table import write_feature_table

    doc = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    for it in doc["training"]:
        it["image"], it["mask"] = str(tiny_cohort.parent / it["image"]), str(tiny_cohort.parent / it["mask"])
    doc.pop("testing", None)
    if testing is not None:
        doc["testing"] = testing
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(doc), encoding="utf-8")
    ids = [it["id"] for it in doc["training"]]
    y = np.array([it["label"] for it in doc["training"]], dtype=float)
    rng = np.random.default_rng(0)
    ssl = tmp_path / "ssl.csv"
    write_feature_table(ssl, ids, [f"ssl_{i}" for i in range(4)], y[:, None] + rng.normal(size=(len(ids), 4)))
    ev = evaluate_cohort(
        {"ssl": str(ssl)}, datalist, sections=("training", "testing"), explorer_k_range=(2, 3),
        protocol=ProtocolSettings(n_folds=3, seeds=(0,), label_fractions=(1.0,), C_grid=(1.0,), n_bootstrap=10),
    )  # fmt: skip
    assert set(ev.case_items) == set(ids)
    run = ev.results["cluster_explorer"]["ssl"]["runs"][0]
    assert run["centres"] is not None and set(run["centres"]["columns"]) == {it["centre"] for it in doc["training"]}
