"""benchmarks/learning_curve.py and benchmarks/ablation_table.py end to end on the tests' own on-disk cohort."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``learning_curve.main`` sets process-wide state (threads, seeds); later tests must not inherit it (the Rubik
    learning test's result depends on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_curves_of_two_settings_line_up_in_one_table(tiny_cohort, tmp_path, capsys):
    """Two real pretraining runs (2 steps each, one setting changed) -> one ablation table naming the change."""
    lc, table = _load("learning_curve"), _load("ablation_table")
    common = ["--eval-every", "1", "--out", str(tmp_path / "lc")]  # no --threads: it would outlive the test
    common += ["--cache-dir", str(tmp_path / "cache"), "--override", f"datalist={json.dumps(str(tiny_cohort))}"]
    ref = lc.main(["--recipe", "default", "--steps", "2", "--name", "ref", "--diagnostics", *common])
    batch = lc.main(["--recipe", "default", "--set", "batch=4", "--steps", "1", "--name", "batch4", *common])
    curve = ref["runs"]["default"]["curve"]
    assert [r["step"] for r in curve] == [0, 1, 2]
    assert {"bn_calibrated_probe_auc", "trainmode_probe_auc", "backbone_probe_auc"} <= set(curve[0])
    assert "bn_calibrated_probe_auc" not in curve[1]  # a control: the init only
    assert len(list((tmp_path / "cache").glob("learning_curve_rois_*.npz"))) == 1  # the second run reused the ROIs
    assert batch["runs"]["default"]["recipe"]["batch"] == 4
    assert ref["device"] == "cpu"
    capsys.readouterr()
    rows = table.main([str(tmp_path / "lc" / "ref.json"), str(tmp_path / "lc" / "batch4.json"), "--step", "1"])
    text = capsys.readouterr().out
    assert [r["file"] for r in rows] == ["ref.json", "batch4.json"]
    assert "ref.json: reference" in text and "batch4.json: batch=4, budget_steps=1 |" in text
    assert "random init (control)" in text and "first_order (control)" in text
    assert rows[0]["at_step"]["step"] == 1 and rows[0]["final"]["step"] == 2


def test_a_cuda_run_without_cuda_is_refused_before_any_work(tmp_path, capsys):
    """``--device cuda`` on a machine without CUDA: a usage error naming the reason, and nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    lc = _load("learning_curve")
    with pytest.raises(SystemExit) as e:
        lc.main(["--device", "cuda", "--steps", "1", "--out", str(tmp_path / "lc")])
    assert e.value.code == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert not (tmp_path / "lc").exists()


def test_a_cuda_run_trains_and_reads_out_on_the_gpu(tiny_cohort, tmp_path):
    """``--device cuda`` (ran on an H200 for the 0.6.1 curves): one step, read-outs, a CPU-loadable encoder."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lc = _load("learning_curve")
    args = ["--device", "cuda", "--steps", "1", "--eval-every", "1", "--out", str(tmp_path / "lc"), "--save-encoder"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--override", f"datalist={json.dumps(str(tiny_cohort))}"]
    result = lc.main(["--recipe", "default", "--name", "gpu", *args])
    assert result["device"] == torch.cuda.get_device_name(0)
    assert [r["step"] for r in result["runs"]["default"]["curve"]] == [0, 1]
    state = torch.load(tmp_path / "lc" / "gpu_default_step1_encoder.pt", map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values())


def test_roi_cache_is_keyed_on_the_cohort(tiny_cohort, tmp_path):
    """Another datalist (an env var or an edited file) or an edited config must not get the cached ROIs."""
    import torch

    lc = _load("learning_curve")
    other = tmp_path / "other"
    shutil.copytree(tiny_cohort.parent, other)
    items = json.loads((other / tiny_cohort.name).read_text())
    items["training"] = items["training"][:8]
    (other / tiny_cohort.name).write_text(json.dumps(items))
    configs = ["configs/train.json", "configs/data/demo.json"]
    first = lc.cached_rois(configs, {"datalist": str(tiny_cohort)}, tmp_path / "cache")
    second = lc.cached_rois(configs, {"datalist": str(other / tiny_cohort.name)}, tmp_path / "cache")
    again = lc.cached_rois(configs, {"datalist": str(tiny_cohort)}, tmp_path / "cache")
    assert len(first["ids"]) == 12 and len(second["ids"]) == 8 and again["ids"] == first["ids"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    # an edited config under the same name is other preprocessing: a new entry, not the cached ROIs
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"_comment": "changes nothing"}))
    unchanged = lc.cached_rois([*configs, str(layer)], {"datalist": str(tiny_cohort)}, tmp_path / "cache")
    layer.write_text(json.dumps({"context_transforms": []}))  # the whole box instead of the default lesion context
    whole_box = lc.cached_rois([*configs, str(layer)], {"datalist": str(tiny_cohort)}, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4
    assert torch.equal(unchanged["x"], first["x"])
    changed = whole_box["x"] != first["x"]
    assert changed.any() and float(first["x"][changed].abs().max()) == 0.0  # only blanked voxels differ


def _result(path: Path, seed: int, batch: int, init_auc: float, final_auc: float) -> Path:
    """A learning_curve.py result with one run: init and final read-outs only (the table needs nothing else)."""

    def readout(step: int, auc: float) -> dict:
        return {"step": step, "train_cpu_seconds": float(step), "knn_balanced_accuracy": 0.5, "probe_auc": auc}

    run = {"recipe": {"batch": batch, "seed": seed}, "curve": [readout(0, init_auc), readout(200, final_auc)]}
    path.write_text(json.dumps({"steps": 200, "minutes": None, "overrides": {}, "runs": {"default": run}}))
    return path


def test_seeds_of_one_setting_are_summarised_and_paired_with_the_reference(tmp_path, capsys):
    """Runs differing only in seed form one setting: mean ± sd, seeds above their own init, paired Δ with a t-CI."""
    table = _load("ablation_table")
    ref = [_result(tmp_path / f"ref{s}.json", s, 6, 0.6, auc) for s, auc in enumerate([0.5, 0.7, 0.9])]
    b32 = [_result(tmp_path / f"b32_{s}.json", s, 32, 0.6, auc) for s, auc in enumerate([0.7, 0.8, 0.9])]
    rows = table.main([str(p) for p in ref + b32] + ["--out", str(tmp_path / "t")])
    text = capsys.readouterr().out
    groups = json.loads((tmp_path / "t.json").read_text())["settings"]
    assert len(rows) == 6 and [g["seeds"] for g in groups] == [[0, 1, 2], [0, 1, 2]]
    assert groups[0]["probe_auc"]["mean"] == pytest.approx(0.7) and groups[0]["probe_auc"]["sd"] == pytest.approx(0.2)
    assert groups[0]["above_own_init"] == 2 and groups[1]["above_own_init"] == 3
    delta = groups[1]["paired_probe_auc_vs_reference"]  # differences 0.2, 0.1, 0.0
    assert delta["mean"] == pytest.approx(0.1)
    assert delta["ci_low"] == pytest.approx(0.1 - 4.302653 * 0.1 / 3**0.5, abs=1e-5)
    assert "| batch=32 | 0, 1, 2 |" in text and "+0.100 (-0.148 to +0.348), n=3" in text
    with pytest.raises(SystemExit, match="seed 0 of this setting is already in the table"):
        table.main([str(ref[0]), str(ref[0])])


def test_feature_content_reads_properties_out_of_an_encoder(tiny_cohort, tmp_path, capsys):
    """A saved encoder equal to the seed-0 init reads out exactly as the seed-0 random-init control; every ROI
    property gets an out-of-fold R², and each property's own phenotype AUC is direction-free (>= 0.5)."""
    import torch

    from scripts.pretrain.networks import Encoder3D

    fc = _load("feature_content")
    torch.manual_seed(0)
    path = tmp_path / "init_encoder.pt"
    torch.save(Encoder3D(in_channels=1, out_dim=256, hidden_dim=324, out_bn=True).state_dict(), path)
    args = ["--override", f"datalist={json.dumps(str(tiny_cohort))}", "--cache-dir", str(tmp_path / "cache")]
    result = fc.main([str(path), "--random-init", "0", "--out", str(tmp_path / "fc"), *args])
    rows = result["encoders"]
    assert list(rows) == ["random init, seed 0 (control)", "init_encoder.pt"]
    assert rows["init_encoder.pt"] == pytest.approx(rows["random init, seed 0 (control)"])
    assert {f"r2_{p}" for p in fc.PROPERTIES} <= set(rows["init_encoder.pt"])
    assert all(0.5 <= auc <= 1.0 for auc in result["property_auc"].values())
    assert "R² head share" in capsys.readouterr().out and (tmp_path / "fc.md").is_file()
    with pytest.raises(SystemExit, match="no such encoder file"):
        fc.main([str(tmp_path / "missing.pt"), *args])


def test_probe_c_rescores_a_saved_encoder_over_a_grid_of_c(tiny_cohort, tmp_path, capsys):
    """benchmarks/probe_c.py: each C's figure is the read-out of the encoder's eval-mode embeddings with that C
    (the fixed 0.1 is what the monitor reports); ``auto`` is scored too; a missing encoder is a usage error."""
    import torch

    from scripts.pretrain.networks import Encoder3D
    from scripts.pretrain.readout import readout, stratified_folds

    pc = _load("probe_c")
    torch.manual_seed(0)
    encoder = Encoder3D(in_channels=1, out_dim=256, hidden_dim=324, out_bn=True)
    torch.save(encoder.state_dict(), tmp_path / "init_encoder.pt")
    overrides = {"datalist": str(tiny_cohort)}
    args = ["--cache-dir", str(tmp_path / "cache"), "--override", f"datalist={json.dumps(str(tiny_cohort))}"]
    args += ["--probe-c", "0.1", "10", "auto", "--out", str(tmp_path / "pc.json")]
    result = pc.main([*args, "--encoders", str(tmp_path / "init_encoder.pt")])
    configs = ["configs/train.json", "configs/data/demo.json"]
    data = pc.lc.cached_rois(configs, overrides, tmp_path / "cache")
    y = data["y"].astype(int)
    z = pc.lc.embed(torch.nn.ModuleDict({"encoder": encoder}), data["x"], "output", channels_last=False)
    row = result["encoders"]["init_encoder.pt"]
    assert row["probe_auc"]["0.1"] == readout(z, y, stratified_folds(y))["probe_auc"]
    assert row["probe_auc"]["10.0"] == readout(z, y, stratified_folds(y), probe_c=10.0)["probe_auc"]
    assert set(row["probe_auc"]) == {"0.1", "10.0", "auto"} and "C=auto" in capsys.readouterr().out
    assert json.loads((tmp_path / "pc.json").read_text(encoding="utf-8"))["cases"] == len(y)
    with pytest.raises(SystemExit):
        pc.main([*args, "--encoders", str(tmp_path / "missing.pt")])
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "layers"), [("default", ["train.json"]), ("paper", ["train.json", "presets/paper.json"])]
)
def test_the_harness_recipes_are_the_bundle_configs(recipe, layers):
    """The harness's "default" and "paper" recipes train what README command 1 and the paper preset train."""
    lc = _load("learning_curve")
    config: dict = {}
    for layer in layers:  # later config files replace whole top-level keys, as monai.bundle layers them
        config.update(json.loads((ROOT / "configs" / layer).read_text(encoding="utf-8")))
    r = lc.make_recipe([recipe], [])
    assert r.augmentation == config["augmentation"]  # 20 == 20.0: exact values, either type
    assert (r.lr, r.weight_decay, r.batch, r.out_bn) == (
        config["learning_rate"],
        config["weight_decay"],
        config["batch_size"],
        config["out_bn"],
    )
