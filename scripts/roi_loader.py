"""A picklable case loader that runs the bundle's deterministic preprocessing, for radiomics worker processes."""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import torch
from monai.transforms import Compose


class ROILoader:
    """``item -> (image [C, X, Y, Z], mask [X, Y, Z], spacing)`` after load, ROI crop and intensity rescale.

    Radiomics then sees exactly the ROI the encoder sees; spacing comes from the cropped image's affine.
    """

    def __init__(self, transforms: list) -> None:
        self.transforms = Compose(transforms)

    def __call__(self, item: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        d = self.transforms(dict(item))
        image, mask = d["image"], d["mask"]
        affine = getattr(image, "affine", None)
        spacing = (
            (1.0, 1.0, 1.0) if affine is None else tuple(float(s) for s in torch.linalg.norm(affine[:3, :3], dim=0))
        )
        return np.asarray(image, dtype=np.float32), np.asarray(mask)[0] > 0, spacing


def describe(transforms: list, depth: int = 3) -> str:
    """A stable text of transform classes and their plain settings (no object addresses), for cache keys.

    Nested objects (``ScaleIntensityRanged`` keeps its range in an inner ``ScaleIntensityRange``) are described
    recursively up to ``depth`` levels, so changing any plain setting changes the text.
    """

    def plain(v, level: int) -> str:
        if isinstance(v, (str, int, float, bool, type(None))):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(plain(x, level) for x in v) + "]"
        if isinstance(v, dict):
            return (
                "{"
                + ",".join(f"{k!r}:{plain(x, level)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0])))
                + "}"
            )
        if isinstance(v, (np.ndarray, torch.Tensor)):
            a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
            return f"array{a.tolist()}" if a.size <= 64 else f"array{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()}"
        ours = type(v).__module__.startswith(("monai", "scripts"))
        if ours and level < depth and hasattr(v, "__dict__") and not inspect.isroutine(v):
            return one(v, level + 1)
        return type(v).__name__

    def one(t, level: int) -> str:
        attrs = {k: plain(v, level) for k, v in sorted(vars(t).items()) if not k.startswith("_") and k != "R"}
        return f"{type(t).__name__}{attrs}"

    return ";".join(one(t, 0) for t in transforms)


def transform_hash(transforms: list) -> bytes:
    """``PersistentDataset(hash_transform=...)``: cached volumes are keyed on the preprocessing settings as well as
    the case, so changing the ROI size, the profile or the views never serves a stale cached volume."""
    return hashlib.sha256(describe(list(transforms)).encode()).hexdigest().encode()
