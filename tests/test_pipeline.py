"""The one-command pipeline (pretrain -> embed -> radiomics -> supervised -> report) on a small on-disk cohort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """24 cases of 36³ (18:6): enough for 3-fold CV with a 20% validation split inside each training fold."""
    from scripts.data.demo_cohort import CohortSpec, generate_cohort

    return generate_cohort(
        tmp_path_factory.mktemp("cohort") / "small", CohortSpec(n_cases=24, shape=(36, 36, 36), seed=5)
    )


def _pipeline(out: Path, datalist: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "scripts.run.pipeline",
        "--out", str(out), "--datalist", str(datalist), "--svm_path", str(out / "svm" / "svm_ssl.joblib"),
        "--modes", "se", "--epochs", "1", "--seeds", "0", "--balance#warmup_epochs", "0", "--supervised#epochs", "1",
        "--roi_size", "[28,28,28]", "--num_workers", "0", "--batch_size", "4", "--steps_per_epoch", "2",
        "--knn_monitor", "false", "--balance#q", "2", "--balance#m", "4",
        "--n_folds", "3", "--label_fractions", "[1.0]", "--n_bootstrap", "20", "--radiomics_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900
    )
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_pipeline_writes_the_report_and_resumes(small_cohort, tmp_path):
    out = tmp_path / "run"
    _pipeline(out, small_cohort)
    results = json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))
    rows = results["rows"]
    for name in ("trad", "ssl (se)", "trad+ssl (se)", "ssl (random init)", "supervised (weighted CE)"):
        assert name in rows, f"{name} missing from the report rows {sorted(rows)}"
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "supervised (weighted CE)" in report and "ssl (se)" in report
    assert list((out / "se" / "models").glob("model.pt"))
    from scripts.downstream.svm_model import load_svm
    from scripts.torchscript import check_torchscript_matches

    check_torchscript_matches(out / "se" / "models" / "model.pt", out / "se" / "models" / "model.ts")
    # the SVM the MONAI Label app serves: fitted on the embeddings of the bundle's own models/model.pt
    svm = load_svm(out / "svm" / "svm_ssl.joblib")
    assert [str(c) for c in svm.classes] == ["0", "1"]
    from scripts.feature_table import read_feature_table

    # the served encoder embeds on the input the app gives it (inference.json's 32³), not this run's 28³
    assert read_feature_table(out / "ssl_bundle_model.csv")[3]["roi_size"] == [32, 32, 32]
    sidecar = json.loads((out / "svm" / "svm_ssl.joblib.json").read_text(encoding="utf-8"))
    assert sidecar["provenance"]["features"] == str(out / "ssl_bundle_model.csv")
    stages = json.loads((out / "stages.json").read_text(encoding="utf-8"))
    assert set(stages) >= {"pretrain_se", "embed_se", "radiomics", "evaluate", "embed_bundle_model"}

    again = _pipeline(out, small_cohort)  # a rerun finds every stage done
    assert again.stdout.count("skipped") == len(stages)


def test_pretrain_seeds_run_every_mode_per_seed_with_its_own_seed(tmp_path):
    cmd = [sys.executable, "-m", "scripts.run.pipeline", "--out", str(tmp_path / "dry"), "--modes", "plain,bank"]
    cmd += ["--pretrain_seeds", "0,3", "--seeded_modes", "bank", "--supervised", "false", "--dry_run", "true"]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tag, seed, mode in (("plain_s0", 0, "none"), ("bank_s3", 3, "bank")):
        args = json.loads((tmp_path / "dry" / "args" / f"pretrain_{tag}.json").read_text(encoding="utf-8"))
        assert args["seed"] == seed and args["balance#mode"] == mode
        assert args["output_dir"].endswith(tag)
    assert not (tmp_path / "dry" / "args" / "pretrain_plain_s3.json").exists()  # only bank repeats the seeds
    tables = json.loads((tmp_path / "dry" / "args" / "evaluate.json").read_text(encoding="utf-8"))["tables"]
    assert {"ssl (bank, seed 3)", "trad+ssl (plain, seed 0)", "trad"} <= set(tables)


def _dry(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scripts.run.pipeline", "--out", str(out), "--modes", "plain", "--supervised", "false"]
    return subprocess.run(
        [*cmd, "--dry_run", "true", *extra], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=120
    )


def test_presets_reach_the_stages_that_have_their_ids_and_the_control_row(tmp_path):
    proc = _dry(tmp_path / "dry", "--preset", "configs/presets/paper.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = tmp_path / "dry" / "args"
    train = json.loads((args / "pretrain_plain.json").read_text(encoding="utf-8"))["config_file"]
    embed = json.loads((args / "embed_plain.json").read_text(encoding="utf-8"))["config_file"]
    assert train[1].endswith("data/demo.json") and "paper" in Path(train[2]).name  # right after the profile
    layered_train = json.loads(Path(train[2]).read_text(encoding="utf-8"))
    layered_embed = json.loads(Path(embed[2]).read_text(encoding="utf-8"))
    assert layered_train["learning_rate"] == 0.01 and layered_train["context_transforms"] == []
    # inference has no training keys: it gets the input the encoder was trained on (the whole box), no optimiser
    assert layered_embed["context_transforms"] == [] and not {"learning_rate", "augmentation"} & set(layered_embed)
    control = json.loads((args / "embed_random_init.json").read_text(encoding="utf-8"))
    assert control["checkpoint"].endswith("plain/models/checkpoints/model_init.pt")
    tables = json.loads((args / "evaluate.json").read_text(encoding="utf-8"))["tables"]
    assert "ssl (random init)" in tables and "trad+ssl (random init)" not in tables
    assert not (tmp_path / "nocontrol" / "args" / "embed_random_init.json").exists()
    assert _dry(tmp_path / "nocontrol", "--control", "false").returncode == 0
    assert not (tmp_path / "nocontrol" / "args" / "embed_random_init.json").exists()


def test_the_complementary_preset_trains_on_the_pipelines_own_radiomics(tmp_path):
    proc = _dry(tmp_path / "dry", "--preset", "configs/presets/complementary.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((tmp_path / "dry" / "args" / "pretrain_plain.json").read_text(encoding="utf-8"))
    layer = json.loads(Path(args["config_file"][2]).read_text(encoding="utf-8"))
    assert layer["regularizer#covariance"] == 0.01 and layer["regularizer#radiomics"] == 1.0
    # the stage override (after the configs) points the term at the table the radiomics stage writes first
    assert args["regularizer#radiomics_table"] == str(tmp_path / "dry" / "radiomics_features.csv")
    stages = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[pipeline] ")]
    assert stages.index("[pipeline] radiomics") < stages.index("[pipeline] pretrain_plain")


def test_a_preset_with_an_unknown_id_is_refused_before_any_stage(tmp_path):
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({"learning_rat": 0.1}), encoding="utf-8")
    proc = _dry(tmp_path / "dry", "--preset", str(bad))
    assert proc.returncode != 0 and "learning_rat" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "dry" / "args").exists()


def test_balancing_table_averages_over_pretraining_seeds_and_compares_step_times(tmp_path):
    from scripts.downstream.balancing_table import balancing_table

    def row(sens: float) -> dict:
        return {
            "protocol": {
                "summary": {"1.0": {"sensitivity": {"folds": {"mean": sens}}, "auc": {"folds": {"mean": 0.5}}}}
            }
        }

    results = {
        "task": "binary",
        "label_fractions": [1.0],
        "rows": {"trad": row(0.7), "ssl (bank, seed 0)": row(0.6), "ssl (bank, seed 1)": row(0.8)},
    }
    dirs = {}
    for mode, step in (("plain", 1.0), ("bank", 1.01)):
        d = tmp_path / f"{mode}_s0"
        d.mkdir()
        epochs = [{"epoch": 1, "step_time_median_s": 9.0}, {"epoch": 2, "step_time_median_s": step}]
        (d / "training_log.json").write_text(json.dumps({"epochs": epochs}))
        dirs[mode] = [d]
    md, data = balancing_table(results, dirs)
    bank = next(r for r in data["rows"] if r["mode"] == "bank")
    assert bank["seeds"] == [0, 1]
    assert bank["metrics"]["sensitivity@1.0"]["mean"] == pytest.approx(0.7)
    assert bank["metrics"]["sensitivity@1.0"]["sd"] == pytest.approx(0.1414, abs=1e-3)
    assert "0.700 ± 0.141" in md and "| trad | – | 1 | 0.700 |" in md
    assert data["step_times"]["bank"]["overhead_pct"] == pytest.approx(1.0)  # the warm-up epoch is left out


def test_a_second_pipeline_into_the_same_folder_refuses_naming_the_first(small_cohort, tmp_path):
    """Issue 29: two pipelines into one ``--out`` started seconds apart both "succeeded", one's results overwritten.
    The first holds the folder's writer lock; the second refuses before writing anything, naming pid, host, start."""
    import os
    import signal
    import socket

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scripts.run.pipeline", "--out", str(out), "--datalist", str(small_cohort)]
    cmd += ["--modes", "plain", "--epochs", "1", "--supervised", "false", "--svm_path", "none", "--num_workers", "0"]
    first = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    try:
        assert "[pipeline] radiomics:" in first.stdout.readline()  # the first is running its first stage
        second = _dry(out)
        assert second.returncode != 0
        assert f"is being written by another pipeline pid {first.pid} on {socket.gethostname()}, started" in (
            second.stderr
        ), second.stderr
        assert json.loads((out / "args" / "radiomics.json").read_text(encoding="utf-8"))["datalist"] == str(
            small_cohort
        )  # the first's arguments, not the dry run's (which names no datalist)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the pipeline and its stage (its own session: nothing else)
        first.wait()
    assert _dry(out).returncode == 0  # the kernel released a killed holder's lock


def test_a_second_training_into_the_same_checkpoint_folder_refuses(tiny_cohort, tmp_path):
    """The same lock keeps one training per checkpoint folder (held here by another process, as a running training
    holds it)."""
    from workflows import train_workflow

    ckpt = tmp_path / "models" / "checkpoints"
    hold = "import sys, time\nfrom scripts.io_utils import writer_lock\n"
    hold += "with writer_lock(sys.argv[1], 'training'):\n    print('locked', flush=True)\n    time.sleep(300)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(ckpt)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, steps_per_epoch=1)
        with pytest.raises(Exception) as info:
            wf.initialize()
            wf.run()
        chain, e = [], info.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        assert any(f"{ckpt} is being written by another training pid {holder.pid}" in m for m in chain), chain
        assert not list(ckpt.glob("checkpoint_epoch=*.pt"))
    finally:
        holder.kill()
        holder.wait()


def _stages_run(out: Path, datalist: Path, *extra: str) -> tuple[set[str], set[str], dict | None]:
    """(stages run, stages skipped, results.json) of a tiny pipeline run (plain mode, no supervised, no SVM).

    With ``--dry_run true`` among ``extra``: the stages it would run (their command lines), and no results."""
    import re

    cmd = [
        sys.executable, "-m", "scripts.run.pipeline", "--out", str(out), "--datalist", str(datalist),
        "--modes", "plain", "--epochs", "1", "--steps_per_epoch", "2", "--supervised", "false", "--svm_path", "none",
        "--control", "false", "--n_folds", "3", "--label_fractions", "[1.0]", "--seeds", "0", "--knn_monitor", "false",
        "--roi_size", "[28,28,28]", "--num_workers", "0", "--batch_size", "4", "--radiomics_workers", "1", *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600
    )
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    skipped = set(re.findall(r"^\[pipeline\] (\w+): done earlier .*skipped", proc.stdout, re.M))
    if "--dry_run" in extra:
        return set(re.findall(r"^\[pipeline\] (\w+): \S+ -m monai\.bundle run ", proc.stdout, re.M)), skipped, None
    ran = set(re.findall(r"^\[pipeline\] (\w+): finished in", proc.stdout, re.M))
    return ran, skipped, json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))


def test_a_rerun_reruns_exactly_the_stages_whose_inputs_changed(small_cohort, tmp_path):
    """Issue 29: a pipeline rerun after a label fix, a rewritten mask or a changed setting said "done earlier,
    skipped" for every stage and kept the old report. Stage keys now cover the datalist's content, its files'
    contents and the upstream files each stage reads; one input of each kind is changed in turn."""
    import shutil

    import nibabel as nib
    import numpy as np

    cohort = tmp_path / "cohort"
    shutil.copytree(small_cohort.parent, cohort)
    datalist, out = cohort / small_cohort.name, tmp_path / "run"
    every = {"pretrain_plain", "embed_plain", "radiomics", "evaluate"}
    ran, skipped, first = _stages_run(out, datalist, "--n_bootstrap", "20")
    assert ran == every and not skipped
    (out / "report" / "balancing.md").write_text("an earlier run's, with --pretrain_seeds", encoding="utf-8")

    doc = json.loads(datalist.read_text(encoding="utf-8"))
    case = doc["training"][0]
    case["label"] = 1 - case["label"]  # a corrected label: only the stage that reads labels reruns
    datalist.write_text(json.dumps(doc), encoding="utf-8")
    ran, skipped, relabelled = _stages_run(out, datalist, "--n_bootstrap", "20")
    assert (ran, skipped) == ({"evaluate"}, every - {"evaluate"})
    assert relabelled["y"] != first["y"]
    assert not (out / "report" / "balancing.md").exists()  # no file of an earlier run beside this run's report

    state = json.loads((out / "stages.json").read_text(encoding="utf-8"))
    state["pretrain_plain"] = {"key": state["pretrain_plain"]["key"], "started": "then"}  # as if killed in it
    (out / "stages.json").write_text(json.dumps(state), encoding="utf-8")
    model = (out / "plain" / "models" / "model.pt").read_bytes()
    # and an evaluation setting changed in the same rerun (one pipeline run less for the suite): the killed
    # pretraining resumes to the same encoder, so the embeddings are kept, and only the evaluation reruns for it
    ran, skipped, rebootstrapped = _stages_run(out, datalist, "--n_bootstrap", "30")
    assert (ran, skipped) == ({"pretrain_plain", "evaluate"}, every - {"pretrain_plain", "evaluate"})
    assert json.loads((out / "args" / "pretrain_plain.json").read_text(encoding="utf-8"))["resume"] is True
    assert (out / "plain" / "models" / "model.pt").read_bytes() == model
    assert rebootstrapped["rows"]["trad"]["protocol"] != relabelled["rows"]["trad"]["protocol"]

    mask_file = cohort / doc["training"][1]["mask"]  # a mask rewritten in place: every stage reads it
    mask = nib.load(mask_file)
    data = np.asarray(mask.dataobj).copy()
    data[:, :, : data.shape[2] // 2] = 0  # half the lesion
    nib.save(nib.Nifti1Image(data, mask.affine, mask.header), mask_file)
    # a dry run shows what a rerun would do, without the 4 stages' run time in the suite
    ran, skipped, _ = _stages_run(out, datalist, "--n_bootstrap", "30", "--dry_run", "true")
    assert ran == every and not skipped
    # pretraining would start afresh on the new input (not a 0-iteration resume of the finished run); that a fresh
    # start moves the earlier run's checkpoints to checkpoints/previous/ is test_train_workflow's
    assert json.loads((out / "args" / "pretrain_plain.json").read_text(encoding="utf-8"))["resume"] is False
