"""MedMNIST VesselMNIST3D (a real, labelled, imbalanced development set) as a bundle cohort: NIfTI files + datalist.

The official ``vesselmnist3d.npz`` holds 28³ binary vessel-segment shapes (0/255, voxelised from MRA meshes) in
``{train,val,test}_images`` with ``*_labels`` of shape (N, 1): 0 = vessel segment, 1 = aneurysm. This module turns
it into exactly what a real cohort looks like to the bundle, so pretraining, embedding, radiomics and evaluation
read it through the same code paths as BraTS or NSCLC:

* ``cases/<id>_image.nii.gz`` (the volume as stored, uint8 0/255) and ``cases/<id>_mask.nii.gz`` (image > 0),
  identity affine, i.e. 1 mm isotropic voxels;
* ``datalist.json``: "training" = train + val pooled (the evaluation protocol cross-validates on the pool),
  "testing" = the official test split, every item with its label and the split it came from;
* ``cohort.json``: source, licence, the npz's md5 and the class counts per split.

Ids (``vessel_<split>_<index in that split's array>``) are stable across runs and say where each case came from.
The build is resumable: a case whose files already hold the right voxels is not rewritten, files are written
atomically, and the datalist is written last, so a killed build never leaves a datalist that points at missing
or stale files.
"""

from __future__ import annotations

import gzip
import os
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.io_utils import atomic_write_bytes, atomic_write_json, file_digest

SPLITS = ("train", "val", "test")
TRAINING_SPLITS = ("train", "val")  # pooled into the datalist's "training" section
SHAPE = (28, 28, 28)
LABEL_MAP = {"0": "vessel", "1": "aneurysm"}
OFFICIAL_MD5 = "b41fd4f7e7e2feedddb201585ecafa1b"  # the MedMNIST registry's md5 of vesselmnist3d.npz
SOURCE = "MedMNIST v2 VesselMNIST3D (Yang et al., Scientific Data 2023), source data IntrA (Yang et al., CVPR 2020)"
LICENCE = "CC BY 4.0"
AFFINE = np.eye(4)
PROGRESS_EVERY = 250


def md5_file(path: str | os.PathLike) -> str:
    """md5 of a file: the checksum MedMNIST publishes, so a user can compare it with the official one."""
    return file_digest(path, "md5")


def case_id(split: str, index: int) -> str:
    """Stable id naming the split and the row of that split's array the case came from."""
    return f"vessel_{split}_{index:04d}"


def load_npz(npz_path: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images [N, 28, 28, 28], labels [N])}`` after checking every array the build relies on.

    Fails with a message naming the array and the problem, and names every all-zero image up front: an empty
    mask is an error in the data, not a case to drop quietly.
    """
    npz_path = Path(npz_path)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: choose from {list(SPLITS)}")
    if not npz_path.is_file():
        raise FileNotFoundError(f"VesselMNIST3D npz not found: {npz_path}")
    out = {}
    try:
        z = np.load(npz_path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's messages for a non-npz file are misleading (pickles)
        raise ValueError(f"{npz_path}: not a readable .npz archive ({type(e).__name__}: {e})") from e
    with z:
        for split in splits:
            img_key, lab_key = f"{split}_images", f"{split}_labels"
            for key in (img_key, lab_key):
                if key not in z.files:
                    raise ValueError(f"{npz_path}: array {key!r} is missing (has: {sorted(z.files)})")
            images, labels = z[img_key], z[lab_key]
            if images.ndim != 4 or tuple(images.shape[1:]) != SHAPE:
                raise ValueError(f"{npz_path}: array {img_key!r} has shape {images.shape}, expected (N, 28, 28, 28)")
            if labels.shape != (len(images), 1):
                raise ValueError(
                    f"{npz_path}: array {lab_key!r} has shape {labels.shape}, expected ({len(images)}, 1) "
                    f"to match {img_key!r}"
                )
            bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
            if bad:
                raise ValueError(f"{npz_path}: array {lab_key!r} holds labels {bad}, expected only 0 and 1")
            empty = np.flatnonzero(~images.reshape(len(images), -1).any(axis=1))
            if len(empty):
                ids = ", ".join(f"{case_id(split, int(i))} ({img_key}[{int(i)}])" for i in empty[:10])
                more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
                raise ValueError(f"{npz_path}: all-zero image, so an empty mask, in {ids}{more}")
            out[split] = (images, labels[:, 0].astype(np.int64))
    return out


def subset_rows(n: int, limit: int | None) -> np.ndarray:
    """All rows, or ``limit`` evenly spaced ones: the arrays are sorted by label, so the first N would be one class."""
    if limit is None or int(limit) >= n:
        return np.arange(n)
    if int(limit) < 1:
        raise ValueError(f"limit must be a positive number of cases per split, got {limit}")
    return np.unique(np.linspace(0, n - 1, int(limit)).round().astype(np.int64))


def _nifti_gz(array: np.ndarray) -> bytes:
    """Deterministic .nii.gz bytes (gzip mtime 0): the same voxels always give the same file."""
    img = nib.Nifti1Image(array, AFFINE)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _holds(path: Path, expected: np.ndarray) -> bool:
    """Whether ``path`` is a readable NIfTI with exactly ``expected``'s voxels, dtype and the identity affine."""
    if not path.is_file():
        return False
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply rewritten
        return False
    return data.dtype == expected.dtype and np.array_equal(data, expected) and np.allclose(img.affine, AFFINE)


def _volumes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image as stored: uint8 kept, anything else float32; mask = image > 0 as uint8)."""
    img = image if image.dtype == np.uint8 else image.astype(np.float32)
    return img, (image > 0).astype(np.uint8)


def _counts(labels: np.ndarray) -> dict:
    c = Counter(int(v) for v in labels)
    return {"n": int(len(labels)), "by_label": {k: c.get(int(k), 0) for k in LABEL_MAP}}


def build_vesselmnist_cohort(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: tuple[str, ...] = SPLITS,
    limit: int | None = None,
) -> Path:
    """Write NIfTI image/mask pairs, ``cohort.json`` and (last) ``datalist.json`` into ``out_dir``; returns the
    datalist path. ``limit`` keeps N evenly spaced cases of each split (smoke runs; ids keep their row numbers).
    Re-running skips every case whose files are already right, so it is fast and resumes a killed build."""
    t0 = time.perf_counter()
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    splits = tuple(splits)
    data = load_npz(npz_path, splits)
    rows_of = {split: subset_rows(len(data[split][0]), limit) for split in splits}
    md5 = md5_file(npz_path)
    case_dir = out_dir / "cases"
    case_dir.mkdir(parents=True, exist_ok=True)
    for leftover in case_dir.glob(".vessel_*.nii.gz.*.tmp"):  # from a build killed mid-write (SIGKILL skips cleanup)
        leftover.unlink()
    datalist_path = out_dir / "datalist.json"
    sections: dict[str, list[dict]] = {"training": [], "testing": []}
    summary: dict[str, dict] = {}
    invalidated = False
    n_written = n_reused = 0
    for split in splits:
        images, labels = data[split]
        rows = rows_of[split]
        for done, i in enumerate(rows, start=1):
            cid = case_id(split, int(i))
            img, mask = _volumes(images[i])
            for suffix, volume in (("image", img), ("mask", mask)):
                path = case_dir / f"{cid}_{suffix}.nii.gz"
                if _holds(path, volume):
                    n_reused += 1
                    continue
                if not invalidated:  # a datalist must never point at a half-rebuilt cohort
                    datalist_path.unlink(missing_ok=True)
                    invalidated = True
                atomic_write_bytes(path, _nifti_gz(volume))
                n_written += 1
            section = "training" if split in TRAINING_SPLITS else "testing"
            sections[section].append(
                {
                    "id": cid,
                    "image": f"cases/{cid}_image.nii.gz",
                    "mask": f"cases/{cid}_mask.nii.gz",
                    "label": int(labels[i]),
                    "split": split,
                }
            )
            if done % PROGRESS_EVERY == 0 or done == len(rows):
                print(
                    f"{split}: {done}/{len(rows)} cases ({n_written} files written, {n_reused} reused so far)",
                    flush=True,
                )
        summary[split] = _counts(labels[rows])
    pooled = [item["label"] for item in sections["training"]]
    summary["training (pooled)"] = _counts(np.asarray(pooled, dtype=np.int64))
    cohort = {
        "source": SOURCE,
        "licence": LICENCE,
        "npz": str(npz_path.resolve()),
        "npz_md5": md5,
        "official_md5": OFFICIAL_MD5,
        "md5_matches_official": md5 == OFFICIAL_MD5,
        "label_map": LABEL_MAP,
        "shape": list(SHAPE),
        "spacing_mm": [1.0, 1.0, 1.0],
        "limit": limit,
        "sections": {
            "training": [s for s in splits if s in TRAINING_SPLITS],
            "testing": [s for s in splits if s not in TRAINING_SPLITS],
        },
        "counts": summary,
    }
    atomic_write_json(out_dir / "cohort.json", cohort)
    atomic_write_json(datalist_path, sections)
    n_cases = len(sections["training"]) + len(sections["testing"])
    print(
        f"VesselMNIST3D cohort: {n_cases} cases ({n_written} files written, {n_reused} reused) "
        f"in {time.perf_counter() - t0:.1f} s -> {datalist_path}",
        flush=True,
    )
    return datalist_path


def cli(npz: str, out: str, limit: int | None = None) -> str:
    """Build (or resume) the VesselMNIST3D cohort from NPZ into OUT and print its datalist path."""
    return str(build_vesselmnist_cohort(npz, out, limit=limit))
