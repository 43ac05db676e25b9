"""A picklable case loader that runs the bundle's deterministic preprocessing, for radiomics worker processes."""

from __future__ import annotations

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


def describe(transforms: list) -> str:
    """A stable text of transform classes and their plain settings (no object addresses), for cache keys."""

    def plain(v):
        if isinstance(v, (str, int, float, bool, type(None))):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(plain(x) for x in v) + "]"
        return type(v).__name__

    parts = []
    for t in transforms:
        attrs = {k: plain(v) for k, v in sorted(vars(t).items()) if not k.startswith("_") and k != "R"}
        parts.append(f"{type(t).__name__}{attrs}")
    return ";".join(parts)
