"""MLflow tracking of pretraining and of the evaluation report via ``--tracking configs/mlflow_tracking.json``.

MONAI 1.6's MLFlowHandler refuses MLflow's file store and logs to a local SQLite database
(``<output_dir>/mlruns.db``, artifacts in ``<output_dir>/mlruns``), so MLflow needs SQLAlchemy and Alembic as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (optional experiment tracking)")
pytest.importorskip("sqlalchemy", reason="mlflow's local SQLite store needs sqlalchemy")
pytest.importorskip("alembic", reason="mlflow's local SQLite store needs alembic")

from monai.bundle import ConfigWorkflow  # noqa: E402
from monai.utils import path_to_sqlite_uri  # noqa: E402

from scripts.feature_table import write_feature_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TRACKING = str(CONFIGS / "mlflow_tracking.json")
EXPERIMENT = "siam3d_radiomics"


def _run(configs: list[str], run_id: str, workflow_type: str, **override) -> None:
    wf = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id=run_id,
        tracking=TRACKING,
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def test_training_and_evaluation_are_tracked(tiny_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = {"bundle_root": str(tmp_path), "datalist": str(tiny_cohort)}
    _run(
        ["train.json"],
        "training",
        "train",
        cache_dir=str(tmp_path / "cache"),
        roi_size=[28, 28, 28],
        epochs=1,
        batch_size=2,
        steps_per_epoch=2,
        num_workers=0,
        knn_monitor=False,
        **common,
    )
    assert list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard must stay on"
    # TensorBoard: the learning rate at every iteration, the loss per iteration, each epoch metric once per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["learning_rate"] == [1, 2] and steps["train_loss"] == [1, 2], steps
    assert steps["collapse_std"] == [1] and steps["collapse_std_reference"] == [1], steps
    assert events.Scalars("learning_rate")[0].value == pytest.approx(0.001)  # the default recipe's Adam lr

    # evaluation on small feature tables of the same cases: the report's figures must reach the tracking store
    ids = [str(item["id"]) for item in json.loads(Path(tiny_cohort).read_text(encoding="utf-8"))["training"]]
    rng = np.random.default_rng(0)
    for table, width in (("ssl_features.csv", 8), ("radiomics_features.csv", 5)):
        columns = [f"{table.split('_')[0]}_{i}" for i in range(width)]
        write_feature_table(tmp_path / "eval" / table, ids, columns, rng.normal(size=(len(ids), width)))
    _run(
        ["train.json", "evaluate.json"],
        "evaluating",
        "infer",
        n_folds=3,
        seeds=[0],
        label_fractions=[1.0],
        n_bootstrap=20,
        **common,
    )

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(tmp_path / "eval" / "mlruns.db"))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r}"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    train = next(r for r in runs if "learning_rate" in r.data.params)
    evaluation = next(r for r in runs if "n_folds" in r.data.params)

    params = train.data.params
    assert params["epochs"] == "1" and params["batch_size"] == "2" and params["balance_mode"] == "none"
    assert params["roi_size"] == "[28, 28, 28]" and params["max_epochs"] == "1"
    assert {"train_loss", "collapse_std", "lr_group_0"} <= set(train.data.metrics)
    losses = client.get_metric_history(train.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2] and all(np.isfinite(m.value) for m in losses)
    assert 0.0 < train.data.metrics["collapse_std"] < 1.0
    assert any(a.startswith("config_") and a.endswith(".json") for a in _artifacts(client, train.info.run_id))

    assert evaluation.data.params["n_folds"] == "3"
    assert "trad/balanced_accuracy/fraction_1.0" in evaluation.data.metrics
    logged = _artifacts(client, evaluation.info.run_id)
    figures = sorted(p.name for p in (tmp_path / "eval" / "report").glob("*.png"))
    assert figures and set(figures) <= {Path(a).name for a in logged}, (figures, logged)
    assert {"report.md", "results.json"} <= {Path(a).name for a in logged}


def test_progress_bars_on_a_terminal_only(capsys, monkeypatch, caplog):
    """SVM protocol folds and training epochs show a tqdm bar on a terminal (forced here with SIAM3D_PROGRESS=1);
    off a terminal (a log file) no bar is drawn and training logs one line per epoch."""
    import logging

    from ignite.engine import Engine

    from scripts.downstream.protocol import run_protocol
    from scripts.pretrain.handlers import EpochProgress

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), np.repeat([0, 1], 15)
    settings = dict(n_folds=3, seeds=[0], label_fractions=[1.0], n_bootstrap=10)

    def train_two_epochs():
        engine = Engine(lambda e, b: {"loss": 0.5})
        EpochProgress().attach(engine)
        engine.run([0, 1, 2], max_epochs=2)

    monkeypatch.setenv("SIAM3D_PROGRESS", "1")
    run_protocol(X, y, **settings)
    train_two_epochs()
    err = capsys.readouterr().err
    assert "SVM protocol (4 features)" in err and "/3 [" in err and "fold" in err and "epoch 2/2" in err, err
    monkeypatch.delenv("SIAM3D_PROGRESS")  # pytest's captured stderr is not a terminal
    caplog.clear()  # only the lines of the runs below (logging may be at INFO already, from an earlier test)
    with caplog.at_level(logging.INFO, logger="scripts.pretrain.handlers"):
        run_protocol(X, y, **settings)
        train_two_epochs()
    assert capsys.readouterr().err == ""
    assert [r.getMessage().split(" done")[0] for r in caplog.records if "done in" in r.getMessage()] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
