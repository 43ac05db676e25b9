"""The paper's augmentation chain (Fig. 1): affine, appearance (sharpen/blur), contrast (gamma), noise.

Each view gets its own chain of MONAI dict transforms bound to its own key. Two chains matter: a single dict
transform applied to ``["image", "image_2"]`` would draw ONE set of random parameters for both keys and make
the two views identical.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

from monai.transforms import (
    CopyItemsd,
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandRotate90d,
    RandSpatialCropd,
    Resized,
)
from monai.transforms.traits import RandomizableTrait


class ViewCopyd(CopyItemsd, RandomizableTrait):
    """Copies ``image`` into the second view's key (and any original a strategy keeps) before the views are drawn.

    The copy itself is deterministic; it carries MONAI's random trait because it starts the per-epoch part of the
    loader's chain: ``PersistentDataset`` caches up to the first random transform, so the cached ROI stays the
    deterministic preprocessing alone, one copy on disk instead of two, and the validator and ``inferring`` (same
    preprocessing, same label-free items) read the entries training wrote instead of preprocessing every case again.
    """


def view_transforms(
    key: str,
    roi_size: Sequence[int],
    rotate_deg: float = 20.0,
    scale: float = 0.3,
    shift_fraction: float = 0.05,
    gamma: Sequence[float] = (0.7, 1.5),
    prob_gamma: float = 0.8,
    prob_sharpen: float = 0.3,
    prob_blur: float = 0.3,
    prob_noise: float = 0.5,
    noise_std: float = 5.0,
    sharpen_alpha: Sequence[float] = (10.0, 30.0),
    prob_flip: float = 0.0,
    prob_rot90: float = 0.0,
    crop_min: float = 1.0,
    b_max: float = 255.0,
    device: bool | str | None = None,
) -> list:
    """One random view of ``key`` (intensities in [0, b_max]): optional flips / quarter turns (``prob_flip``,
    ``prob_rot90``; off in the paper), an optional random-size crop resized back to the ROI (``crop_min`` < 1: each
    side keeps a fraction in [crop_min, 1]; SimSiam's RandomResizedCrop in 3D; off in the paper), rotation
    ±rotate_deg on every axis, scale 1 ± scale, shift ± shift_fraction of the ROI, gamma in ``gamma``, sharpening
    or blur, Gaussian noise.

    The paper gives the ranges, not the probabilities: the affine part is always applied (it is the core
    invariance), the others with the probabilities above. Sharpening is blur + ``alpha`` x (blur - blur of blur);
    MONAI's default ``alpha`` of 10-30 (the 0.3.0 setting, kept in the paper preset) saturates a [0, 255] ROI to
    black and white, which destroys the texture the phenotypes differ in. Out-of-volume voxels after the affine are 0, the
    background of a [0, 255] ROI; the final clamp keeps blur/sharpen/noise inside [0, b_max].

    ``device`` (the config's ``augmentation#device``) is ignored here: it tells the config to make the views on the
    training device instead (``scripts.pretrain.device_augment.DeviceViews``, the same settings and ranges).
    """
    rad = math.radians(rotate_deg)
    # cube symmetries (flips, quarter turns): exact, no interpolation. On a lesion-centred ROI they move whatever
    # surrounds the lesion (the head's edge, air) to another side in each view, so it cannot be what the views share
    symmetries = [RandFlipd(keys=key, prob=prob_flip, spatial_axis=a) for a in range(3)] if prob_flip > 0 else []
    if prob_rot90 > 0:
        symmetries += [
            RandRotate90d(keys=key, prob=prob_rot90, max_k=3, spatial_axes=ax) for ax in ((0, 1), (0, 2), (1, 2))
        ]
    crop = []
    if crop_min < 1.0:
        crop = [
            RandSpatialCropd(
                keys=key,
                roi_size=[max(1, round(crop_min * s)) for s in roi_size],
                max_roi_size=list(roi_size),
                random_center=True,
                random_size=True,
            ),
            Resized(keys=key, spatial_size=tuple(roi_size), mode="trilinear"),
        ]
    return (
        symmetries
        + crop
        + [
            RandAffined(
                keys=key,
                prob=1.0,
                rotate_range=(rad, rad, rad),
                scale_range=(scale, scale, scale),
                translate_range=tuple(shift_fraction * s for s in roi_size),
                mode="bilinear",
                padding_mode="zeros",
                spatial_size=tuple(roi_size),
            ),
            RandAdjustContrastd(keys=key, prob=prob_gamma, gamma=tuple(gamma)),
            RandGaussianSharpend(keys=key, prob=prob_sharpen, alpha=tuple(sharpen_alpha)),
            RandGaussianSmoothd(keys=key, prob=prob_blur, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
            RandGaussianNoised(keys=key, prob=prob_noise, mean=0.0, std=noise_std),
            Lambdad(keys=key, func=lambda x: x.clamp(0.0, b_max)),
        ]
    )


def view_settings(**settings) -> dict:
    """The ``augmentation`` block with :func:`view_transforms`' defaults filled in: the one list of augmentation
    settings, shared by the loader's MONAI chain and ``scripts.pretrain.device_augment.DeviceViews``. ``device``
    (the switch between the two) is kept; an unknown key is refused naming the known ones."""
    params = inspect.signature(view_transforms).parameters
    known = [k for k in params if k not in ("key", "roi_size")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise TypeError(f"unknown augmentation settings {unknown}; known: {known}")
    return {k: settings.get(k, params[k].default) for k in known}
