"""models/model.input.json: training records the encoder's input; inferring and the apps refuse another input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.transforms import LesionContextd
from scripts.pretrain.handlers import EncoderExport
from scripts.pretrain.model_input import (
    check_config_input,
    check_input,
    check_torchscript_input,
    input_record,
    record_path,
    write_input_record,
)
from scripts.pretrain.networks import Encoder3D
from scripts.torchscript import export_torchscript
from tests.workflows import run_infer_workflow, train_workflow

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
CONTEXT = [LesionContextd(keys="image", mask_key="mask", margin=3)]


def test_the_record_names_the_context_and_tells_margins_apart():
    record = input_record([32, 32, 32], 1, CONTEXT)
    assert record["context_transforms"] == [
        {
            "transform": "scripts.data.transforms.LesionContextd",
            "allow_missing_keys": False,
            "fill": 0.0,
            "keys": ["image"],
            "margin": 3.0,
            "mask_key": "mask",
        }
    ]
    assert record == json.loads(json.dumps(record))  # compares equal to the record read back from disk
    assert input_record([32] * 3, 1, [LesionContextd(keys="image", margin=5)]) != record
    assert input_record([32] * 3, 1, [])["context_transforms"] == []


def test_encoder_export_writes_the_record_that_check_input_enforces(tmp_path):
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    EncoderExport(Encoder3D(), str(path), input_record=input_record([28] * 3, 1, CONTEXT))(None)
    assert record_path(path) == tmp_path / "models" / "model.input.json" and record_path(path).is_file()
    assert check_input(path, [28, 28, 28], 1, CONTEXT)["roi_size"] == [28, 28, 28]
    with pytest.raises(
        ValueError, match=r"context_transforms: trained on \[\{.*LesionContextd.*this config gives \[\]"
    ):
        check_input(path, [28, 28, 28], 1, [])
    with pytest.raises(ValueError, match=r"roi_size: trained on \[28, 28, 28\], this config gives \[32, 32, 32\]"):
        check_input(path, [32, 32, 32], 1, CONTEXT)


def test_a_checkpoint_without_a_record_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "model.pt"
    torch.save(Encoder3D().state_dict(), path)
    with caplog.at_level(logging.WARNING):
        assert check_input(path, [32] * 3, 1, []) is None
    assert "has no model.input.json" in caplog.text


def test_an_unreadable_record_is_an_error_naming_it(tmp_path):
    record_path(tmp_path / "model.pt").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="unreadable input record"):
        check_input(tmp_path / "model.pt", [32] * 3, 1, [])


def test_torchscript_and_bundle_configs_are_checked_against_the_record(tmp_path):
    """The Deploy app's path (the inference.json inside model.ts) and MONAI Label's (the bundle's inference.json)."""
    model_ts = tmp_path / "model.ts"
    export_torchscript(Encoder3D(), model_ts, CONFIGS / "metadata.json", CONFIGS / "inference.json")
    config = ConfigParser.load_config_file(str(CONFIGS / "inference.json"))
    write_input_record(tmp_path / "model.pt", input_record([32] * 3, 1, []))  # a whole-box encoder
    with pytest.raises(ValueError, match="context_transforms: trained on \\[\\], this config gives"):
        check_torchscript_input(model_ts)
    with pytest.raises(ValueError, match="context_transforms"):
        check_config_input(tmp_path / "model.pt", config)
    write_input_record(tmp_path / "model.pt", input_record([32] * 3, 1, CONTEXT))  # the default's input
    assert check_torchscript_input(model_ts)["in_channels"] == 1
    assert check_config_input(tmp_path / "model.pt", config) is not None


def test_the_shipped_record_matches_the_shipped_inference_config():
    """models/model.input.json describes the input configs/inference.json gives the shipped encoder."""
    config = ConfigParser.load_config_file(str(CONFIGS / "inference.json"))
    assert check_config_input(ROOT / "models" / "model.pt", config) is not None


def test_inferring_refuses_a_config_that_embeds_another_input_than_training_used(tiny_cohort, tmp_path):
    """Train (1 epoch, lesion context) -> inferring with the whole box is refused, with the default it runs."""
    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, knn_monitor=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    record = json.loads((tmp_path / "models" / "model.input.json").read_text(encoding="utf-8"))
    assert record["roi_size"] == [28, 28, 28] and record["context_transforms"][0]["margin"] == 3.0
    common = dict(
        bundle_root=str(tmp_path),
        datalist=str(tiny_cohort),
        roi_size=[28, 28, 28],
        num_workers=0,
        cache_dir=str(tmp_path / "cache_infer"),
    )

    with pytest.raises(RuntimeError) as refused:  # MONAI wraps a failing config expression's error
        run_infer_workflow(["inference.json"], "inferring", **common, context_transforms=[])
    assert "context_transforms: trained on" in str(refused.value.__cause__)
    assert not (tmp_path / "eval" / "ssl_features.csv").exists()
    run_infer_workflow(["inference.json"], "inferring", **common)
    assert (tmp_path / "eval" / "ssl_features.csv").is_file()
