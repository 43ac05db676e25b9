"""The SVM the evaluation workflow saves for serving (MONAI Label): fit on a table, save, reload, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.downstream.svm_model import describe, load_svm, train_and_save_svm
from scripts.feature_table import read_feature_table, write_feature_table


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


def _encoder_files(folder, seed: int, margin: int = 3):
    """A real encoder checkpoint with its input record, as training writes them (``save_encoder``)."""
    import torch

    from scripts.data.transforms import LesionContextd
    from scripts.pretrain.handlers import save_encoder
    from scripts.pretrain.model_input import input_record
    from scripts.pretrain.networks import Encoder3D

    torch.manual_seed(seed)
    record = input_record([32] * 3, 1, [LesionContextd(keys="image", mask_key="mask", margin=margin)])
    save_encoder(Encoder3D(), str(folder / "model.pt"), record)
    return folder / "model.pt"


def _embedded(tmp_path, checkpoint, n: int = 40):
    """An embeddings table written by the bundle's EmbeddingWriter for ``checkpoint`` (its provenance), + datalist."""
    import torch
    from ignite.engine import Engine

    from scripts.pretrain.embed import EmbeddingWriter

    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1] * (n // 4))
    X = rng.normal(size=(n, 8)) + 3.0 * y[:, None]
    ids = [f"c{i:02d}" for i in range(n)]
    engine = Engine(lambda e, batch: {"pred": torch.as_tensor(batch["x"])})
    table = tmp_path / "ssl.csv"
    EmbeddingWriter(str(table), checkpoint=str(checkpoint)).attach(engine)
    engine.run([{"id": ids, "x": X}])
    datalist = tmp_path / "datalist.json"
    items = [{"id": i, "image": "x.nii.gz", "mask": "m.nii.gz", "label": int(v)} for i, v in zip(ids, y)]
    datalist.write_text(json.dumps({"training": items}))
    return table, datalist


def test_an_svm_is_refused_with_another_encoder_than_the_one_its_embeddings_came_from(tmp_path):
    """Issue 29: the SVM records its encoder's sha256 and input record; ``load_svm`` given the served checkpoint (as
    the MONAI Label app does) refuses another encoder, naming both hashes, and nothing is saved beside a model.pt
    that is not its encoder (the shipped models/svm_ssl.joblib stays)."""
    from scripts.downstream.svm_model import svm_destination
    from scripts.io_utils import sha256_file

    for name in ("a", "b", "c", "models", "report"):
        (tmp_path / name).mkdir()
    a, b = _encoder_files(tmp_path / "a", seed=0), _encoder_files(tmp_path / "b", seed=1)
    c = _encoder_files(tmp_path / "c", seed=0, margin=5)  # a's weights, recorded as trained on another input
    c.write_bytes(a.read_bytes())
    table, datalist = _embedded(tmp_path, a)
    sha_a, sha_b = sha256_file(a), sha256_file(b)

    svm = train_and_save_svm(table, datalist, tmp_path / "svm.joblib")
    assert describe(svm)["provenance"]["encoder_sha256"] == sha_a
    assert load_svm(svm, checkpoint=a).columns == [f"ssl_{i:03d}" for i in range(8)]
    with pytest.raises(ValueError, match=f"embeddings of {a} \\(sha256 {sha_a}\\), not of {b} \\(sha256 {sha_b}\\)"):
        load_svm(svm, checkpoint=b)
    with pytest.raises(ValueError, match="made on the input .*margin.*5"):
        load_svm(svm, checkpoint=c)

    served = tmp_path / "models" / "svm_ssl.joblib"
    (tmp_path / "models" / "model.pt").write_bytes(b.read_bytes())  # the folder serves encoder b
    with pytest.raises(ValueError, match=f"refusing to save the SVM to {served}: .*sha256 {sha_a}.*sha256 {sha_b}"):
        train_and_save_svm(table, datalist, served)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]
    assert svm_destination(served, table, tmp_path / "report") == str(tmp_path / "report" / "svm_ssl.joblib")
    diverted = train_and_save_svm(table, datalist, svm_destination(served, table, tmp_path / "report"))
    (tmp_path / "models" / "model.pt").write_bytes(a.read_bytes())  # now it serves a: the SVM goes beside it
    assert svm_destination(served, table, tmp_path / "report") == str(served)
    assert not diverted.exists() and not (tmp_path / "report" / "svm_ssl.joblib.json").exists()  # not this run's

    bare = tmp_path / "bare.csv"  # a table that does not say which encoder made it
    write_feature_table(bare, *read_feature_table(table)[:3])
    with pytest.raises(ValueError, match="record no encoder checkpoint"):
        load_svm(train_and_save_svm(bare, datalist, tmp_path / "bare.joblib"), checkpoint=a)
