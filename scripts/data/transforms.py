"""Deterministic preprocessing transforms of the paper's two ROI pipelines, as MONAI MapTransforms.

* ``TumourBoxd`` (BraTS): a fixed-size box centred on the lesion mask's centroid, padded with the image's
  background intensity where the box leaves the volume (the paper pads with background, which is not zero
  for CT or for intensity-shifted MRI).
* ``LungMaskd`` + ``LungBoxd`` (NSCLC): a threshold lung mask (no network needed), then a 224 mm box centred
  on the lungs, resized to 112³.
* ``RobustRescaled``: per-channel robust percentiles -> [0, 255], the range the paper's intensity
  augmentations (gamma) assume.
* ``CheckFinited``: refuses NaN/Inf voxels with the case id, instead of letting them poison a batch.
* ``LesionContextd``: keeps the lesion and a margin around it, blanks the rest of the box (an option of the
  bundle's ``context_transforms``; not in the paper).

All of them keep MONAI's ``MetaTensor`` affine in step with the crop, so saved ROIs stay in world space.
Errors name the case (``data["id"]``) and the file the image came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from scripts.config_utils import setting_problem
from scripts.data.geometry import Box, box_record, geometry_level, geometry_warnings, place
from scripts.data.lesion_mask import empty_mask_reason, lesion_border_sides, lesion_mask, rule_level
from scripts.data.volumes import (
    AFFINE_TOL,
    affine_problem,
    file_problem,
    grid_match,
    nonfinite_diagnosis,
    volume_shape_problem,
)

__all__ = [
    "CheckFinited",
    "LesionContextd",
    "LoadCased",
    "LungBoxd",
    "LungMaskd",
    "RobustRescaled",
    "TumourBoxd",
    "case_label",
]

logger = logging.getLogger(__name__)


def case_label(data: Mapping, key: Hashable = "image") -> str:
    """'case <id> (<file>)' for error messages, from whatever the data dict knows."""
    case_id = data.get("id", "?")
    img = data.get(key)
    filename = None
    if isinstance(img, MetaTensor):
        filename = img.meta.get("filename_or_obj")
    elif isinstance(img, (str, list, tuple)):
        filename = img
    return f"case {case_id!r}" + (f" ({filename})" if filename else "")


def _files_of(value) -> list[str]:
    """The file(s) of a datalist entry's ``image`` or ``mask``: a path, or a list of paths (one per channel)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)] if isinstance(value, (str, os.PathLike)) else []


class LoadCased(MapTransform):
    """MONAI's ``LoadImaged`` that names the case and its file when a volume cannot be read, and refuses
    anything but one 3D volume per file (2D slices, 4D/5D series, a folder, a degenerate affine) before later
    transforms fail obscurely, with the validator's words (``scripts.data.datalist``).

    A 4D file is refused, not read as channels: the validator and radiomics refuse it too, and one 4D image among
    3D ones would otherwise fail later as a batch of unequal tensors naming no case. Costs nothing extra: the
    checks run on the paths and arrays that are loaded anyway (a datalist pre-flight would read every volume a
    second time).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **load_kwargs) -> None:
        from monai.transforms import LoadImaged

        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImaged(keys, allow_missing_keys=allow_missing_keys, **load_kwargs)

    def _check_files(self, data: Mapping) -> None:
        """A folder (a DICOM series), a name too long for the file system, a device: named with the case before
        MONAI's reader fails on it (a missing file is left to the reader, whose error the wrapper below names)."""
        for key in self.key_iterator(dict(data)):
            for path in _files_of(data[key]):
                problem = file_problem(path)
                if problem and problem != "missing file":
                    raise ValueError(f"case {data.get('id', '?')!r} ({path}): {key} {problem}")

    def __call__(self, data: Mapping) -> dict:
        self._check_files(data)
        try:
            d = self.loader(data)
        except Exception as e:  # noqa: BLE001 - any reader failure: say which case and file, keep the cause
            files = {k: data.get(k) for k in self.keys if k in data}
            raise RuntimeError(
                f"case {data.get('id', '?')!r}: unreadable file(s) {files}: {type(e).__name__}: {e}"
            ) from e
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim != 4:  # channel first + 3 spatial dims
                header_dim = getattr(x, "meta", {}).get("dim")  # NIfTI header: dim[0] is the file's number of dims
                n = int(np.asarray(header_dim).flat[0]) if header_dim is not None else x.ndim - 1
                raise ValueError(
                    f"{case_label(d, key)}: expected a 3D {key} volume, got a {n}D one "
                    f"(shape {tuple(x.shape)} after loading, channel first)"
                )
            files = _files_of(data.get(key))
            if files and x.shape[0] != len(files):  # a 4D file: several volumes where one was expected
                per_file = (*tuple(x.shape[1:]), x.shape[0] // len(files))
                raise ValueError(f"{case_label(d, key)}: {key} {volume_shape_problem(per_file)}")
            if isinstance(x, MetaTensor):
                problem = affine_problem(x.affine.numpy())
                if problem:
                    raise ValueError(f"{case_label(d, key)}: {key} has a {problem}")
        return d


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _with_affine(ref, out: torch.Tensor, affine: torch.Tensor | None):
    """Return ``out`` as a MetaTensor carrying ``ref``'s metadata and the new affine (plain tensor in, plain out)."""
    if isinstance(ref, MetaTensor):
        mt = MetaTensor(out, meta=dict(ref.meta))
        if affine is not None:
            mt.affine = affine
        return mt
    return out


def _shift_affine(affine: torch.Tensor, start_voxel: Sequence[int]) -> torch.Tensor:
    """Affine of a crop whose first voxel is ``start_voxel`` of the original grid."""
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = torch.as_tensor([float(s) for s in start_voxel], dtype=torch.float64)
    return affine.to(torch.float64) @ shift


def background_values(image: torch.Tensor, how: str | float = "corner") -> torch.Tensor:
    """Per-channel background intensity: median of the 8 corner voxels ("corner"), the minimum ("min"), or a number.

    Corners are robust where the minimum is an outlier (a negative ringing voxel) and match the paper's
    "padded with background intensity" for CT (-1024) and MRI (0, or the scanner's offset) alike.
    """
    c = image.shape[0]
    if isinstance(how, (int, float)):
        return torch.full((c,), float(how), dtype=image.dtype)
    if how == "min":
        return image.reshape(c, -1).min(dim=1).values
    if how == "corner":
        corners = image[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
        return corners.reshape(c, -1).median(dim=1).values
    raise ValueError(f"unknown background rule {how!r}: use 'corner', 'min' or a number")


def crop_or_pad(image: torch.Tensor, start: Sequence[int], size: Sequence[int], fill: torch.Tensor) -> torch.Tensor:
    """Crop ``image`` [C, *spatial] at ``start`` (may be negative / past the end), filling outside with ``fill[c]``."""
    spatial = image.shape[1:]
    out = fill.to(image.dtype).reshape(-1, *([1] * len(size))).expand(image.shape[0], *size).clone()
    src, dst = [], []
    for s, n, dim in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:  # the box misses the volume entirely along this axis
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


class TumourBoxd(MapTransform):
    """Crop a ``roi_size`` box centred on the centroid of ``mask_key``'s non-zero voxels from every key.

    Image keys are padded with their per-channel background (``background``: "corner" | "min" | number);
    the mask is padded with 0. Records ``<mask_key>_box`` = {"start", "centroid", "clipped", "touches_border",
    "mask_rule", "geometry"} in the data dict: ``clipped`` when the box leaves the volume (padded, as the paper
    does), ``touches_border`` the volume faces the lesion itself touches (e.g. ["x-"]). Such a lesion may continue
    outside the field of view; it is kept (dropping it would lose a real case) and a warning names the case.
    ``geometry`` (:func:`scripts.data.geometry.box_record`) is what the box does to the lesion in millimetres: voxel
    size, anisotropy, the box in mm, the share of the lesion left outside it; a cut lesion and anisotropic voxels
    are logged as warnings naming the case.

    ``spacing`` (the ``roi_spacing_mm`` config key; None, the default, is the paper's box in voxels): the box covers
    ``roi_size * spacing`` millimetres of the volume, resampled to ``roi_size`` voxels of ``spacing`` mm (images
    trilinear, the mask nearest neighbour), like pyradiomics' ``resampledPixelSpacing``, so a lesion is boxed alike
    at 1 mm and at 0.5 x 0.5 x 5 mm.

    An image whose affine differs from the mask's by more than ``affine_tol`` (another spacing, origin or
    orientation) is an error: the same voxel indices would be different places in the body.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        roi_size: Sequence[int] = (96, 96, 96),
        background: str | float = "corner",
        allow_missing_keys: bool = False,
        affine_tol: float = AFFINE_TOL,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        problem = setting_problem("roi_size", roi_size) or setting_problem("roi_spacing_mm", spacing)
        if problem:
            raise ValueError(f"TumourBoxd: {problem}")
        self.mask_key = mask_key
        self.roi_size = tuple(int(r) for r in roi_size)
        self.background = background
        if spacing is not None:  # set only when given, so the default's cache keys stay those of earlier versions
            self.spacing = tuple(float(s) for s in spacing)
        # private: it decides whether to refuse a case, not what is produced, so it stays out of cache keys
        self._affine_tol = float(affine_tol)

    def _on_image_grid(self, d: Mapping) -> torch.Tensor:
        """The mask, checked against every image key and reoriented onto their grid when it is the same physical
        grid stored in another orientation (:func:`scripts.data.datalist.grid_match`, the validator's rule)."""
        mask = d[self.mask_key]
        for key in self.key_iterator(d):
            img = d[key]
            if key == self.mask_key:
                continue
            img_shape, mask_shape = tuple(img.shape[1:]), tuple(mask.shape[1:])
            if not (isinstance(img, MetaTensor) and isinstance(mask, MetaTensor)):
                if img_shape != mask_shape:
                    raise ValueError(f"{case_label(d, key)}: image shape {img_shape} != mask shape {mask_shape}")
                continue
            img_affine = img.affine.to(torch.float64).numpy()
            mask_affine = mask.affine.to(torch.float64).numpy()
            match = grid_match(img_affine, img_shape, mask_affine, mask_shape, self._affine_tol)
            if match is None:
                if img_shape != mask_shape:
                    raise ValueError(f"{case_label(d, key)}: image shape {img_shape} != mask shape {mask_shape}")
                diff = float(np.abs(img_affine - mask_affine).max())
                raise ValueError(
                    f"{case_label(d, key)}: image/mask affine mismatch (max difference {diff:.4g} > "
                    f"{self._affine_tol}): different spacing, origin or orientation, so the mask does not lie on the "
                    "image's voxel grid"
                )
            axes, flips = match
            if tuple(axes) != (0, 1, 2) or flips:
                out = mask.as_tensor().permute(0, *[a + 1 for a in axes])
                out = out.flip([f + 1 for f in flips]) if flips else out
                meta = {k: v for k, v in mask.meta.items() if k != "affine"}
                mask = MetaTensor(out.contiguous(), affine=img.affine.clone(), meta=meta)
        return mask

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mask = _as_tensor(d[self.mask_key])
        if mask.ndim != len(self.roi_size) + 1:
            raise ValueError(
                f"{case_label(d, self.mask_key)}: expected a {len(self.roi_size)}D mask volume (channel-first shape "
                f"[C, *spatial] for roi_size {list(self.roi_size)}), got a {mask.ndim - 1}D one of shape "
                f"{tuple(mask.shape)}"
            )
        mask = _as_tensor(self._on_image_grid(d))
        raw = _as_tensor(mask).detach().cpu().numpy()
        try:
            lesion, rule = lesion_mask(raw[0] if raw.shape[0] == 1 else (raw != 0).any(axis=0))
        except ValueError as e:
            raise ValueError(f"{case_label(d, self.mask_key)}: {e}") from e
        binary = torch.as_tensor(lesion[None].astype(np.float32)).to(
            mask.dtype if mask.is_floating_point() else torch.uint8
        )
        d[self.mask_key] = _with_affine(mask, binary, None)
        if not lesion.any():
            reason = empty_mask_reason(raw)
            raise ValueError(
                f"{case_label(d, self.mask_key)}: empty mask, no lesion to centre the box on"
                + ("" if reason.startswith("empty mask (") else f" ({reason})")
            )
        spacing = self._spacing(d)
        target = getattr(self, "spacing", None)
        box = place(lesion, spacing, self.roi_size, target)
        rule += box.note
        if rule != "binary":
            logger.log(rule_level(rule), "%s: mask rule applied: %s", case_label(d, self.mask_key), rule)
        geometry = box_record(lesion, spacing, self.roi_size, box, target)
        for warning in geometry_warnings(geometry):
            logger.log(geometry_level(geometry), "%s: %s", case_label(d, self.mask_key), warning)
        sides = lesion_border_sides(lesion)
        if sides:
            logger.warning(
                "%s: the lesion touches the volume border (%s) and may continue outside the field of view; "
                "kept; shape features describe only the visible part",
                case_label(d, self.mask_key),
                ", ".join(sides),
            )
        for key in self.key_iterator(d):
            is_mask = key == self.mask_key
            d[key] = self._crop(d[key], box.start, is_mask) if target is None else self._resample(d[key], box, is_mask)
        d[f"{self.mask_key}_box"] = {
            "start": box.start,
            "centroid": box.centroid,
            "clipped": geometry["padded"],
            "touches_border": sides,
            "mask_rule": rule,
            "geometry": geometry,
        }
        return d

    def _spacing(self, d: Mapping) -> tuple[float, ...]:
        """Voxel size (mm) of the mask's grid (the images share it: ``_on_image_grid``); 1 mm without an affine."""
        ref = d[self.mask_key]
        if isinstance(ref, MetaTensor):
            return tuple(float(s) for s in torch.linalg.norm(ref.affine.to(torch.float64)[:3, :3], dim=0))
        return (1.0,) * len(self.roi_size)

    def _crop(self, x, start: list[int], is_mask: bool):
        """The paper's box of one key: ``roi_size`` voxels from ``start``, padded outside the volume with the
        image's background (the mask with 0)."""
        img = _as_tensor(x)
        fill = torch.zeros(img.shape[0]) if is_mask else background_values(img, self.background)
        out = crop_or_pad(img, start, self.roi_size, fill)
        affine = _shift_affine(img.affine, start) if isinstance(img, MetaTensor) else None
        return _with_affine(x, out, affine)

    def _resample(self, x, box: Box, is_mask: bool):
        """The box in mm of one key: ``roi_size`` voxels of ``spacing`` mm centred exactly on ``box.centre``,
        sampled from the volume (images trilinear, the mask nearest neighbour; the image's background outside
        the volume, the mask's 0), with the affine of that grid."""
        img = _as_tensor(x)
        fill = torch.zeros(img.shape[0]) if is_mask else background_values(img, self.background)
        step = [2 * h / r for h, r in zip(box.half, self.roi_size)]  # volume voxels per ROI voxel
        axes = [
            c + (torch.arange(r, dtype=torch.float64) - (r - 1) / 2) * f
            for c, r, f in zip(box.centre, self.roi_size, step)
        ]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [X, Y, Z, 3] volume voxel indices
        size = torch.tensor(img.shape[1:], dtype=torch.float64)
        grid = ((2 * index + 1) / size - 1).flip(-1)  # align_corners=False; grid_sample's last axis is x=W=our Z
        shifted = img.to(torch.float32) - fill.to(torch.float32).reshape(-1, 1, 1, 1)
        out = F.grid_sample(
            shifted[None], grid[None].to(torch.float32), mode="nearest" if is_mask else "bilinear",
            padding_mode="zeros", align_corners=False,
        )[0] + fill.to(torch.float32).reshape(-1, 1, 1, 1)  # fmt: skip
        out = out.to(img.dtype) if is_mask else out
        affine = None
        if isinstance(img, MetaTensor):
            to_volume = torch.eye(4, dtype=torch.float64)  # ROI voxel index -> volume voxel index
            for i, (c, r, f) in enumerate(zip(box.centre, self.roi_size, step)):
                to_volume[i, i], to_volume[i, 3] = f, c - (r - 1) / 2 * f
            affine = img.affine.to(torch.float64) @ to_volume
        return _with_affine(x, out, affine)


def lung_mask_from_ct(
    hu: np.ndarray, threshold: float = -320.0, min_fraction: float = 0.1, axial_axis: int = 2
) -> np.ndarray:
    """Binary lung mask from a CT volume in Hounsfield units, without a network.

    Steps: air-like voxels (HU < threshold) -> remove air touching the in-plane border of each axial slice
    (outside the body; the z border is kept because the trachea leaves the volume there) -> 3D components,
    keep the two largest (two lungs, or one if they touch) and drop a second one smaller than ``min_fraction``
    of the first -> fill holes (vessels, nodules) slice by slice -> fill 3D holes.
    """
    if hu.ndim != 3:
        raise ValueError(f"lung mask needs a 3D volume, got shape {hu.shape}")
    air = hu < threshold
    air = np.moveaxis(air, axial_axis, 0).copy()
    for z in range(air.shape[0]):
        labels, n = ndimage.label(air[z])
        if n == 0:
            continue
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        air[z][np.isin(labels, border[border > 0])] = False
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= min_fraction * sizes[order[0]]:
        keep.append(order[1] + 1)
    lung = np.isin(labels, keep)
    for z in range(lung.shape[0]):
        lung[z] = ndimage.binary_fill_holes(lung[z])
    lung = ndimage.binary_fill_holes(lung)
    return np.moveaxis(lung, 0, axial_axis)


class LungMaskd(MapTransform):
    """Add ``output_key`` = lung mask of the CT in ``keys`` (first channel, HU), by threshold or ``lungmask``.

    ``method="threshold"`` (default) needs nothing else. ``method="lungmask"`` uses the optional ``lungmask``
    package (Hofmanninger et al., the tool the paper used) with a LOCAL weights file: nothing is downloaded.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str = "lung_mask",
        method: str = "threshold",
        threshold: float = -320.0,
        weights_path: str | None = None,
        axial_axis: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in ("threshold", "lungmask"):
            raise ValueError(f"unknown lung mask method {method!r}: use 'threshold' or 'lungmask'")
        self.output_key, self.method, self.threshold = output_key, method, threshold
        self.weights_path, self.axial_axis = weights_path, axial_axis

    def _lungmask(self, hu: np.ndarray) -> np.ndarray:
        try:
            from lungmask import LMInferer  # optional dependency
        except ImportError as e:
            raise ImportError("method='lungmask' needs the optional 'lungmask' package (pip install lungmask)") from e
        if not self.weights_path:
            raise ValueError("method='lungmask' needs weights_path to a local model file (no downloads at run time)")
        inferer = LMInferer(modelpath=self.weights_path)
        # lungmask expects (z, y, x) arrays in HU
        return np.moveaxis(inferer.apply(np.moveaxis(hu, self.axial_axis, 0)) > 0, 0, self.axial_axis)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _as_tensor(d[key])
            hu = img[0].detach().cpu().numpy().astype(np.float32)
            lung = (
                self._lungmask(hu)
                if self.method == "lungmask"
                else lung_mask_from_ct(hu, self.threshold, 0.1, self.axial_axis)
            )
            if not lung.any():
                raise ValueError(
                    f"{case_label(d, key)}: no lung found (no air region inside the body at HU < {self.threshold})"
                )
            d[self.output_key] = _with_affine(d[key], torch.as_tensor(lung[None].astype(np.uint8)), None)
        return d


class LungBoxd(MapTransform):
    """Crop a ``box_mm`` box (224 mm) centred on the lung mask's bounding box and resize it to ``roi_size`` (112³).

    The box is given in millimetres and converted with the voxel spacing, so anisotropic CT (0.7 x 0.7 x 5 mm)
    gets the same anatomical extent on every axis; for 1 mm isotropic data this is the paper's 224³-voxel box.
    Outside the volume the image is padded with its background (air) and masks with 0. Images are resized
    trilinearly, masks by nearest neighbour (``mask_keys``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        lung_key: str = "lung_mask",
        box_mm: Sequence[float] = (224.0, 224.0, 224.0),
        roi_size: Sequence[int] = (112, 112, 112),
        mask_keys: Sequence[str] = ("mask", "lung_mask"),
        background: str | float = "corner",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lung_key = lung_key
        self.box_mm = tuple(float(b) for b in box_mm)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.mask_keys = set(mask_keys)
        self.background = background

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        lesion_info, lesion, lesion_key = {}, None, None
        for key in self.key_iterator(d):  # the lesion mask: the mask rule, on the whole volume, before the resize
            if key in self.mask_keys and key != self.lung_key:
                lesion_key = key
                raw = _as_tensor(d[key]).detach().cpu().numpy()
                try:
                    lesion, rule = lesion_mask(raw[0] if raw.shape[0] == 1 else (raw != 0).any(axis=0))
                except ValueError as e:
                    raise ValueError(f"{case_label(d, key)}: {e}") from e
                if rule != "binary":
                    logger.log(rule_level(rule), "%s: mask rule applied: %s", case_label(d, key), rule)
                lesion_info = {"mask_rule": rule, "touches_border": lesion_border_sides(lesion)}
                d[key] = _with_affine(d[key], torch.as_tensor(lesion[None].astype(np.uint8)), None)
        lung = _as_tensor(d[self.lung_key])
        coords = torch.nonzero(lung[0] > 0)
        if coords.numel() == 0:
            raise ValueError(f"{case_label(d, self.lung_key)}: empty lung mask, cannot place the lung box")
        ref = d[self.lung_key]
        affine = ref.affine.to(torch.float64) if isinstance(ref, MetaTensor) else torch.eye(4, dtype=torch.float64)
        spacing = torch.linalg.norm(affine[:3, :3], dim=0)
        centre = (coords.min(dim=0).values + coords.max(dim=0).values).double() / 2
        size = [max(1, int(round(b / float(s)))) for b, s in zip(self.box_mm, spacing)]
        start = [int(round(float(c) - n / 2)) for c, n in zip(centre, size)]
        if lesion is not None and lesion.any():  # what the lung box does to the lesion, as TumourBoxd records it
            box = Box(start, [s + (n - 1) / 2 for s, n in zip(start, size)], [n / 2 for n in size], [], "")
            roi_mm = [n * float(s) / r for n, s, r in zip(size, spacing, self.roi_size)]
            lesion_info["geometry"] = box_record(lesion, spacing.tolist(), self.roi_size, box, roi_mm)
            for warning in geometry_warnings(lesion_info["geometry"]):
                logger.log(geometry_level(lesion_info["geometry"]), "%s: %s", case_label(d, lesion_key), warning)
        for key in self.key_iterator(d):
            img = _as_tensor(d[key])
            is_mask = key in self.mask_keys
            fill = torch.zeros(img.shape[0]) if is_mask else background_values(img, self.background)
            box = crop_or_pad(img.float(), start, size, fill)
            out = F.interpolate(
                box[None],
                size=self.roi_size,
                mode="nearest" if is_mask else "trilinear",
                **({} if is_mask else {"align_corners": False}),
            )[0]
            new_affine = None
            if isinstance(img, MetaTensor):
                scale = torch.eye(4, dtype=torch.float64)
                for i, (n, r) in enumerate(zip(size, self.roi_size)):
                    scale[i, i] = n / r
                    scale[i, 3] = 0.5 * (n / r - 1.0)  # voxel centres of the resized grid
                new_affine = _shift_affine(img.affine, start) @ scale
            d[key] = _with_affine(d[key], out.to(torch.uint8) if is_mask else out, new_affine)
        d[f"{self.lung_key}_box"] = {
            "start": start,
            "size_voxels": size,
            "centre": [float(c) for c in centre],
            **lesion_info,
        }
        return d


class RobustRescaled(MapTransform):
    """Per channel, map the [lower, upper] percentiles of the reference region linearly to [b_min, b_max] and clip.

    The reference region is the whole image, the non-zero voxels of ``ref_key`` (e.g. a body or lung mask), or
    ``"nonzero"`` (voxels of the image that differ from its background), so empty padding does not decide
    the scale. A flat channel (upper == lower) becomes ``b_min`` everywhere rather than NaN.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = 0.0,
        b_max: float = 255.0,
        ref_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper, self.b_min, self.b_max, self.ref_key = lower, upper, b_min, b_max, ref_key

    def _region(self, d: Mapping, img: torch.Tensor) -> torch.Tensor | None:
        if self.ref_key is None:
            return None
        if self.ref_key == "nonzero":
            return img != background_values(img, "corner").reshape(-1, *([1] * (img.ndim - 1)))
        ref = _as_tensor(d[self.ref_key])
        return (ref > 0).expand_as(img) if ref.shape[0] == 1 else ref > 0

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _as_tensor(d[key]).float()
            region = self._region(d, img)
            out = torch.empty_like(img)
            for c in range(img.shape[0]):
                vals = img[c][region[c]] if region is not None and region[c].any() else img[c].reshape(-1)
                q = torch.quantile(
                    vals[:: max(1, vals.numel() // 2_000_000)].double(),
                    torch.tensor([self.lower, self.upper], dtype=torch.float64) / 100,
                )
                lo, hi = float(q[0]), float(q[1])
                if hi <= lo:
                    logger.warning(
                        "%s: channel %d of '%s' is constant (%g) over its reference region: it becomes %g; its "
                        "intensity and texture carry no information",
                        case_label(d, key),
                        c,
                        key,
                        lo,
                        self.b_min,
                    )
                    out[c] = self.b_min
                else:
                    out[c] = ((img[c] - lo) / (hi - lo) * (self.b_max - self.b_min) + self.b_min).clamp(
                        self.b_min, self.b_max
                    )
            d[key] = _with_affine(d[key], out, None)
        return d


class CheckFinited(MapTransform):
    """Raise, naming the case and how many voxels, if an image holds NaN or Inf; where they come from values of the
    file that overflow the loader's float32 cast (a float64 image holding 1e300), the message says so."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _as_tensor(d[key])
            if img.is_floating_point():
                bad = int((~torch.isfinite(img)).sum())
                if bad:
                    files = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
                    why = nonfinite_diagnosis(_files_of(files)) if files else ""
                    raise ValueError(
                        f"{case_label(d, key)}: {bad} non-finite (NaN/Inf) voxels in '{key}'"
                        + (f" ({why})" if why else "")
                    )
        return d


class LesionContextd(MapTransform):
    """Keep the lesion and every voxel within ``margin`` voxels of it; set the rest of the box to ``fill``.

    Why: a lesion-centred box also shows how far the lesion lies from the head's edge (the box's share of
    background), which both views of a case always share, so self-supervised training on the whole box can
    learn that instead of the lesion (``docs/learning.md``, "What the features encode"). Runs after the intensity
    rescaling, so ``fill`` 0 is the rescaled background. An empty mask is an error naming the case.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        margin: float = 3.0,
        fill: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if margin < 0:
            raise ValueError(f"LesionContextd: margin must be >= 0 voxels, got {margin}")
        self.mask_key, self.margin, self.fill = mask_key, float(margin), float(fill)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        lesion = (_as_tensor(d[self.mask_key]) > 0).any(dim=0).numpy()
        if not lesion.any():
            raise ValueError(f"{case_label(d)}: mask '{self.mask_key}' is empty: no lesion to keep a context around")
        keep = torch.as_tensor(ndimage.distance_transform_edt(~lesion) <= self.margin)
        for key in self.key_iterator(d):
            img = _as_tensor(d[key])
            out = torch.where(keep.expand_as(img), img, torch.tensor(self.fill, dtype=img.dtype))
            d[key] = _with_affine(d[key], out, None)
        return d
