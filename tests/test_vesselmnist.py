"""VesselMNIST3D npz -> NIfTI cohort + datalist, on a tiny synthetic npz in the official format (no ../shared)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data import build_cohort as datasets
from scripts.data.datalist import load_datalist
from scripts.data.validation import validate_datalist
from scripts.data.vesselmnist import LABEL_MAP, build_vesselmnist_cohort

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"train": 5, "val": 3, "test": 3}


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A binary 0/255 ellipsoid of random size and position: what a voxelised vessel segment looks like to the code."""
    grid = np.stack(np.meshgrid(*[np.arange(28, dtype=np.float32)] * 3, indexing="ij"))
    centre = rng.uniform(10, 18, size=3)[:, None, None, None]
    radii = rng.uniform(2, 6, size=3)[:, None, None, None]
    return np.where((((grid - centre) / radii) ** 2).sum(0) <= 1, 255, 0).astype(np.uint8)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        out[f"{split}_images"] = np.stack([_blob(rng) for _ in range(n)])
        out[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    return out


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def npz(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = _arrays()
    return _npz(tmp_path / "vesselmnist3d.npz", arrays), arrays


def test_cohort_files_datalist_and_summary(npz, tmp_path):
    path, arrays = npz
    datalist = build_vesselmnist_cohort(path, tmp_path / "cohort")
    doc = json.loads(datalist.read_text(encoding="utf-8"))
    train_ids = [f"vessel_train_{i:04d}" for i in range(5)] + [f"vessel_val_{i:04d}" for i in range(3)]
    assert [it["id"] for it in doc["training"]] == train_ids
    assert [it["id"] for it in doc["testing"]] == [f"vessel_test_{i:04d}" for i in range(3)]
    assert {it["split"] for it in doc["testing"]} == {"test"}
    for item in doc["training"] + doc["testing"]:
        split, row = item["split"], int(item["id"].rsplit("_", 1)[1])
        assert item["id"].startswith(f"vessel_{split}_")
        assert item["label"] == int(arrays[f"{split}_labels"][row, 0])
        assert item["image"] == f"cases/{item['id']}_image.nii.gz" and not Path(item["mask"]).is_absolute()

    item = load_datalist(datalist, "testing")[2]
    img, mask = nib.load(item["image"]), nib.load(item["mask"])
    np.testing.assert_array_equal(img.affine, np.eye(4))
    np.testing.assert_array_equal(mask.affine, np.eye(4))
    expected = arrays["test_images"][2]
    assert np.asanyarray(img.dataobj).dtype == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected)
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), (expected > 0).astype(np.uint8))

    assert validate_datalist(datalist, label_map=LABEL_MAP) == []
    cohort = json.loads((tmp_path / "cohort" / "cohort.json").read_text(encoding="utf-8"))
    assert cohort["npz_md5"] == hashlib.md5(path.read_bytes()).hexdigest() and not cohort["md5_matches_official"]
    assert cohort["licence"] == "CC BY 4.0"
    assert cohort["counts"]["train"] == {"n": 5, "by_label": {"0": 3, "1": 2}}
    assert cohort["counts"]["training (pooled)"] == {"n": 8, "by_label": {"0": 5, "1": 3}}
    assert cohort["counts"]["test"] == {"n": 3, "by_label": {"0": 2, "1": 1}}


def test_rerun_skips_valid_files_and_repairs_broken_ones(npz, tmp_path, capsys):
    path, _ = npz
    out = tmp_path / "cohort"
    datalist = build_vesselmnist_cohort(path, out)
    first = datalist.read_text(encoding="utf-8")
    files = sorted((out / "cases").glob("*.nii.gz"))
    assert len(files) == 2 * sum(SIZES.values())
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    torn, gone = out / "cases" / "vessel_val_0001_image.nii.gz", out / "cases" / "vessel_test_0000_mask.nii.gz"
    torn.write_bytes(torn.read_bytes()[:40])  # a write cut short
    gone.unlink()
    (out / "cases" / ".vessel_train_0000_mask.nii.gz.abc123.tmp").write_bytes(b"")  # left by a killed build
    capsys.readouterr()

    assert build_vesselmnist_cohort(path, out) == datalist
    assert "(2 files written, 20 reused)" in capsys.readouterr().out
    assert datalist.read_text(encoding="utf-8") == first
    assert not list((out / "cases").glob(".*.tmp"))
    for f in sorted((out / "cases").glob("*.nii.gz")):
        if f.name not in (torn.name, gone.name):
            assert f.stat().st_mtime_ns == stamps[f.name], f"{f.name} was rewritten"
    assert validate_datalist(datalist, label_map=LABEL_MAP) == []


def test_limit_keeps_evenly_spaced_rows_and_their_ids(npz, tmp_path):
    path, _ = npz
    doc = json.loads(
        build_vesselmnist_cohort(path, tmp_path / "small", splits=("train", "test"), limit=2).read_text(
            encoding="utf-8"
        )
    )
    assert [it["id"] for it in doc["training"]] == ["vessel_train_0000", "vessel_train_0004"]
    assert [it["id"] for it in doc["testing"]] == ["vessel_test_0000", "vessel_test_0002"]


def _without(arrays: dict, key: str) -> dict:
    return {k: v for k, v in arrays.items() if k != key}


def _with(arrays: dict, key: str, value: np.ndarray) -> dict:
    return {**arrays, key: value}


def _zeroed(arrays: dict, key: str, row: int) -> dict:
    images = arrays[key].copy()
    images[row] = 0
    return _with(arrays, key, images)


BAD = {
    "missing array": (lambda a: _without(a, "val_labels"), r"array 'val_labels' is missing"),
    "wrong image shape": (
        lambda a: _with(a, "train_images", a["train_images"][:, :, :, :27]),
        r"array 'train_images' has shape \(5, 28, 28, 27\), expected \(N, 28, 28, 28\)",
    ),
    "flat labels": (lambda a: _with(a, "test_labels", a["test_labels"][:, 0]), r"array 'test_labels' has shape \(3,\)"),
    "label out of range": (
        lambda a: _with(a, "train_labels", a["train_labels"] + 1),
        r"array 'train_labels' holds labels \[2\], expected only 0 and 1",
    ),
    "all-zero image": (
        lambda a: _zeroed(a, "val_images", 1),
        r"empty mask, in vessel_val_0001 \(val_images\[1\]\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_npz_fails_naming_the_array(case, tmp_path):
    make, message = BAD[case]
    path = _npz(tmp_path / "bad.npz", make(_arrays()))
    with pytest.raises(ValueError, match=message):
        build_vesselmnist_cohort(path, tmp_path / "cohort")
    assert not (tmp_path / "cohort").exists()  # checked before anything is written


def test_cli_prints_the_datalist_path(npz, tmp_path, monkeypatch, capsys):
    path, _ = npz
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["datasets", "vesselmnist", str(path), "--out", str(out), "--limit", "1"])
    datasets.main()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "datalist.json")
    assert len(json.loads((out / "datalist.json").read_text(encoding="utf-8"))["testing"]) == 1


def test_profile_keeps_the_whole_shape_in_a_32_cube(npz, tmp_path):
    """The profile's ROI is the whole volume, zero-padded, with 0/255 values kept: the shape is the signal."""
    path, arrays = npz
    datalist = build_vesselmnist_cohort(path, tmp_path / "cohort", splits=("test",))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "data" / "vesselmnist.json")])
    assert parser["label_map"] == LABEL_MAP and parser["positive_label"] == 1  # the profile over train.json
    transforms = parser.get_parsed_content("deterministic_transforms")
    for item in load_datalist(datalist, "testing"):
        d = dict(item)
        for t in transforms:
            d = t(d)
        image, mask = torch.as_tensor(d["image"]), torch.as_tensor(d["mask"])
        source = arrays["test_images"][int(item["id"].rsplit("_", 1)[1])]
        assert image.shape == (1, 32, 32, 32) and mask.shape == (1, 32, 32, 32)
        assert set(torch.unique(image).tolist()) <= {0.0, 255.0}
        assert int((image > 0).sum()) == int((source > 0).sum())
        torch.testing.assert_close(image[0, 2:30, 2:30, 2:30].numpy(), source.astype(np.float32))
        torch.testing.assert_close(mask, (image > 0).float())


def test_not_an_npz_and_bad_limit_fail_clearly(npz, tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    with pytest.raises(ValueError, match=r"junk.npz: not a readable .npz archive"):
        build_vesselmnist_cohort(junk, tmp_path / "a")
    with pytest.raises(ValueError, match=r"limit must be a positive number"):
        build_vesselmnist_cohort(npz[0], tmp_path / "b", limit=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
