"""Transforms on real CT/MRI: the sample cases shipped in the pyradiomics-bhklab 3.1.4 source archive (BSD).

The archive (~35 MB) is fetched once with pip from the package registry into ``$SIAM3D_TEST_CACHE`` (default
``~/.cache/siam3d-radiomics``); without registry access the tests skip and say why.

Besides the single transforms, the CT cases (lung1, lung2) go through the NSCLC builder (the archive's folder
as images and masks, a two-row clinical table) and the whole ``configs/data/nsclc.json`` preprocessing, and
the MRI cases (brain1, brain2) through ``configs/data/brats.json``'s; each case prints one line with its
lung-mask volume, box, ROI shape and seconds (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImaged, Orientationd

from scripts.data.cohorts import build_nsclc_datalist
from scripts.data.datalist import load_datalist
from scripts.data.transforms import LungBoxd, LungMaskd, TumourBoxd

ROOT = Path(__file__).resolve().parent.parent
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
        r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
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


@pytest.mark.parametrize("case", ["brain1", "brain2"])
def test_tumour_box_on_real_mri(real_data, case):
    d = _load(real_data, case)
    n_lesion = int((d["mask"] > 0).sum())
    d = TumourBoxd(keys=["image", "mask"], roi_size=(96, 96, 96))(d)
    assert d["image"].shape == (1, 96, 96, 96)
    assert int(d["mask"].sum()) == n_lesion  # the whole lesion is inside the box
    assert d["mask_box"]["clipped"]  # 23-25 thick slices: the box leaves the volume along z and is padded
    assert float(d["image"][0, 0, 0, 0]) == float(d["image"][0, :, :, -1].min())  # padding is background


def _profile(name: str, datalist: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "data" / f"{name}.json")])
    parser["datalist"] = str(datalist)
    return parser


def _steps(parser: ConfigParser) -> list:
    return parser.get_parsed_content("deterministic_transforms")


@pytest.fixture(scope="module")
def nsclc_datalist(real_data, tmp_path_factory) -> Path:
    """The archive's folder through the NSCLC builder: lung1/lung2 kept, the other sample cases reported."""
    out = tmp_path_factory.mktemp("real_nsclc")
    clinical = out / "clinical.csv"
    clinical.write_text("PatientID,Overall.Stage\nlung1,IIIa\nlung2, Stage I \n")
    return build_nsclc_datalist(real_data, real_data, clinical, out / "datalist.json", mask_pattern="*label*")


def test_nsclc_builder_on_the_real_folder(nsclc_datalist):
    doc = json.loads(nsclc_datalist.read_text(encoding="utf-8"))
    assert [(it["id"], it["label"]) for it in doc["training"]] == [("lung1", 3), ("lung2", 1)]
    assert {e["id"] for e in doc["excluded"]} >= {"brain1", "brain2", "breast1"}
    assert all(e["reason"].startswith("not in the clinical table: ") for e in doc["excluded"])


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_nsclc_profile_on_real_ct(nsclc_datalist, case):
    """configs/data/nsclc.json end to end: lung mask -> 224 mm lung box -> 112^3, intensities in [0, 255]."""
    parser = _profile("nsclc", nsclc_datalist)
    steps = _steps(parser)
    item = next(it for it in load_datalist(nsclc_datalist) if it["id"] == case)
    t0 = time.perf_counter()
    d = dict(item)
    for t in steps:
        if type(t).__name__ == "LungBoxd":  # measure the lung mask on the CT grid, before the box
            lung = d["lung_mask"][0] > 0
            voxel_ml = float(torch.linalg.norm(d["image"].affine[:3, :3], dim=0).prod()) / 1000
            volume_l = float(lung.sum()) * voxel_ml / 1000
            ct_shape = tuple(d["image"].shape[1:])
        d = t(d)
        if type(t).__name__ == "LungBoxd":
            box = d["lung_mask_box"]
    seconds = time.perf_counter() - t0
    print(
        f"\n[nsclc profile] {case}: CT {ct_shape}, lung mask {volume_l:.2f} L, lung box {box['size_voxels']} voxels "
        f"(224 mm) from {box['start']}, ROI {tuple(d['image'].shape)}, {seconds:.2f} s"
    )
    assert 1.0 < volume_l < 8.0
    assert tuple(d["image"].shape) == (1, 112, 112, 112) and tuple(d["mask"].shape) == (1, 112, 112, 112)
    assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 255.0 and float(d["mask"].sum()) > 0


@pytest.mark.parametrize("case", ["brain1", "brain2"])
def test_brats_profile_on_real_mri(real_data, tmp_path, case):
    """configs/data/brats.json end to end on one MRI channel: 96^3 tumour box, intensities in [0, 255]."""
    datalist = tmp_path / "datalist.json"
    item = {"id": case, "image": str(real_data / f"{case}_image.nrrd"), "mask": str(real_data / f"{case}_label.nrrd")}
    datalist.write_text(json.dumps({"training": [item], "testing": []}))
    parser = _profile("brats", datalist)
    assert parser.get_parsed_content("in_channels") == 1
    t0 = time.perf_counter()
    d = dict(load_datalist(datalist)[0])
    n_lesion = None
    for t in _steps(parser):
        if type(t).__name__ == "TumourBoxd":
            n_lesion, shape = int((d["mask"] > 0).sum()), tuple(d["image"].shape[1:])
        d = t(d)
        if type(t).__name__ == "TumourBoxd":
            box = d["mask_box"]
    seconds = time.perf_counter() - t0
    print(
        f"\n[brats profile] {case}: MRI {shape}, tumour box 96^3 from {box['start']} (clipped: {box['clipped']}), "
        f"lesion {n_lesion} voxels, ROI {tuple(d['image'].shape)}, {seconds:.2f} s"
    )
    assert tuple(d["image"].shape) == (1, 96, 96, 96) and int((d["mask"] > 0).sum()) == n_lesion
    assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 255.0
