"""The embedded default cohort: deterministic, imbalanced as specified, valid, and not trivially separable."""

from __future__ import annotations

import json
from collections import Counter

import nibabel as nib
import numpy as np

from scripts.data.datalist import load_datalist
from scripts.data.demo_cohort import DEFAULT_CENTRES, CohortSpec, ensure_demo_cohort, generate_cohort, make_case
from scripts.data.validation import validate_datalist


def test_cohort_is_valid_and_deterministic(tiny_cohort, tmp_path):
    assert validate_datalist(tiny_cohort, label_map={"0": "h", "1": "n"}) == []
    again = generate_cohort(tmp_path / "again", CohortSpec(n_cases=12, shape=(36, 36, 36), seed=3))
    a, b = load_datalist(tiny_cohort), load_datalist(again)
    assert [(x["id"], x["label"], x["centre"]) for x in a] == [(x["id"], x["label"], x["centre"]) for x in b]
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(nib.load(x["image"]).get_fdata(), nib.load(y["image"]).get_fdata())


def test_default_spec_ratio_and_centres(tmp_path):
    spec = CohortSpec(n_cases=40, shape=(28, 28, 28), seed=1)
    items = json.loads(generate_cohort(tmp_path / "c", spec).read_text(encoding="utf-8"))["training"]
    labels = Counter(i["label"] for i in items)
    assert labels == {1: 30, 0: 10}  # 3:1
    assert not any(i["centre"] == "A" and i["label"] == 0 for i in items)  # centre A has no minority cases


def test_phenotypes_match_in_mean_intensity_but_differ_in_texture():
    rng = np.random.default_rng(0)
    stats = {0: [], 1: []}
    for label in (0, 1):
        for _ in range(12):
            img, mask = make_case(rng, label, DEFAULT_CENTRES[1], (40, 40, 40))
            vals = img[mask > 0].astype(float)
            stats[label].append((vals.mean(), vals.std() / vals.mean()))
    mean0, cv0 = np.mean(stats[0], axis=0)
    mean1, cv1 = np.mean(stats[1], axis=0)
    assert abs(mean0 - mean1) / mean1 < 0.1  # means within 10%
    assert cv1 > 1.3 * cv0  # necrotic lesions are clearly more heterogeneous


def test_ensure_reuses_existing_cohort(tmp_path):
    p1 = ensure_demo_cohort(tmp_path / "d", n_cases=8, shape=(28, 28, 28))
    mtime = (tmp_path / "d" / "images" / "demo_0000.nii.gz").stat().st_mtime_ns
    p2 = ensure_demo_cohort(tmp_path / "d", n_cases=8, shape=(28, 28, 28))
    assert p1 == p2 and (tmp_path / "d" / "images" / "demo_0000.nii.gz").stat().st_mtime_ns == mtime
