"""inference.json -> radiomics.json -> evaluate.json (over train.json) on a tiny on-disk cohort, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.data.transforms import LesionContextd
from scripts.downstream.svm_model import describe, load_svm
from scripts.feature_table import read_feature_table
from scripts.io_utils import sha256_file
from scripts.pretrain.model_input import input_record, write_input_record
from scripts.pretrain.networks import Encoder3D
from tests.workflows import run_infer_workflow as _wf

ROOT = Path(__file__).resolve().parent.parent


def test_embed_extract_evaluate(tiny_cohort, tmp_path):
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    ckpt = tmp_path / "models" / "model.pt"
    torch.save(Encoder3D().state_dict(), ckpt)
    context = [LesionContextd(keys="image", mask_key="mask", margin=3)]  # inference.json's, as training records it
    write_input_record(ckpt, input_record([28, 28, 28], 1, context))
    common = dict(
        bundle_root=str(tmp_path),
        datalist=str(tiny_cohort),
        roi_size=[28, 28, 28],
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    _wf(["inference.json"], "inferring", **common)
    ids, cols, values, prov = read_feature_table(tmp_path / "eval" / "ssl_features.csv")
    assert len(ids) == 12 and len(cols) == 256 and values.shape == (12, 256)
    assert len(prov["checkpoint_sha256"]) == 64 and prov["roi_size"] == [28, 28, 28]

    _wf(
        ["inference.json", "radiomics.json"],
        "extracting",
        radiomics_params=str(ROOT / "configs" / "radiomics_params.yaml"),
        radiomics_workers=1,
        **common,
    )
    rids, rcols, _, _ = read_feature_table(tmp_path / "eval" / "radiomics_features.csv")
    assert sorted(rids) == sorted(ids) and len(rcols) == 107

    _wf(
        ["train.json", "evaluate.json"],
        "evaluating",
        bundle_root=str(tmp_path),
        datalist=str(tiny_cohort),
        n_folds=3,
        seeds=[0],
        label_fractions=[1.0],
        n_bootstrap=50,
    )
    report = (tmp_path / "eval" / "report" / "report.md").read_text(encoding="utf-8")
    for row in ("| trad |", "| ssl |", "| trad+ssl |"):
        assert row in report
    assert (tmp_path / "eval" / "report" / "results.json").is_file()
    served = tmp_path / "models" / "svm_ssl.joblib"  # the embeddings are models/model.pt's: the SVM goes beside it
    assert describe(served)["provenance"]["encoder_sha256"] == prov["checkpoint_sha256"] == sha256_file(ckpt)
    assert describe(served)["provenance"]["input_record"] == prov["input_record"] == input_record([28] * 3, 1, context)
    shipped = served.read_bytes()

    # issue 29: another encoder is now served; evaluating the old embeddings must not replace the served SVM
    torch.manual_seed(1)
    torch.save(Encoder3D().state_dict(), ckpt)
    _wf(["train.json", "evaluate.json"], "evaluating", bundle_root=str(tmp_path), datalist=str(tiny_cohort),
        tables={"ssl": "@ssl_table"}, n_folds=3, seeds=[0], label_fractions=[1.0], n_bootstrap=20)  # fmt: skip
    assert served.read_bytes() == shipped
    beside_report = tmp_path / "eval" / "report" / "svm_ssl.joblib"
    assert describe(beside_report)["provenance"]["encoder_sha256"] == prov["checkpoint_sha256"]
    with pytest.raises(ValueError, match=f"sha256 {prov['checkpoint_sha256']}.*sha256 {sha256_file(ckpt)}"):
        load_svm(beside_report, checkpoint=ckpt)
