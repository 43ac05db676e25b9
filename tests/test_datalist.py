"""Datalist loading and the validator: every bad input is reported with the case id, all at once."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.datalist import labelled_ids, load_datalist
from scripts.data.validation import validate_datalist

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, arr, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), path)
    return path.name


def _good(tmp: Path, name: str, shape=(12, 12, 12)) -> dict:
    """A clean case whose image is its own (seeded by the name): two cases with identical files are a problem."""
    img = np.random.default_rng(sum(name.encode())).normal(100, 10, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:8, 4:8, 4:8] = 1
    return {
        "id": name,
        "image": _write(tmp / f"{name}_img.nii.gz", img),
        "mask": _write(tmp / f"{name}_msk.nii.gz", mask),
        "label": 1,
    }


def _datalist(tmp: Path, entries) -> Path:
    p = tmp / "datalist.json"
    p.write_text(json.dumps({"training": entries}))
    return p


def test_clean_datalist_has_no_problems_and_paths_resolve_relative_to_it(tmp_path):
    p = _datalist(tmp_path, [_good(tmp_path, "a"), _good(tmp_path, "b")])
    assert validate_datalist(p, label_map={"0": "x", "1": "y"}) == []
    items = load_datalist(p)
    assert items[0]["image"] == str(tmp_path / "a_img.nii.gz") and Path(items[0]["mask"]).is_absolute()
    assert labelled_ids(p) == {"a": 1, "b": 1}


def test_every_problem_reported_with_its_case(tmp_path):
    shape = (12, 12, 12)
    entries = [
        _good(tmp_path, n)
        for n in ("ok", "dup", "dup", "geom", "aff", "empty", "nan", "lab", "trunc", "flat2d", "five")
    ]
    entries.append({"id": "gone", "image": "nope.nii.gz", "mask": "nope_mask.nii.gz"})
    # image/mask shape mismatch
    entries[3]["mask"] = _write(tmp_path / "geom_msk.nii.gz", np.ones((12, 12, 10), np.uint8))
    # same shape, different spacing
    aff = np.diag([1.0, 1.0, 1.5, 1.0])
    entries[4]["mask"] = _write(tmp_path / "aff_msk.nii.gz", np.ones(shape, np.uint8), aff)
    entries[5]["mask"] = _write(tmp_path / "empty_msk.nii.gz", np.zeros(shape, np.uint8))
    nan = np.ones(shape, np.float32)
    nan[0, 0, :3] = np.nan
    entries[6]["image"] = _write(tmp_path / "nan_img.nii.gz", nan)
    entries[7]["label"] = 7
    raw = gzip.compress((tmp_path / "trunc_img.nii.gz").read_bytes())[:200]
    (tmp_path / "trunc_img.nii.gz").write_bytes(raw)
    entries[9]["image"] = _write(tmp_path / "flat2d_img.nii.gz", np.ones((12, 12), np.float32))
    entries[10]["image"] = _write(tmp_path / "five_img.nii.gz", np.ones((12, 12, 12, 2, 2), np.float32))
    problems = validate_datalist(_datalist(tmp_path, entries), label_map={"0": "a", "1": "b"})
    by_case = {}
    for p in problems:
        by_case.setdefault(p.case_id, []).append(p.problem)
    assert "ok" not in by_case
    assert any("duplicate case id" in m for m in by_case["dup"])
    assert any("shape" in m for m in by_case["geom"])
    assert any("affine mismatch" in m for m in by_case["aff"])
    assert any("empty mask" in m for m in by_case["empty"])
    assert any("3 non-finite" in m for m in by_case["nan"])
    assert any("label 7 not in the label map" in m for m in by_case["lab"])
    assert any("unreadable image" in m for m in by_case["trunc"])
    assert any("expected a 3D volume" in m for m in by_case["flat2d"])
    assert any("expected a 3D volume" in m for m in by_case["five"])
    assert sum("missing file" in m for m in by_case["gone"]) == 2
    assert all(str(p).startswith(p.case_id + "\t") for p in problems)


def test_data_root_confines_paths(tmp_path):
    (tmp_path / "inner").mkdir()
    entry = _good(tmp_path, "x")
    entry["image"] = "../" + tmp_path.name + "/" + entry["image"]
    p = tmp_path / "inner" / "datalist.json"
    p.write_text(json.dumps({"training": [entry]}))
    with pytest.raises(ValueError, match="outside the configured data root"):
        load_datalist(p, data_root=tmp_path / "inner")


def test_validate_command_exit_codes(tmp_path):
    good = _datalist(tmp_path, [_good(tmp_path, "a")])
    r = subprocess.run(
        [sys.executable, "-m", "scripts.data.build_cohort", "validate", str(good)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert r.returncode == 0 and r.stdout.startswith("OK: 1 cases"), r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"id": "lost", "image": "x.nii.gz", "mask": "y.nii.gz"}]}))
    r = subprocess.run(
        [sys.executable, "-m", "scripts.data.build_cohort", "validate", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("lost\t") and "missing file" in line for line in lines)


def test_validate_command_on_documents_that_are_no_datalist(tmp_path):
    """``{}``, a JSON list and a BOM-prefixed file: one line naming the file and exit 1, or OK; never a traceback."""
    good = _good(tmp_path, "a")
    cases = {
        "empty.json": ("{}", 1, "no cases in sections"),
        "list.json": ("[]", 1, "the top level is a JSON list"),
        "bom.json": ("\ufeff" + json.dumps({"training": [good]}), 0, "OK: 1 cases"),
    }
    for name, (text, code, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        r = subprocess.run(
            [sys.executable, "-m", "scripts.data.build_cohort", "validate", str(tmp_path / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            encoding="utf-8",
        )
        assert r.returncode == code and message in r.stdout and "Traceback" not in r.stderr, (name, r.stdout, r.stderr)


def test_nifti_and_nrrd_copies_of_one_volume_have_the_same_affine(tmp_path):
    """SimpleITK reports LPS world coordinates, nibabel RAS: an NRRD image with a NIfTI mask must not mismatch."""
    import nibabel as nib
    import SimpleITK as sitk

    from scripts.data.volumes import read_volume

    arr = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    affine = np.array([[-1.5, 0, 0, 10], [0, -2, 0, 20], [0, 0, 3, 30], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(arr, affine), tmp_path / "a.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")), str(tmp_path / "a.nrrd"))
    (a1, f1), (a2, f2) = read_volume(str(tmp_path / "a.nii.gz")), read_volume(str(tmp_path / "a.nrrd"))
    np.testing.assert_allclose(f1, f2, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a1), a2)
