"""Transforms on real CT/MRI: the sample cases shipped in the pyradiomics-bhklab 3.1.4 source archive (BSD).

The archive (~35 MB) is fetched once with pip from the package registry into ``$SIAM3D_TEST_CACHE`` (default
``~/.cache/siam3d-radiomics``); without registry access the tests skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from monai.transforms import LoadImaged, Orientationd

from scripts.transforms import LungBoxd, LungMaskd, TumourBoxd

CACHE = Path(os.environ.get("SIAM3D_TEST_CACHE", Path.home() / ".cache" / "siam3d-radiomics"))


@pytest.fixture(scope="module")
def real_data() -> Path:
    data = CACHE / "pyradiomics_bhklab-3.1.4" / "data"
    if not (data / "lung1_image.nrrd").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            "pyradiomics-bhklab",
            "-d",
            str(CACHE),
            "pyradiomics-bhklab==3.1.4",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list(CACHE.glob("pyradiomics_bhklab-3.1.4.tar.gz"))
        if r.returncode != 0 or not archives:
            pytest.skip(
                f"could not fetch pyradiomics-bhklab 3.1.4 sample data from the registry: {r.stderr.strip()[-300:]}"
            )
        with tarfile.open(archives[0]) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith("pyradiomics_bhklab-3.1.4/data/") and m.name.endswith(".nrrd")
            ]
            tar.extractall(CACHE, members=members, filter="data")
    return data


def _load(data: Path, case: str) -> dict:
    d = {"id": case, "image": str(data / f"{case}_image.nrrd"), "mask": str(data / f"{case}_label.nrrd")}
    d = LoadImaged(keys=["image", "mask"], image_only=True, ensure_channel_first=True)(d)
    return Orientationd(keys=["image", "mask"], axcodes="RAS")(d)


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_lung_mask_and_box_on_real_ct(real_data, case):
    d = LungMaskd(keys="image")(_load(real_data, case))
    lung = d["lung_mask"][0] > 0
    voxel_ml = float(torch.linalg.norm(d["image"].affine[:3, :3], dim=0).prod()) / 1000
    volume_l = float(lung.sum()) * voxel_ml / 1000
    assert 1.0 < volume_l < 8.0, f"{case}: implausible lung volume {volume_l:.2f} L"
    # inside the body: the lungs never reach the in-plane border (outside air was removed)
    assert not lung[0].any() and not lung[-1].any() and not lung[:, 0].any() and not lung[:, -1].any()
    body = torch.nonzero(d["image"][0] > -500)
    lung_idx = torch.nonzero(lung)
    assert (lung_idx.min(0).values[:2] >= body.min(0).values[:2]).all() and (
        lung_idx.max(0).values[:2] <= body.max(0).values[:2]
    ).all()
    # the tumour (GTV) label lies in or next to the lungs
    gtv = d["mask"][0] > 0
    assert (gtv & lung).sum() > 0 or gtv.sum() == 0
    d = LungBoxd(keys=["image", "mask", "lung_mask"], roi_size=(112, 112, 112))(d)
    assert d["image"].shape == (1, 112, 112, 112) and d["mask"].sum() > 0


def test_tumour_box_on_real_mri(real_data):
    d = _load(real_data, "brain1")
    n_lesion = int((d["mask"] > 0).sum())
    d = TumourBoxd(keys=["image", "mask"], roi_size=(96, 96, 96))(d)
    assert d["image"].shape == (1, 96, 96, 96)
    assert int(d["mask"].sum()) == n_lesion  # the whole lesion is inside the box
    assert d["mask_box"]["clipped"]  # 25 thick slices: the box leaves the volume along z and is padded
    assert float(d["image"][0, 0, 0, 0]) == float(d["image"][0, :, :, -1].min())  # padding is background
