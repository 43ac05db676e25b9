"""The pretraining workflow as users run it: ConfigWorkflow on train.json, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from workflows import train_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _workflow(tmp: Path, datalist: Path, **override) -> ConfigWorkflow:
    return train_workflow(tmp, datalist, **{"epochs": 2, "batch_size": 4, **override})


def _run(wf: ConfigWorkflow) -> None:
    wf.initialize()
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()


def test_train_workflow_writes_model_checkpoints_and_tensorboard(tiny_cohort, tmp_path):
    wf = _workflow(tmp_path, tiny_cohort, epochs=1, torchscript_path="$@ckpt_dir + '/model.ts'")
    _run(wf)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    # models/ is complete: model.ts is the TorchScript export of exactly these weights, with the metadata embedded
    from scripts.torchscript import check_torchscript_matches

    check_torchscript_matches(tmp_path / "models" / "model.pt", tmp_path / "models" / "model.ts")
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(tmp_path / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"] == "siam3d_radiomics" and "network_def" in json.loads(
        extra["inference.json"]
    )
    assert "fc8.weight" in state and not any(k.startswith(("encoder.", "predictor.")) for k in state)
    ckpt = torch.load(tmp_path / "models" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer"} <= set(ckpt)
    assert list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    collapse = wf.trainer.state.metrics["collapse_std"]
    assert 0.0 < collapse < 1.0
    # the exported encoder loads strictly into the inference network
    from scripts.pretrain.networks import Encoder3D

    Encoder3D(in_channels=1, out_bn=True).load_state_dict(state, strict=True)


def test_resume_reaches_the_same_weights(tiny_cohort, tmp_path):
    # 2 steps per epoch and one preprocessing cache for the three runs: resume is exercised as fully, in less time
    fast = {"steps_per_epoch": 2, "knn_monitor": False, "cache_dir": str(tmp_path / "cache")}
    straight = tmp_path / "straight"
    _run(_workflow(straight, tiny_cohort, **fast))
    split = tmp_path / "split"
    _run(_workflow(split, tiny_cohort, **{"train#trainer#max_epochs": 1}, **fast))
    wf = _workflow(split, tiny_cohort, resume=True, **fast)
    _run(wf)
    assert wf.trainer.state.epoch == 2
    a = torch.load(straight / "models" / "model.pt", weights_only=True)
    b = torch.load(split / "models" / "model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")
    # the random-init control is the run's starting point: the same in both runs, kept by the resume, not trained
    init_a = torch.load(straight / "models" / "checkpoints" / "model_init.pt", weights_only=True)
    init_b = torch.load(split / "models" / "checkpoints" / "model_init.pt", weights_only=True)
    fresh = _workflow(tmp_path / "fresh", tiny_cohort, **fast)
    fresh.initialize()
    start = fresh.parser.get_parsed_content("encoder_def").state_dict()
    assert set(init_a) == set(a) and (split / "models" / "checkpoints" / "model_init.input.json").is_file()
    for key in init_a:
        torch.testing.assert_close(init_a[key], init_b[key], rtol=0, atol=0, msg=f"{key}: model_init differs")
        torch.testing.assert_close(init_a[key], start[key], rtol=0, atol=0, msg=f"{key} is not the initial weight")
    assert not torch.equal(init_a["fc8.weight"], a["fc8.weight"])


def test_corrupt_checkpoint_is_reported(tiny_cohort, tmp_path):
    ckpt_dir = tmp_path / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "checkpoint_epoch=3.pt").write_bytes(b"not a checkpoint")
    wf = _workflow(tmp_path, tiny_cohort, resume=True)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    chain, exc = [], info.value
    while exc is not None:  # MONAI wraps instantiation errors: the user reads the whole chain
        chain.append(str(exc))
        exc = exc.__cause__
    assert any("checkpoint_epoch=3.pt is corrupt" in m for m in chain), chain


def _chain(info) -> list[str]:
    chain, exc = [], info.value
    while exc is not None:  # MONAI wraps instantiation errors: the user reads the whole chain
        chain.append(str(exc))
        exc = exc.__cause__
    return chain


def test_resume_refuses_another_cohorts_checkpoint_and_a_fresh_start_moves_it_aside(tiny_cohort, tmp_path):
    """Issue 29: ``--resume true`` with the same output but another datalist "resumed" the other cohort's finished
    run, trained 0 iterations and kept its encoder. The run's inputs are recorded in ``checkpoints/run.json``; a
    resume on other inputs is refused naming both datalists, and a fresh start moves the earlier run aside."""
    fast = {"epochs": 1, "steps_per_epoch": 1, "knn_monitor": False, "cache_dir": str(tmp_path / "cache")}
    _run(_workflow(tmp_path, tiny_cohort, **fast))
    ckpt = tmp_path / "models" / "checkpoints"
    assert json.loads((ckpt / "run.json").read_text(encoding="utf-8"))["datalist"] == str(tiny_cohort.resolve())
    model = (tmp_path / "models" / "model.pt").read_bytes()

    doc = json.loads(tiny_cohort.read_text(encoding="utf-8"))
    doc["training"] = doc["training"][2:]  # another cohort: two cases fewer
    for item in doc["training"]:
        item["image"], item["mask"] = str(tiny_cohort.parent / item["image"]), str(tiny_cohort.parent / item["mask"])
    other = tmp_path / "other" / "datalist.json"
    other.parent.mkdir()
    other.write_text(json.dumps(doc), encoding="utf-8")
    wf = _workflow(tmp_path, other, resume=True, **fast)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    message = next((m for m in _chain(info) if "cannot resume from" in m), _chain(info))
    assert f"datalist {tiny_cohort.resolve()} (12 cases); this run: datalist {other} (10 cases)" in message, message
    assert "case files (ids + image/mask contents)" in message and "--resume false" in message
    assert (tmp_path / "models" / "model.pt").read_bytes() == model  # nothing trained, nothing replaced

    _run(_workflow(tmp_path, other, **fast))  # afresh: the earlier run is moved aside, not mixed in
    earlier = json.loads((ckpt / "previous" / "run.json").read_text(encoding="utf-8"))
    assert earlier["datalist"] == str(tiny_cohort.resolve()) and (ckpt / "previous" / "checkpoint_epoch=1.pt").is_file()
    assert json.loads((ckpt / "run.json").read_text(encoding="utf-8"))["n_cases"] == 10
    wf = _workflow(tmp_path, other, resume=True, **{**fast, "epochs": 2})  # the same inputs resume
    _run(wf)
    assert wf.trainer.state.epoch == 2 and (ckpt / "checkpoint_epoch=2.pt").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP needs CUDA")
def test_amp_scaler_is_checkpointed_on_cuda(tiny_cohort, tmp_path):
    _run(_workflow(tmp_path, tiny_cohort, epochs=1))
    ckpt = torch.load(tmp_path / "models" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert ckpt["scaler"], "the AMP GradScaler state must be in the training checkpoint"


def _dataset_item(tmp: Path, datalist: Path, **override) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"datalist": str(datalist), "cache_dir": str(tmp / "cache"), "bundle_root": str(tmp), **override})
    return parser.get_parsed_content("train#dataset")[0]


def test_persistent_cache_is_keyed_on_the_preprocessing(tiny_cohort, tmp_path):
    """Changing the ROI size or the balance mode reuses the cache folder but never a stale cached volume."""
    assert _dataset_item(tmp_path, tiny_cohort, roi_size=[28, 28, 28])["image"].shape[1:] == (28, 28, 28)
    assert _dataset_item(tmp_path, tiny_cohort, roi_size=[32, 32, 32])["image"].shape[1:] == (32, 32, 32)
    se = _dataset_item(tmp_path, tiny_cohort, roi_size=[32, 32, 32], **{"balance#mode": "se"})
    assert "image_2" not in se  # SE loads originals and augments in the step
    plain = _dataset_item(tmp_path, tiny_cohort, roi_size=[32, 32, 32])
    assert "image_2" in plain and not torch.equal(torch.as_tensor(plain["image"]), torch.as_tensor(plain["image_2"]))


def test_re_with_paper_exact_original_embeddings_trains(tiny_cohort, tmp_path):
    wf = _workflow(
        tmp_path,
        tiny_cohort,
        epochs=1,
        **{"balance#mode": "re", "balance#re_embeddings": "original", "balance#warmup_epochs": 0},
    )
    _run(wf)
    assert wf.trainer.state.metrics["balance/cluster_size_0"] > 0
