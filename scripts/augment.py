"""The paper's augmentation chain (Fig. 1): affine, appearance (sharpen/blur), contrast (gamma), noise.

Each view gets its own chain of MONAI dict transforms bound to its own key. Two chains matter: a single dict
transform applied to ``["image", "image_2"]`` would draw ONE set of random parameters for both keys and make
the two views identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
)


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
    b_max: float = 255.0,
) -> list:
    """One random view of ``key`` (intensities in [0, b_max]): rotation ±rotate_deg on every axis, isotropic-ish
    scale 1 ± scale, shift ± shift_fraction of the ROI, gamma in ``gamma``, sharpening or blur, Gaussian noise.

    The paper gives the ranges, not the probabilities: the affine part is always applied (it is the core
    invariance), the others with the probabilities above. Sharpening is blur + ``alpha`` x (blur - blur of blur);
    MONAI's default ``alpha`` of 10-30 (the 0.3.0 setting, kept in the paper preset) saturates a [0, 255] ROI to
    black and white, which destroys the texture the phenotypes differ in. Out-of-volume voxels after the affine are 0, the
    background of a [0, 255] ROI; the final clamp keeps blur/sharpen/noise inside [0, b_max].
    """
    rad = math.radians(rotate_deg)
    return [
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
