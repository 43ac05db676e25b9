"""One volume file: the checks every entry point shares, in one set of words.

A path that is not a readable file, a volume that is not 3D, a degenerate affine, values that overflow float32, NaN or
Inf voxels, an image and a mask that do not lie on one grid: ``file_problem``, ``volume_shape_problem``,
``affine_problem``, ``float32_overflow``, ``nonfinite_diagnosis``, ``grid_match``. The validator
(``scripts.data.validation``), training's loader (``scripts.data.transforms``) and radiomics call these, so a bad
file reads the same everywhere. ``read_volume`` reads one file (NIfTI/NRRD) as float data and its affine.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Largest difference between image and mask affine entries (mm, direction cosines) still read as the same grid.
AFFINE_TOL = 1e-3


AXES = "xyz"


# Every volume is computed in float32 (MONAI's loader casts to it): larger magnitudes would become Inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


FOLDER_HINT = (
    "is a folder (a DICOM series?): convert it with `python -m scripts.data.build_cohort nsclc` (which reads one "
    "DICOM series folder per patient) or give a NIfTI/NRRD file"
)


ONE_VOLUME_HINT = (
    "one file must hold one 3D volume: list one file per image channel "
    '("image": ["c0.nii.gz", "c1.nii.gz"]) and give a single 3D label volume as the mask'
)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as one volume file ("missing file", a name too long for the file system, a
    folder such as a DICOM series, no access), or None when it is a regular file. Never raises: a bad path is a
    problem of its case, not of the whole cohort."""
    name = os.fsencode(Path(path).name)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return (
                f"file name too long ({len(name)} bytes; the file system allows {_name_max(path)} per name and "
                f"4096 per path): rename the file"
            )
        return f"cannot access the file ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return FOLDER_HINT
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, socket or pipe)"
    return None


def _name_max(path: str | os.PathLike) -> int:
    folder = Path(path).parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def volume_shape_problem(shape: Sequence[int]) -> str | None:
    """The array of one file must be one 3D volume, [X, Y, Z] or [X, Y, Z, 1]: a 4D file (two masks, or several
    image channels in one file) is refused everywhere rather than merged by one reader and refused by another."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
        return None
    problem = f"expected a 3D volume, got {len(shape)}D with shape {shape}"
    return f"{problem}: {ONE_VOLUME_HINT}" if len(shape) == 4 else problem


def affine_problem(affine) -> str | None:
    """A voxel-to-world matrix that does not describe a 3D grid: non-finite entries, a voxel axis of length 0 (a
    zero column of the sform/qform) or voxel axes that are (nearly) parallel. Reorientation, spacing and every
    millimetre would be undefined, so such a file is refused with its name rather than failing in a library."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return f"affine of shape {a.shape}, expected 4x4"
    if not np.isfinite(a).all():
        return "degenerate affine (NaN/Inf entries in the sform/qform): fix the file's header"
    linear = a[:3, :3]
    sizes = np.linalg.norm(linear, axis=0)
    zero = [AXES[i] for i in range(3) if sizes[i] < 1e-6]
    if zero:
        return (
            f"degenerate affine: voxel axis {', '.join(zero)} has length 0 (a zero column of the sform/qform), so "
            f"the voxel grid has no extent in space; fix the file's header (spacing {[round(float(x), 6) for x in sizes]})"
        )
    if abs(float(np.linalg.det(linear))) < 1e-6 * float(np.prod(sizes)):
        return (
            "degenerate affine: its voxel axes are (nearly) parallel (singular sform/qform), so the voxel grid does "
            "not span 3D space; fix the file's header"
        )
    return None


def voxel_spacing(affine) -> tuple[float, float, float]:
    """(sx, sy, sz) in mm: the lengths of the affine's voxel axes."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def float32_overflow(arr: np.ndarray) -> str | None:
    """Finite values beyond float32's range (a float64 image holding 1e300): the bundle computes in float32, where
    they become Inf, so they are named for what they are instead of as "non-finite voxels"."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating) or np.finfo(arr.dtype).max <= FLOAT32_MAX:
        return None
    magnitude = np.abs(arr[np.isfinite(arr)])
    n = int(np.count_nonzero(magnitude > FLOAT32_MAX))
    if not n:
        return None
    return (
        f"{n} voxel value(s) overflow float32 (max |value| {float(magnitude.max()):.3g} > {FLOAT32_MAX:.3g}): the "
        "bundle computes in float32, where they would become Inf; rescale the image"
    )


def nonfinite_diagnosis(paths: Sequence[str]) -> str:
    """What the files say about non-finite voxels found after loading (called on that error path only): values
    that overflowed the float32 cast, or NaN/Inf already in the file."""
    notes = []
    for path in paths:
        try:
            arr, _ = read_volume(str(path))
        except Exception:  # noqa: BLE001 - a diagnosis only; the caller's error stands without it
            continue
        overflow = float32_overflow(arr)
        if overflow:
            notes.append(f"{Path(path).name}: {overflow}")
    return "; ".join(notes)


def grid_match(
    image_affine, image_shape, mask_affine, mask_shape, tol: float = AFFINE_TOL
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How to put the mask array on the image's voxel grid, judged physically: ``(axes, flips)`` for
    :func:`to_image_grid` when every image voxel has a mask voxel at the same place in the body (within ``tol``
    mm), e.g. the mask stored LPS and the image RAS; ``((0, 1, 2), ())`` when already aligned; None when the grids
    differ (another spacing, origin, extent or rotation). The validator, the cohort builders, training and
    radiomics all use this one rule.
    """
    image_affine = np.asarray(image_affine, dtype=np.float64)
    mask_affine = np.asarray(mask_affine, dtype=np.float64)
    image_shape, mask_shape = tuple(image_shape), tuple(mask_shape)
    if image_shape == mask_shape and np.allclose(image_affine, mask_affine, atol=tol):
        return (0, 1, 2), ()
    if len(image_shape) != 3 or len(mask_shape) != 3:
        return None
    try:
        t_full = np.linalg.solve(mask_affine, image_affine)  # image voxel index -> mask voxel index
    except np.linalg.LinAlgError:
        return None
    perm = np.round(t_full[:3, :3])
    if not ((np.abs(perm).sum(0) == 1).all() and (np.abs(perm).sum(1) == 1).all()):
        return None
    shift = np.round(t_full[:3, 3])
    axes, flips = [], []
    for a in range(3):
        r = int(np.argmax(np.abs(perm[:, a])))
        axes.append(r)
        if mask_shape[r] != image_shape[a] or shift[r] != (0 if perm[r, a] > 0 else mask_shape[r] - 1):
            return None
        if perm[r, a] < 0:
            flips.append(a)
    exact = np.eye(4)
    exact[:3, :3], exact[:3, 3] = perm, shift
    if not np.allclose(mask_affine @ exact, image_affine, atol=tol):
        return None
    return tuple(axes), tuple(flips)


def to_image_grid(mask: np.ndarray, match: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    """The [X, Y, Z] mask array reoriented by a :func:`grid_match` result (a no-op for the identity)."""
    axes, flips = match
    out = np.transpose(mask, axes) if tuple(axes) != (0, 1, 2) else mask
    return np.flip(out, flips) if flips else out


def read_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(array in x,y,z order, 4x4 RAS-ish affine) with nibabel for NIfTI and SimpleITK for NRRD/MHA/others."""
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    arr = np.transpose(sitk.GetArrayFromImage(img), tuple(range(img.GetDimension()))[::-1])
    direction = np.asarray(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())
    affine = np.eye(4)
    d = min(3, img.GetDimension())
    affine[:d, :d] = (direction * np.asarray(img.GetSpacing()))[:d, :d]
    affine[:d, 3] = np.asarray(img.GetOrigin())[:d]
    affine[:2] *= -1  # ITK's world frame is LPS, nibabel's RAS: flip x and y so NIfTI and NRRD pairs compare
    return arr, affine
