"""Outputs written atomically get the mode a plain ``open()`` would give them under the umask (0644 under 022,
0640 under 027), not ``mkstemp``'s 0600: tables and sidecars, model.pt, model.ts, report PNGs, the release zip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.feature_table import write_feature_table
from scripts.io_utils import atomic_path, atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(umask, tmp_path):
    from matplotlib.figure import Figure

    from scripts.downstream.report import _save
    from scripts.pretrain.networks import Encoder3D
    from scripts.torchscript import export_torchscript

    old = os.umask(umask)
    try:
        write_feature_table(tmp_path / "t.csv", ["a", "b"], ["f"], np.ones((2, 1)), {"x": 1})
        atomic_write_json(tmp_path / "stages.json", {})
        with atomic_path(tmp_path / "models" / "model.pt") as tmp:
            torch.save({"w": torch.zeros(1)}, tmp)
        export_torchscript(Encoder3D(), tmp_path / "models" / "model.ts", ROOT / "configs" / "metadata.json",
                           ROOT / "configs" / "inference.json")  # fmt: skip
        _save(Figure(figsize=(1, 1)), tmp_path / "report" / "roc.png")
        from scripts.data.demo_cohort import CohortSpec, generate_cohort

        cohort = generate_cohort(tmp_path / "cohort", CohortSpec(n_cases=2, shape=(16, 16, 16), seed=0))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = ["t.csv", "t.meta.json", "stages.json", "models/model.pt", "models/model.ts", "report/roc.png"]
    assert {f: oct(_mode(tmp_path / f)) for f in files} == {f: oct(expected) for f in files}
    assert _mode(cohort.parent) == 0o777 & ~umask and _mode(cohort) == expected
    assert not [p for p in tmp_path.rglob(".*.tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cohort_volumes_honour_the_umask(umask, tmp_path):
    """The BraTS/NSCLC builders write NIfTI/NRRD through a temporary file of the same extension (mkstemp, 0600)."""
    import nibabel as nib
    import SimpleITK as sitk

    from scripts.data.cohorts.common import _atomic_volume_write

    volume = np.zeros((4, 4, 4), dtype=np.uint8)
    old = os.umask(umask)
    try:
        _atomic_volume_write(lambda tmp: nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp), tmp_path / "m.nii.gz")
        _atomic_volume_write(lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(volume), tmp), tmp_path / "c.nrrd")
    finally:
        os.umask(old)
    assert {f: oct(_mode(tmp_path / f)) for f in ("m.nii.gz", "c.nrrd")} == dict.fromkeys(
        ("m.nii.gz", "c.nrrd"), oct(0o666 & ~umask)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nrrd", "m.nii.gz"]


def test_release_zip_honours_the_umask(tmp_path):
    from scripts.run.package import build_package

    old = os.umask(0o027)
    try:
        zip_path = Path(build_package(out=str(tmp_path / "dist")))
    finally:
        os.umask(old)
    assert _mode(zip_path) == 0o640


def test_training_checkpoints_honour_the_umask(tmp_path):
    """The resumable checkpoints (written by Ignite's DiskSaver through a temporary file) get the umask's mode."""
    from ignite.engine import Engine

    from scripts.pretrain.handlers import TrainingCheckpoint

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, batch: None)
    old = os.umask(0o027)
    try:
        TrainingCheckpoint(str(tmp_path / "ckpt"), {"network": net}).attach(engine)
        engine.run([0, 1], max_epochs=2)
    finally:
        os.umask(old)
    saved = sorted((tmp_path / "ckpt").glob("*.pt"))
    assert [p.name for p in saved] == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    assert {p.name: oct(_mode(p)) for p in saved} == {p.name: oct(0o640) for p in saved}
