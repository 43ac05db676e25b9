"""scripts.downstream.radiomics on small NIfTI cases written here, with the real pyradiomics and the bundle's params file."""

from __future__ import annotations

import csv
import json
import pickle
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import radiomics

from scripts.downstream.radiomics import (
    RadiomicsCaseError,
    extract_case,
    extract_cohort,
    failures_path_for,
    load_case_files,
)
from scripts.feature_table import read_feature_table

PARAMS = Path(__file__).resolve().parents[1] / "configs" / "radiomics_params.yaml"
SHAPE = (24, 24, 24)
# pyradiomics' 107 "original" features of a 3D image, per class
CLASS_COUNTS = {"shape": 14, "firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120, 40, shape), 0, 255).astype(np.float32)


def _ellipsoid(shape=SHAPE, radii=(7, 5, 6)) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    return (sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1).astype(np.uint8)


def _one_voxel() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[12, 12, 12] = 1
    return mask


def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _case(tmp: Path, case_id: str, *, image=None, mask=None, spacing=(1.0, 1.0, 1.0), seed=0) -> dict:
    image = _image(seed) if image is None else image
    mask = _ellipsoid() if mask is None else mask
    return {
        "id": case_id,
        "image": _write(tmp / f"{case_id}_img.nii.gz", image, spacing),
        "mask": _write(tmp / f"{case_id}_seg.nii.gz", mask, spacing),
        "label": 0,
    }


def _failures(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_single_channel_gives_the_107_original_features_with_plausible_values():
    image, mask = _image(1), _ellipsoid()
    feats = extract_case(image, mask, (1.0, 1.0, 1.0), PARAMS, "c1")
    assert len(feats) == 107
    assert Counter(name.split("_")[1] for name in feats) == CLASS_COUNTS
    assert all(name.startswith("original_") for name in feats)
    assert all(np.isfinite(v) for v in feats.values())
    assert feats["original_shape_VoxelVolume"] == pytest.approx(mask.sum())
    assert feats["original_firstorder_Mean"] == pytest.approx(image[mask > 0].mean(), rel=1e-5)
    assert feats["original_firstorder_Maximum"] == pytest.approx(image[mask > 0].max(), rel=1e-6)
    assert list(feats) == sorted(feats)


def test_multichannel_columns_are_prefixed_per_channel():
    image = np.stack([_image(1), _image(2)])
    feats = extract_case(image, _ellipsoid(), (1.0, 1.0, 1.0), PARAMS, "mc")
    assert len(feats) == 214
    assert sum(k.startswith("c0_original_") for k in feats) == 107
    assert sum(k.startswith("c1_original_") for k in feats) == 107
    assert feats["c0_original_shape_MeshVolume"] == feats["c1_original_shape_MeshVolume"]
    assert feats["c0_original_firstorder_Mean"] != feats["c1_original_firstorder_Mean"]
    named = extract_case(image, _ellipsoid(), (1.0, 1.0, 1.0), PARAMS, "mc", channel_names=["t1", "flair"])
    assert list(named) == [k.replace("c0_", "t1_", 1).replace("c1_", "flair_", 1) for k in feats]
    with pytest.raises(RadiomicsCaseError, match="2 image channel"):
        extract_case(image, _ellipsoid(), (1.0, 1.0, 1.0), PARAMS, "mc", channel_names=["t1"])


def test_spacing_is_honoured_along_the_right_axes():
    image = _image(3)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:6, 4:12, 4:20] = 1  # extents 4 x 8 x 16 voxels along x, y, z
    iso = extract_case(image, mask, (1.0, 1.0, 1.0), PARAMS, "iso")
    aniso = extract_case(image, mask, (1.0, 1.0, 2.5), PARAMS, "aniso")
    assert aniso["original_shape_MeshVolume"] == pytest.approx(2.5 * iso["original_shape_MeshVolume"], rel=1e-6)
    assert aniso["original_shape_VoxelVolume"] == pytest.approx(2.5 * mask.sum())
    # 8 mm voxels along x make x the major axis: 4 * sqrt(var) with var = (4^2 - 1) / 12 * 8^2 = 80
    x_long = extract_case(image, mask, (8.0, 1.0, 1.0), PARAMS, "x")
    assert x_long["original_shape_MajorAxisLength"] == pytest.approx(4 * np.sqrt(80), rel=2e-2)
    assert x_long["original_shape_LeastAxisLength"] == pytest.approx(4 * np.sqrt(63 / 12), rel=2e-2)


@pytest.mark.parametrize(
    ("image", "mask", "reason"),
    [
        (_image(0), np.zeros(SHAPE, np.uint8), "empty mask"),
        (_image(0), _one_voxel(), "only 1 voxel"),
        (_image(0), _ellipsoid((24, 24, 20)), "shape mismatch"),
        (np.where(_ellipsoid() > 0, np.nan, _image(0)), _ellipsoid(), "inside the mask"),
        (np.where(_ellipsoid() > 0, _image(0), np.inf), _ellipsoid(), "0 inside the mask"),
    ],
)
def test_extract_case_rejects_bad_inputs_with_the_case_id(image, mask, reason):
    with pytest.raises(RadiomicsCaseError, match=reason) as info:
        extract_case(image, mask, (1.0, 1.0, 1.0), PARAMS, "bad_case")
    assert info.value.case_id == "bad_case"
    assert "bad_case" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))  # crosses worker process boundaries intact
    assert (clone.case_id, clone.reason, clone.about) == (info.value.case_id, info.value.reason, info.value.about)


def test_failures_are_reported_and_the_run_continues(tmp_path):
    items = [
        _case(tmp_path, "good_a", seed=1),
        _case(tmp_path, "empty", mask=np.zeros(SHAPE, np.uint8)),
        _case(tmp_path, "tiny", mask=_one_voxel()),
        _case(tmp_path, "nan", image=np.where(_ellipsoid() > 0, np.nan, _image(0)).astype(np.float32)),
        _case(tmp_path, "mismatch", mask=_ellipsoid((24, 24, 20))),
        {"id": "missing", "image": str(tmp_path / "nope.nii.gz"), "mask": str(tmp_path / "good_a_seg.nii.gz")},
        _case(tmp_path, "good_b", seed=2),
    ]
    out = tmp_path / "out" / "radiomics.csv"
    res = extract_cohort(items, out, params_file=PARAMS, num_workers=1, progress=False, provenance={"run": "t1"})
    assert (res.n_ok, res.n_failed, res.n_cached) == (2, 5, 0)
    ids, columns, values, meta = read_feature_table(out)
    assert ids == ["good_a", "good_b"] and len(columns) == 107 and np.isfinite(values).all()
    assert (
        meta["n_failed"] == 5
        and meta["pyradiomics_version"] == radiomics.__version__
        and len(meta["params_sha256"]) == 64
    )
    assert meta["run"] == "t1" and meta["n_cases"] == 7
    rows = {r["id"]: r for r in _failures(failures_path_for(out))}
    assert list(rows) == ["empty", "tiny", "nan", "mismatch", "missing"]  # datalist order
    assert "empty mask" in rows["empty"]["reason"] and rows["empty"]["file"].endswith("empty_seg.nii.gz")
    assert "only 1 voxel" in rows["tiny"]["reason"]
    assert "non-finite" in rows["nan"]["reason"] and rows["nan"]["file"].endswith("nan_img.nii.gz")
    assert "shape mismatch" in rows["mismatch"]["reason"]
    assert "missing image file" in rows["missing"]["reason"] and rows["missing"]["file"].endswith("nope.nii.gz")


def test_failures_file_exists_with_header_when_nothing_fails(tmp_path):
    out = tmp_path / "r.csv"
    extract_cohort([_case(tmp_path, "a")], out, params_file=PARAMS, num_workers=1, progress=False)
    assert failures_path_for(out).read_text(encoding="utf-8") == "id,file,reason\n"


def test_strict_raises_with_the_case_and_writes_no_table(tmp_path):
    items = [_case(tmp_path, "good", seed=1), _case(tmp_path, "empty", mask=np.zeros(SHAPE, np.uint8))]
    out = tmp_path / "r.csv"
    with pytest.raises(RadiomicsCaseError, match="empty mask") as info:
        extract_cohort(items, out, params_file=PARAMS, num_workers=1, strict=True, progress=False)
    assert info.value.case_id == "empty"
    assert not out.exists() and not failures_path_for(out).exists()
    items[1]["mask"] = str(tmp_path / "gone.nii.gz")
    with pytest.raises(RadiomicsCaseError, match="missing mask file"):
        extract_cohort(items, out, params_file=PARAMS, num_workers=1, strict=True, progress=False)
    assert not out.exists()


class _CountingLoader:
    """Records which cases were actually loaded (i.e. not served from the cache)."""

    def __init__(self):
        self.loaded: list[str] = []

    def __call__(self, item):
        from scripts.downstream.radiomics import load_case_files

        self.loaded.append(item["id"])
        return load_case_files(item)


def test_cache_hit_recomputes_nothing_and_changes_invalidate_it(tmp_path):
    items = [_case(tmp_path, f"case{i}", seed=i) for i in range(3)]
    cache = tmp_path / "cache"
    kw = {"params_file": PARAMS, "cache_dir": cache, "num_workers": 1, "progress": False}
    loader = _CountingLoader()
    first = extract_cohort(items, tmp_path / "a.csv", load_case=loader, **kw)
    assert (first.n_ok, first.n_cached) == (3, 0) and loader.loaded == ["case0", "case1", "case2"]

    loader.loaded.clear()
    second = extract_cohort(items, tmp_path / "b.csv", load_case=loader, **kw)
    assert (second.n_ok, second.n_cached) == (3, 3) and loader.loaded == []
    a, b = read_feature_table(tmp_path / "a.csv"), read_feature_table(tmp_path / "b.csv")
    assert a[:2] == b[:2] and np.array_equal(a[2], b[2])

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text(encoding="utf-8").replace("binWidth: 8", "binWidth: 16"))
    rebinned = extract_cohort(items, tmp_path / "c.csv", **{**kw, "params_file": params})
    assert rebinned.n_cached == 0
    c = read_feature_table(tmp_path / "c.csv")
    col = a[1].index("original_glcm_Contrast")
    assert not np.allclose(a[2][:, col], c[2][:, col])

    assert extract_cohort(items, tmp_path / "d.csv", cache_salt="crop=48", **kw).n_cached == 0
    assert extract_cohort(items, tmp_path / "d.csv", cache_salt="crop=48", **kw).n_cached == 3

    # a changed image file is recomputed, the others still come from the cache
    _write(Path(items[1]["image"]), _image(99))
    assert extract_cohort(items, tmp_path / "e.csv", **kw).n_cached == 2


def test_a_salt_that_changes_every_run_is_flagged(tmp_path, caplog):
    salt = repr([object()])  # "[<object object at 0x...>]": a new address every run
    extract_cohort(
        [_case(tmp_path, "a")],
        tmp_path / "r.csv",
        params_file=PARAMS,
        cache_dir=tmp_path / "c",
        cache_salt=salt,
        num_workers=1,
        progress=False,
    )
    assert "never be reused" in caplog.text


def test_a_killed_run_resumes_from_the_cache(tmp_path):
    items = [_case(tmp_path, f"case{i}", seed=i) for i in range(3)]
    kw = {"params_file": PARAMS, "cache_dir": tmp_path / "cache", "num_workers": 1, "progress": False}
    extract_cohort(items[:2], tmp_path / "partial.csv", **kw)  # as if the run had stopped after two cases
    assert extract_cohort(items, tmp_path / "all.csv", **kw).n_cached == 2


def test_parallel_equals_serial_and_keeps_datalist_order(tmp_path):
    items = [_case(tmp_path, f"case{i}", seed=i) for i in range(4)]
    items.append(_case(tmp_path, "empty", mask=np.zeros(SHAPE, np.uint8)))
    serial = extract_cohort(items, tmp_path / "s.csv", params_file=PARAMS, num_workers=1, progress=False)
    parallel = extract_cohort(items, tmp_path / "p.csv", params_file=PARAMS, num_workers=2, progress=False)
    assert (parallel.n_ok, parallel.n_failed) == (serial.n_ok, serial.n_failed) == (4, 1)
    s, p = read_feature_table(tmp_path / "s.csv"), read_feature_table(tmp_path / "p.csv")
    assert s[0] == p[0] == [f"case{i}" for i in range(4)] and s[1] == p[1]
    np.testing.assert_allclose(p[2], s[2], rtol=1e-12, atol=0)
    assert _failures(failures_path_for(tmp_path / "p.csv")) == _failures(failures_path_for(tmp_path / "s.csv"))


def test_multichannel_cohort_from_a_list_of_image_files(tmp_path):
    item = _case(tmp_path, "mc", seed=1)
    item["image"] = [item["image"], _write(tmp_path / "mc_t2.nii.gz", _image(7))]
    res = extract_cohort([item], tmp_path / "r.csv", params_file=PARAMS, num_workers=1, progress=False)
    _, columns, _, _ = read_feature_table(res.table_path)
    assert len(columns) == 214 and columns[0].startswith("c0_") and columns[-1].startswith("c1_")


def _broken_a(item):
    if item["id"] == "a":
        raise OSError("disk on fire")
    return load_case_files(item)


def test_loader_errors_and_duplicate_ids(tmp_path):
    items = [_case(tmp_path, "a"), _case(tmp_path, "b", seed=1)]

    def broken(item):
        raise OSError("disk on fire")

    res = extract_cohort(items, tmp_path / "r.csv", params_file=PARAMS, load_case=_broken_a, progress=False)
    assert res.n_failed == 1 and "could not load case: OSError: disk on fire" in res.failures[0].reason
    # every case failed: an error with the reasons, and the earlier table is kept (never replaced by an empty one)
    before = (tmp_path / "r.csv").read_bytes()
    with pytest.raises(RuntimeError, match=r"all 1 case\(s\) failed, no table written.*disk on fire"):
        extract_cohort(items[:1], tmp_path / "r.csv", params_file=PARAMS, load_case=broken, progress=False)
    assert (tmp_path / "r.csv").read_bytes() == before
    with pytest.raises(TypeError, match="picklable"):
        extract_cohort(items, tmp_path / "r.csv", params_file=PARAMS, load_case=broken, num_workers=2, progress=False)
    with pytest.raises(ValueError, match=r"duplicate case ids.*\['a'\]"):
        extract_cohort([*items, dict(items[0])], tmp_path / "r.csv", params_file=PARAMS, progress=False)


def test_params_file_is_checked_before_any_case(tmp_path):
    with pytest.raises(FileNotFoundError, match="params"):
        extract_cohort([_case(tmp_path, "a")], tmp_path / "r.csv", params_file=tmp_path / "x.yaml", progress=False)
    assert not (tmp_path / "r.csv").exists()


_FILE_SIZE_LIMIT = """
import json, resource, sys
from scripts.downstream.radiomics import extract_cohort
items, out, params, cache, limit = json.loads(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # `ulimit -f`: a write past it fails with EFBIG
extract_cohort(items, out, params_file=params, cache_dir=cache, num_workers=1, progress=False)
"""


def test_a_failed_table_write_keeps_the_earlier_table_meta_and_failure_report_together(tmp_path):
    """Issue 29: under ``ulimit -f`` the table write failed ("nothing was written"), yet the failure report of the
    new run was already in place beside the old table and meta. Now the three are renamed only once all are written."""
    import subprocess
    import sys

    items = [_case(tmp_path, f"case{i}", seed=i) for i in range(3)]
    out, cache = tmp_path / "out" / "radiomics.csv", tmp_path / "cache"
    extract_cohort(items, out, params_file=PARAMS, cache_dir=cache, num_workers=1, progress=False)
    earlier = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert sorted(earlier) == ["radiomics.csv", "radiomics.failures.csv", "radiomics.meta.json"]
    limit = len(earlier["radiomics.csv"]) // 2  # the small failure report and meta fit, the table does not
    assert max(len(earlier["radiomics.meta.json"]), 200) < limit
    missing = {"id": "gone", "image": items[0]["image"], "mask": str(tmp_path / "gone_seg.nii.gz")}
    args = [json.dumps([*items, missing]), str(out), str(PARAMS), str(cache), str(limit)]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT, *args], cwd=root, capture_output=True, text=True, encoding="utf-8"
    )
    assert r.returncode != 0 and f"cannot write {out}: File too large; nothing was written there" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == earlier  # no temporary left, nothing replaced
