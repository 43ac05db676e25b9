"""One case of pyradiomics: (image, mask, spacing) -> the paper's 107 "original" features, and a case's files -> arrays.

``extract_case`` is the per-case core of the traditional features (paper Section 3): shape, first order, GLCM,
GLRLM, GLSZM, GLDM and NGTDM of the lesion, after the bundle's mask rule; ``load_case_files`` reads a datalist item
(one or several image files as channels, one mask) with the validator's checks. Errors are ``RadiomicsCaseError``
naming the case and the file. The cohort (workers, cache, table, failure report) is ``scripts.downstream.radiomics``.

Array convention: numpy arrays are indexed (x, y, z), as nibabel and MONAI load them, and ``spacing`` is
(sx, sy, sz) in mm along those axes. SimpleITK indexes numpy arrays the other way round ((z, y, x)), so arrays are
transposed before ``GetImageFromArray`` and the spacing is given in (x, y, z) order: sitk index i of the image is
numpy index i of the array, and voxel sizes stay attached to the right axes (shape features depend on it).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel  # noqa: F401 - read lazily by scripts.data.datalist; imported here so the fork server preloads it
import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics import featureextractor

from scripts.data.lesion_mask import MIN_MASK_VOXELS, empty_mask_reason, lesion_border_sides, lesion_mask
from scripts.data.volumes import (
    AFFINE_TOL,
    affine_problem,
    float32_overflow,
    grid_match,
    read_volume,
    to_image_grid,
    volume_shape_problem,
)
from scripts.io_utils import sha256_file

logger = logging.getLogger(__name__)


def quiet_pyradiomics() -> None:
    """pyradiomics logs INFO per feature class and a WARNING per case ("GLCM is symmetrical"): keep errors only."""
    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


quiet_pyradiomics()


class RadiomicsCaseError(RuntimeError):
    """One case cannot be processed: ``case_id``, ``reason``, and the offending ``file`` when known.

    ``about`` ("image" or "mask") says which input is at fault when the file is not known yet (``extract_case``
    sees arrays), so the cohort report can name the right file.
    """

    def __init__(self, case_id: str, reason: str, file: str = "", about: str = ""):
        self.case_id = str(case_id)
        self.reason = reason
        self.file = str(file or "")
        self.about = about
        where = f" [{self.file}]" if self.file else ""
        super().__init__(f"radiomics case {self.case_id!r}: {reason}{where}")

    def __reduce__(self):  # keep the fields when the error crosses a process boundary
        return type(self), (self.case_id, self.reason, self.file, self.about)


# ----------------------------------------------------------------------------------------------------------- one case


EXTRACTORS: dict[tuple[str, str], featureextractor.RadiomicsFeatureExtractor] = {}


def extractor_key(params_file: str | os.PathLike) -> tuple[str, str]:
    path = Path(params_file)
    if not path.is_file():
        raise FileNotFoundError(f"pyradiomics params file not found: {path}")
    return str(path.resolve()), sha256_file(path)


def get_extractor(params_file: str | os.PathLike) -> featureextractor.RadiomicsFeatureExtractor:
    """One extractor per params file content and process: building one parses and validates the YAML (~0.1 s)."""
    key = extractor_key(params_file)
    path = key[0]
    if key not in EXTRACTORS:
        with warnings.catch_warnings():  # pykwalify (pyradiomics' schema validator) uses a deprecated importlib API
            warnings.filterwarnings("ignore", message=".*load_module.*", category=DeprecationWarning)
            EXTRACTORS[key] = featureextractor.RadiomicsFeatureExtractor(path)
    return EXTRACTORS[key]


def _to_sitk(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    """(x, y, z) numpy array -> SimpleITK image with sitk index == numpy index and spacing (sx, sy, sz)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _as_channels(image: np.ndarray, case_id: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        return image[None]
    if image.ndim == 4:
        return image
    raise RadiomicsCaseError(case_id, f"image must be [X, Y, Z] or [C, X, Y, Z], got shape {image.shape}")


def _as_mask(mask: np.ndarray, spatial_shape: tuple[int, ...], case_id: str, min_voxels: int) -> tuple[np.ndarray, str]:
    """(binary uint8 lesion mask, rule applied) by :func:`scripts.data.lesion_mask.lesion_mask` (the rule training and the
    validator apply: labels merged, soft masks thresholded at 0.5, separate parts described together), checked
    for size."""
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[0] == 1:  # MONAI channel-first
        mask = mask[0]
    if mask.shape != tuple(spatial_shape):
        raise RadiomicsCaseError(
            case_id, f"shape mismatch: image spatial shape {tuple(spatial_shape)} != mask {mask.shape}", about="mask"
        )
    try:
        lesion, rule = lesion_mask(mask)
    except ValueError as e:
        raise RadiomicsCaseError(case_id, str(e), about="mask") from e
    binary = lesion.astype(np.uint8)
    n = int(binary.sum())
    if n == 0:
        reason = empty_mask_reason(mask) if mask.dtype != bool else ""
        reason = "" if reason.startswith("empty mask (") else f" ({reason})"
        raise RadiomicsCaseError(case_id, f"empty mask (no nonzero voxel): no lesion to describe{reason}", about="mask")
    if n < min_voxels:
        raise RadiomicsCaseError(
            case_id,
            f"mask has only {n} voxel(s); at least {min_voxels} are needed for shape and texture features",
            about="mask",
        )
    return binary, rule


def _check_spacing(spacing: Sequence[float], case_id: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(s) and s > 0 for s in values):
        raise RadiomicsCaseError(case_id, f"spacing must be 3 positive finite numbers (sx, sy, sz), got {spacing!r}")
    return values


def _channel_prefixes(n_channels: int, channel_names: Sequence[str] | None, case_id: str) -> list[str]:
    """No prefix for a single unnamed channel (the paper's 107 columns); ``c{i}_`` or ``{name}_`` otherwise."""
    if channel_names is None:
        return [""] if n_channels == 1 else [f"c{i}_" for i in range(n_channels)]
    names = [str(n) for n in channel_names]
    if len(names) != n_channels:
        raise RadiomicsCaseError(case_id, f"{n_channels} image channel(s) but {len(names)} channel names {names}")
    if len(set(names)) != len(names):
        raise RadiomicsCaseError(case_id, f"channel names must be unique, got {names}")
    return [f"{n}_" for n in names]


def _check_finite(channels: np.ndarray, mask: np.ndarray, prefixes: list[str], case_id: str) -> None:
    """NaN/Inf anywhere would poison the bins (outside the mask too: pyradiomics pads the ROI with its neighbours)."""
    if not np.issubdtype(channels.dtype, np.floating):
        return
    for i, channel in enumerate(channels):
        bad = ~np.isfinite(channel)
        if bad.any():
            inside = int((bad & (mask != 0)).sum())
            name = prefixes[i].rstrip("_") or "0"
            raise RadiomicsCaseError(
                case_id,
                f"image channel {name} has {int(bad.sum())} non-finite (NaN/Inf) value(s): "
                f"{inside} inside the mask, {int(bad.sum()) - inside} outside",
                about="image",
            )


def _numeric_original(result: dict) -> dict[str, float]:
    """Keep the numeric ``original_*`` entries (pyradiomics returns 0-d arrays / numpy scalars)."""
    out = {}
    for name, value in result.items():
        if not name.startswith("original_"):
            continue
        arr = np.asarray(value)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            logger.debug("skipping non-numeric pyradiomics output %s=%r", name, value)
            continue
        v = arr.reshape(())[()]
        if np.iscomplexobj(v):
            # pyradiomics' shape eigenvalues of a tiny (e.g. 2x2x2) lesion come out complex with a rounding-sized
            # imaginary part (1+5.5e-17j): that is the real value; a real imaginary part would be NaN, not dropped
            v = v.real if abs(v.imag) <= 1e-9 * max(1.0, abs(v.real)) else math.nan
        out[name] = float(v)
    return out


def extract_case(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    params_file: str | os.PathLike,
    case_id: str,
    *,
    channel_names: Sequence[str] | None = None,
    min_voxels: int = MIN_MASK_VOXELS,
    notes: dict | None = None,
) -> dict[str, float]:
    """pyradiomics "original" features of one case: ``{[prefix]original_<class>_<feature>: value}``.

    ``image`` is [X, Y, Z] or [C, X, Y, Z] in (x, y, z) order, ``mask`` the same spatial shape (nonzero = lesion),
    ``spacing`` (sx, sy, sz). Each channel is described separately with the same mask; columns are prefixed
    ``c{i}_`` (or ``{channel_names[i]}_``) unless the image has a single unnamed channel. Columns come channel by
    channel, sorted by name within a channel. Raises :class:`RadiomicsCaseError` naming the case and the problem.
    ``notes``, when given, receives ``mask_rule`` (see :func:`scripts.data.lesion_mask.lesion_mask`) and ``constant_channels``
    (channels without any contrast inside the lesion: their intensity and texture features are degenerate).
    """
    channels = _as_channels(image, case_id)
    binary, rule = _as_mask(mask, channels.shape[1:], case_id, min_voxels)
    spacing = _check_spacing(spacing, case_id)
    prefixes = _channel_prefixes(len(channels), channel_names, case_id)
    _check_finite(channels, binary, prefixes, case_id)
    inside = binary.astype(bool)
    constant = [p.rstrip("_") or "0" for p, c in zip(prefixes, channels) if np.ptp(c[inside]) == 0]
    if notes is not None:
        notes["mask_rule"] = rule
        notes["lesion_at_border"] = lesion_border_sides(binary)
        if constant:
            notes["constant_channels"] = constant
    extractor = get_extractor(params_file)
    mask_image = _to_sitk(binary, spacing)
    features: dict[str, float] = {}
    for prefix, channel in zip(prefixes, channels):
        where = f" on channel {prefix.rstrip('_')}" if prefix else ""
        try:
            result = extractor.execute(_to_sitk(channel.astype(np.float64), spacing), mask_image, label=1)
        except Exception as e:  # whatever pyradiomics raises, the user needs the case id with it
            raise RadiomicsCaseError(case_id, f"pyradiomics failed{where}: {type(e).__name__}: {e}") from e
        numeric = _numeric_original(result)
        if not numeric:
            raise RadiomicsCaseError(case_id, f"pyradiomics returned no 'original_*' feature{where}; check imageType")
        features.update({prefix + name: numeric[name] for name in sorted(numeric)})
    return features


# ------------------------------------------------------------------------------------------------------ loading files


def image_paths(item: dict) -> list[str]:
    image = item["image"]
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def _spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def _read_one_volume(case_id: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(array [X, Y, Z], affine) of one file, refused with the validator's words when it is not one 3D volume with a
    usable affine (:func:`scripts.data.datalist.volume_shape_problem`, :func:`~scripts.data.datalist.affine_problem`)."""
    arr, affine = read_volume(path)
    arr = np.asarray(arr)
    problem = volume_shape_problem(arr.shape) or affine_problem(affine)
    if problem:
        raise RadiomicsCaseError(case_id, problem, path)
    return (arr[..., 0] if arr.ndim == 4 else arr), affine


def load_case_files(item: dict) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Default ``load_case``: (image [C, X, Y, Z], mask [X, Y, Z], spacing) straight from the item's files.

    A list of image paths gives one channel per file. Every file must hold one 3D volume (a 4D file is refused, as
    the validator and training refuse it) with a non-degenerate affine; values beyond float32's range are refused
    (training's loader computes in float32). No preprocessing: the bundle passes its own ``load_case`` to describe
    the preprocessed ROI instead.
    """
    case_id = str(item["id"])
    paths = image_paths(item)
    channels, spacing, image_affine = [], None, None
    for path in paths:
        arr, affine = _read_one_volume(case_id, path)
        problem = float32_overflow(arr)
        if problem:
            raise RadiomicsCaseError(case_id, problem, path)
        image_affine = affine if image_affine is None else image_affine
        channels.append(arr)
        spacing = spacing or _spacing_of(affine)
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise RadiomicsCaseError(case_id, f"image channels have different shapes {sorted(shapes)}", ";".join(paths))
    mask, mask_affine = _read_one_volume(case_id, str(item["mask"]))
    match = grid_match(image_affine, channels[0].shape, mask_affine, mask.shape)
    if match is None:
        if mask.ndim == 3 and sorted(mask.shape) != sorted(channels[0].shape):
            raise RadiomicsCaseError(
                case_id, f"shape mismatch: image spatial shape {channels[0].shape} != mask {mask.shape}", item["mask"]
            )
        if not np.allclose(sorted(_spacing_of(mask_affine)), sorted(spacing), rtol=1e-3):
            raise RadiomicsCaseError(
                case_id, f"mask spacing {_spacing_of(mask_affine)} differs from image spacing {spacing}", item["mask"]
            )
        diff = float(np.abs(np.asarray(mask_affine) - np.asarray(image_affine)).max())
        # same voxel size but another origin or orientation: the mask is not on the lesion
        raise RadiomicsCaseError(
            case_id,
            f"image/mask affine mismatch (max difference {diff:.4g} > {AFFINE_TOL}): origin or orientation differs",
            item["mask"],
        )
    mask = to_image_grid(mask, match)  # the same physical grid stored in another orientation (e.g. LPS vs RAS)
    return np.stack(channels), mask, spacing
