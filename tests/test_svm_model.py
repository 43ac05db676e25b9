"""The SVM the evaluation workflow saves for serving (MONAI Label): fit on a table, save, reload, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.downstream.svm_model import describe, load_svm, train_and_save_svm
from scripts.feature_table import write_feature_table


def test_saved_svm_predicts_the_separable_class_and_names_it(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 10)
    X = rng.normal(size=(40, 8))
    X[:, 0] += 4.0 * y  # one informative column
    ids = [f"c{i:02d}" for i in range(40)]
    write_feature_table(tmp_path / "ssl.csv", ids, [f"f{j}" for j in range(8)], X)
    datalist = tmp_path / "datalist.json"
    items = [{"id": i, "image": "x.nii.gz", "mask": "m.nii.gz", "label": int(v)} for i, v in zip(ids, y)]
    datalist.write_text(json.dumps({"training": items}))
    out = train_and_save_svm(tmp_path / "ssl.csv", datalist, tmp_path / "svm.joblib", label_names={"0": "a", "1": "b"})
    svm = load_svm(out)
    assert describe(out)["columns"] == svm.columns == [f"f{j}" for j in range(8)]
    probe = np.zeros(8)
    probe[0] = 5.0
    assert svm.predict(probe)["label_name"] == "b"
    probe[0] = -1.0
    assert svm.predict(probe)["label"] == 0
    with pytest.raises(ValueError, match="8 features"):
        svm.predict(np.zeros(5))
