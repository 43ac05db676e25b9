"""A picklable case loader that runs the bundle's deterministic preprocessing, for radiomics worker processes."""

from __future__ import annotations

import hashlib
import inspect
import os
import stat
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import json_hashing
from monai.transforms import Compose

from scripts.io_utils import atomic_write_text, sha256_file


class ROILoader:
    """``item -> (image [C, X, Y, Z], mask [X, Y, Z], spacing)`` after load, ROI crop and intensity rescale.

    Radiomics then sees exactly the ROI the encoder sees; spacing comes from the cropped image's affine.
    """

    def __init__(self, transforms: list) -> None:
        self.transforms = Compose(transforms)

    def __call__(self, item: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], dict]:
        """(image, mask, spacing, info): ``info`` carries what the crop knows and the ROI no longer shows, the
        volume faces the lesion touches (``lesion_at_border``), the mask rule applied (``mask_rule``) and what the
        box did to the lesion (``roi_geometry``: voxel size, box in mm, the share of the lesion left outside it)."""
        d = self.transforms(dict(item))
        image, mask = d["image"], d["mask"]
        affine = getattr(image, "affine", None)
        spacing = (
            (1.0, 1.0, 1.0) if affine is None else tuple(float(s) for s in torch.linalg.norm(affine[:3, :3], dim=0))
        )
        box = d.get("mask_box") or d.get("lung_mask_box") or {}  # TumourBoxd's, or LungBoxd's (NSCLC)
        info = {}
        if "touches_border" in box:
            info["lesion_at_border"] = list(box["touches_border"])
        if "mask_rule" in box:
            info["mask_rule"] = box["mask_rule"]
        if "geometry" in box:  # what the box did to the lesion: cut, padded, resampled, in mm (TumourBoxd)
            info["roi_geometry"] = box["geometry"]
        mask = np.asarray(mask)[0]
        # TumourBoxd / LungBoxd applied the mask rule to the whole volume: their binary crop is final (bool). Other
        # ROI transforms (a plain resize) pass the values on, and radiomics applies the same rule to them.
        return np.asarray(image, dtype=np.float32), (mask > 0 if "mask_rule" in box else mask), spacing, info


def setting_text(v, level: int = 0, depth: int = 3) -> str:
    """A stable text of one transform setting: plain values as ``repr``, small arrays by value, large ones by hash,
    the bundle's and MONAI's own objects by their settings (recursively, down to ``depth``), others by type."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(setting_text(x, level, depth) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{"
            + ",".join(
                f"{k!r}:{setting_text(x, level, depth)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))
            )
            + "}"
        )
    if isinstance(v, (np.ndarray, torch.Tensor)):
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return f"array{a.tolist()}" if a.size <= 64 else f"array{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()}"
    ours = type(v).__module__.startswith(("monai", "scripts"))
    if ours and level < depth and hasattr(v, "__dict__") and not inspect.isroutine(v):
        return _one(v, level + 1, depth)
    return type(v).__name__


def settings_of(t) -> dict:
    """A transform's public settings by name (its random state ``R`` is not a setting)."""
    return {k: v for k, v in sorted(vars(t).items()) if not k.startswith("_") and k != "R"}


def _one(t, level: int, depth: int) -> str:
    attrs = {k: setting_text(v, level, depth) for k, v in settings_of(t).items()}
    return f"{type(t).__name__}{attrs}"


def describe(transforms: list, depth: int = 3) -> str:
    """A stable text of transform classes and their plain settings (no object addresses), for cache keys.

    Nested objects (``ScaleIntensityRanged`` keeps its range in an inner ``ScaleIntensityRange``) are described
    recursively up to ``depth`` levels, so changing any plain setting changes the text.
    """
    return ";".join(_one(t, 0, depth) for t in transforms)


def transform_hash(transforms: list) -> bytes:
    """``PersistentDataset(hash_transform=...)``: cached volumes are keyed on the preprocessing settings as well as
    the case, so changing the ROI size, the profile or the views never serves a stale cached volume."""
    return hashlib.sha256(describe(list(transforms)).encode()).hexdigest().encode()


# (real path, size, mtime, ctime, inode) -> sha256: a file is hashed once per process, yet any rewrite (which
# changes ctime even when size and mtime are kept) is hashed again
_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: str, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime, ctime, inode) in this process and, with
    ``memo_dir``, on disk: DataLoader workers are new processes every epoch and would otherwise re-read every
    volume each epoch just to name its cache entry."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"  # the transforms then fail with an error naming the case and the file
    if not stat.S_ISREG(st.st_mode):
        return "not-a-file"  # a folder (a DICOM series): likewise, LoadCased names the case and the file
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    memo = memo_dir / hashlib.sha256(repr(key).encode()).hexdigest() if memo_dir is not None else None
    digest = None
    if memo is not None and memo.is_file():
        text = memo.read_text(encoding="utf-8").strip()
        digest = text if len(text) == 64 else None
    if digest is None:
        digest = sha256_file(path)
        if memo is not None:
            try:
                atomic_write_text(memo, digest + "\n")
            except OSError:
                pass  # a read-only cache folder only costs the re-hash
    _DIGESTS[key] = digest
    return digest


class ContentHash:
    """``PersistentDataset(hash_func=...)``: the case's entry (id, label, paths) plus the SHA-256 of every image
    and mask file, so a file rewritten at the same path (a corrected mask) is preprocessed again instead of the
    stale cached volume coming back. Together with ``transform_hash`` this keys the cache by content.

    ``cache_dir`` (the dataset's) keeps a small digest per file version under ``file_digests/``.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.memo_dir = str(Path(cache_dir) / "file_digests") if cache_dir else None

    def __call__(self, item: dict) -> bytes:
        memo_dir = Path(self.memo_dir) if self.memo_dir else None
        files = {}
        for key in ("image", "mask"):
            value = item.get(key)
            paths = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, str) else []
            files[key] = [_file_digest(str(p), memo_dir) for p in paths]
        return json_hashing({"item": item, "content_sha256": files})


def content_hash(item: dict) -> bytes:
    """:class:`ContentHash` without an on-disk digest memo."""
    return ContentHash()(item)


def file_digest(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file's bytes as :class:`ContentHash` computes it (remembered per file version, on disk under
    ``memo_dir``), ``"missing"`` when the file does not exist: for records of what a run read (training's
    ``run.json``, the pipeline's stage keys)."""
    return _file_digest(str(path), Path(memo_dir) if memo_dir is not None else None)
