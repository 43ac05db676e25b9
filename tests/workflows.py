"""Helpers shared by test files (not collected by pytest): the training workflow as ``monai.bundle run`` builds it."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parent.parent


def train_workflow(bundle_root: Path, datalist: Path, **override) -> ConfigWorkflow:
    """``configs/train.json`` with a tiny-run base (28³ ROI, loader in-process, cache under ``bundle_root``, no
    per-epoch TorchScript export: ``torchscript_path="$@ckpt_dir + '/model.ts'"`` turns it on); ``override``
    (epochs, batch_size, any config id) wins."""
    args = dict(
        bundle_root=str(bundle_root),
        datalist=str(datalist),
        cache_dir=str(Path(bundle_root) / "cache"),
        roi_size=[28, 28, 28],
        num_workers=0,
        torchscript_path=None,
    )
    args.update(override)
    return ConfigWorkflow(
        workflow_type="train",
        config_file=str(ROOT / "configs" / "train.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **args,
    )


def run_infer_workflow(config_files: list[str], run_id: str, **override) -> ConfigWorkflow:
    """``python -m monai.bundle run <run_id> --config_file <configs/...>`` in-process: initialise, run, finalise."""
    wf = ConfigWorkflow(
        workflow_type="infer",
        config_file=[str(ROOT / "configs" / f) for f in config_files],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        run_id=run_id,
        **override,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf
