"""The lesion-mask rule: what the bundle reads as "the lesion" in a mask file.

Labels are merged (every nonzero label is lesion), a soft (probability) mask is thresholded at ``SOFT_THRESHOLD``,
a mask with more than ``MAX_MASK_LABELS`` distinct values is not a label mask (an intensity image given as the
mask), fewer than ``MIN_MASK_VOXELS`` voxels are too few for shape and texture, and the connected components are
counted. ``lesion_mask`` applies the rule and says what it did; ``empty_mask_reason`` explains an empty result;
``lesion_border_sides`` says where a lesion touches the volume's faces. One rule for the validator, training's box
and radiomics.
"""

from __future__ import annotations

import logging

import numpy as np

from scripts.data.volumes import AXES

# Fewer lesion voxels have no meaningful shape or texture (pyradiomics refuses a single voxel); scripts.downstream.radiomics
# skips such cases with the same threshold.
MIN_MASK_VOXELS = 8


# A soft (probability) mask's lesion is value >= SOFT_THRESHOLD.
SOFT_THRESHOLD = 0.5


# More distinct nonzero values than this is an intensity image, not a label mask (BraTS has 3 labels, an instance mask
# of metastases a few dozen; a CT or MR intensity image hundreds to thousands).
MAX_MASK_LABELS = 64


def empty_mask_reason(raw: np.ndarray) -> str:
    """Why :func:`lesion_mask` found no lesion: no nonzero voxel at all, or a soft mask whose every value lies below
    the threshold (a faint probability map: it has nonzero voxels, which the user sees in a viewer)."""
    raw = np.asarray(raw)
    nonzero = int(np.count_nonzero(raw))
    if not nonzero:
        return "empty mask (no lesion voxels)"
    return (
        f"empty mask after the mask rule: {nonzero} voxel(s) are nonzero, but all are below the soft-mask threshold "
        f"{SOFT_THRESHOLD} (max {float(raw.max()):g}; lesion = value >= {SOFT_THRESHOLD}); threshold the probability "
        "map yourself or give a binary mask"
    )


def lesion_border_sides(mask: np.ndarray) -> list[str]:
    """Faces of the volume the lesion touches, e.g. ``["x-", "z+"]`` (spatial axes of a [X, Y, Z] mask).

    A lesion on the border may continue outside the field of view: its crop is padded and its shape features
    describe only the visible part. Empty list when the lesion is inside (or the mask is empty).
    """
    mask = np.asarray(mask) != 0
    sides = []
    for axis in range(mask.ndim):
        first = np.take(mask, 0, axis=axis)
        last = np.take(mask, mask.shape[axis] - 1, axis=axis)
        name = AXES[axis] if axis < len(AXES) else str(axis)
        if first.any():
            sides.append(f"{name}-")
        if last.any():
            sides.append(f"{name}+")
    return sides


def rule_level(rule: str) -> int:
    """Log level of an applied mask rule: a warning when lesion-like voxels are left out (a soft mask's halo, parts
    outside the box), information when nothing is (BraTS labels merged, every part inside the box)."""
    return logging.WARNING if ("left out" in rule or "outside it" in rule) else logging.INFO


def lesion_components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes) of the 26-connected components of a lesion mask, relabelled largest first: label 1 is the
    largest component and ``sizes[0]`` its voxel count."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(binary, dtype=bool), structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return labels, np.bincount(labels.ravel())[1:]
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")
    rank = np.zeros(n + 1, dtype=labels.dtype)
    rank[order + 1] = np.arange(1, n + 1)
    return rank[labels], sizes[order]


def lesion_mask(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """The lesion as a boolean [X, Y, Z] array and the rule applied ("binary" when there was nothing to decide).

    One rule for the validator, training (``TumourBoxd``) and radiomics, recorded where it is not "binary":

    * integer labels >= 0: nonzero = lesion, e.g. BraTS 1/2/4 -> whole tumour ("labels [1, 2, 4] merged"); more
      than ``MAX_MASK_LABELS`` distinct values is an intensity image given as the mask: ``ValueError``;
    * a soft (probability) mask, values in [0, 1] not all 0/1: lesion = value >= 0.5, so a faint halo does not
      count as lesion ("soft mask thresholded at 0.5");
    * several separate components (26-connected; a multi-focal lesion, or one split by thick slices): all are
      lesion, as pyradiomics reads one label ("2 components (3524 + 613 voxels), described together");
      ``TumourBoxd`` centres its box on all parts when it then holds the largest part whole, else on the largest
      part, and says how many lesion voxels the box leaves out;
    * negative values, NaN/Inf, non-integers outside [0, 1], or a mask covering the whole volume: ``ValueError``.

    A boolean array is a lesion already decided by this rule upstream (the ROI loader's crop of ``TumourBoxd``'s
    mask, which a box may cut into pieces): only the whole-volume check applies to it.
    """
    arr = np.asarray(mask)
    decided = arr.dtype == bool
    if decided:
        binary, rules = arr, []
    else:
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(f"mask has {int((~np.isfinite(arr)).sum())} non-finite (NaN/Inf) values")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"mask has non-numeric type {arr.dtype}")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0:
            raise ValueError(
                f"mask has negative values (min {lo:g}): neither a label mask (labels >= 0) nor a probability mask"
            )
        integral = not np.issubdtype(arr.dtype, np.floating) or bool(np.all(arr == np.round(arr)))
        if integral:
            binary = arr != 0
            values = np.unique(arr[binary]) if hi > 1 else np.array([1])
            if len(values) > MAX_MASK_LABELS:
                raise ValueError(
                    f"mask has {len(values)} distinct nonzero values ({lo:g} .. {hi:g}): not a label mask (an "
                    f"intensity image given as the mask?); a lesion mask has at most {MAX_MASK_LABELS} labels"
                )
            rules = [] if hi <= 1 else [f"labels {[int(v) for v in values[:10]]} merged (nonzero = lesion)"]
        elif hi <= 1:
            binary = arr >= SOFT_THRESHOLD
            rules = [
                f"soft mask thresholded at {SOFT_THRESHOLD} ({int(np.count_nonzero((arr > 0) & ~binary))} voxels in "
                f"(0, {SOFT_THRESHOLD}) left out)"
            ]
        else:
            raise ValueError(
                f"mask values are neither integer labels nor probabilities in [0, 1] (range {lo:g} .. {hi:g})"
            )
    if binary.size and binary.all():
        raise ValueError(
            "mask covers the whole volume (every voxel is lesion): not a segmentation of a lesion "
            "(an inverted mask, or a crop given as the mask?)"
        )
    if binary.ndim == 3 and not decided and binary.any():
        _, sizes = lesion_components(binary)
        if len(sizes) > 1:
            shown = " + ".join(str(int(v)) for v in sizes[:5]) + (" + ..." if len(sizes) > 5 else "")
            rules.append(f"{len(sizes)} components ({shown} voxels), described together")
    return np.asarray(binary, dtype=bool), "; ".join(rules) or "binary"
