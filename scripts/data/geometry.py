"""What the tumour box does to a lesion, in millimetres: one placement rule and one record, for the validator and
``TumourBoxd`` alike.

Why: the paper's box is a number of voxels (96³ for BraTS). On isotropic 1 mm data that is 96 mm on every axis, but
on 0.5 x 0.5 x 5 mm voxels the same 32-voxel box is 16 x 16 x 160 mm, so a 20 mm lesion is cut in-plane while the
same lesion at 1 mm is whole, and nothing said so. Every case now records its voxel size, the anisotropy, the box in
mm and the share of the lesion the box leaves out (``lesion_cut_fraction``); the validator reports the cases that
are anisotropic or cut before any training, and ``TumourBoxd`` logs and records them. ``roi_spacing_mm`` (off by
default, so the bundle's behaviour and the shipped encoder do not change) makes the box a box in millimetres: the
``roi_size`` voxels are resampled to that spacing, like pyradiomics' ``resampledPixelSpacing``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts.data.lesion_mask import lesion_components

# Voxels whose longest side is more than this many times the shortest are reported as anisotropic.
ANISOTROPY_WARN = 2.0
# A box that leaves out at least this share of the lesion is logged as a warning (less, e.g. one voxel of a lobe: info).
CUT_WARN = 0.01


@dataclass(frozen=True)
class Box:
    """Where the tumour box lies on the volume's voxel grid: ``start`` (its first voxel, the paper's box in voxels),
    ``centre`` and ``half`` (its centre and half-extent in voxels of the volume, fractional for a box in mm), the
    lesion ``centroid`` it is centred on and the multi-focal placement ``note`` (see :func:`place_box`)."""

    start: list[int]
    centre: list[float]
    half: list[float]
    centroid: list[float]
    note: str

    def inside(self, coords: np.ndarray) -> np.ndarray:
        """Which voxels (rows of indices) the box holds: their centres lie within it (no ties: see ``place``)."""
        return (np.abs(coords - np.asarray(self.centre)) < np.asarray(self.half)).all(axis=1)


def box_voxels(
    roi_size: Sequence[int], spacing: Sequence[float], roi_spacing_mm: Sequence[float] | None = None
) -> tuple[int, ...]:
    """The box in (whole) voxels of the volume: ``roi_size`` itself (the paper's box in voxels), or, with
    ``roi_spacing_mm``, the voxels nearest to ``roi_size * roi_spacing_mm`` millimetres (at least one)."""
    if roi_spacing_mm is None:
        return tuple(int(r) for r in roi_size)
    return tuple(max(1, int(round(r * t / s))) for r, t, s in zip(roi_size, roi_spacing_mm, spacing))


def place(
    lesion: np.ndarray,
    spacing: Sequence[float],
    roi_size: Sequence[int],
    roi_spacing_mm: Sequence[float] | None = None,
) -> Box:
    """The tumour box on a boolean lesion (:func:`place_box`'s placement). In voxels it covers ``roi_size`` whole
    voxels from ``start`` (centre ``start + (r - 1) / 2``, half ``r / 2``: a voxel is inside or not, never on the
    edge); in mm (``roi_spacing_mm``) it is ``roi_size * roi_spacing_mm`` mm centred exactly on the centroid."""
    size = box_voxels(roi_size, spacing, roi_spacing_mm)
    start, centroid, note = place_box(lesion, size)
    if roi_spacing_mm is None:
        return Box(start, [s + (r - 1) / 2 for s, r in zip(start, size)], [r / 2 for r in size], centroid, note)
    half = [r * t / s / 2 for r, t, s in zip(roi_size, roi_spacing_mm, spacing)]
    return Box(start, list(centroid), half, centroid, note)


def _inside(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """Index of the part of a volume a box (first voxel ``start``, may be negative) covers."""
    return tuple(slice(max(s, 0), max(s + n, 0)) for s, n in zip(start, size))


def _centred(centroid: Sequence[float], size: Sequence[int]) -> list[int]:
    return [int(round(float(c) - n / 2)) for c, n in zip(centroid, size)]


def place_box(lesion: np.ndarray, size: Sequence[int]) -> tuple[list[int], list[float], str]:
    """(first voxel, centroid, placement note) of a ``size`` box on a boolean lesion: centred on the centroid of
    every lesion voxel; for a multi-focal lesion, on the largest part when the box centred on all of them would not
    hold it whole (the box would sit between distant lesions, holding neither). The note ("" for one part) says
    which, and how many lesion voxels the box leaves out."""
    coords = np.argwhere(lesion)
    centroid = coords.mean(axis=0)
    start = _centred(centroid, size)
    if lesion.ndim != 3:
        return start, [float(c) for c in centroid], ""
    components, sizes = lesion_components(lesion)
    if len(sizes) <= 1:
        return start, [float(c) for c in centroid], ""
    placement = "box centred on all parts"
    if int((components[_inside(start, size)] == 1).sum()) < int(sizes[0]):
        centroid = np.argwhere(components == 1).mean(axis=0)
        start = _centred(centroid, size)
        placement = f"parts too far apart for one box, box centred on the largest ({int(sizes[0])} voxels)"
    cut = int(sizes.sum()) - int((components[_inside(start, size)] > 0).sum())
    note = f"; {placement}, " + (f"{cut} lesion voxels outside it" if cut else "every part inside it")
    return start, [float(c) for c in centroid], note


def box_record(
    lesion: np.ndarray,
    spacing: Sequence[float],
    roi_size: Sequence[int],
    box: Box,
    roi_spacing_mm: Sequence[float] | None = None,
) -> dict:
    """What ``box`` does to the lesion: voxel size and anisotropy, the box in ROI voxels and in mm, the lesion's
    extent, how much of it lies outside the box, whether the box reaches outside the volume (padded), and the
    spacing it is resampled to (None: the box in voxels, not resampled)."""
    spacing = [float(s) for s in spacing]
    coords = np.argwhere(lesion)
    n_lesion = len(coords)
    outside = int(n_lesion - np.count_nonzero(box.inside(coords))) if n_lesion else 0
    extent = (coords.max(axis=0) - coords.min(axis=0) + 1) if n_lesion else np.zeros(len(spacing), int)
    return {
        "spacing_mm": [round(s, 6) for s in spacing],
        "anisotropy": round(max(spacing) / min(spacing), 4),
        "box_voxels": [int(r) for r in roi_size],
        "box_mm": [round(2 * h * s, 3) for h, s in zip(box.half, spacing)],
        "resampled_to_mm": None if roi_spacing_mm is None else [float(t) for t in roi_spacing_mm],
        "lesion_voxels": n_lesion,
        "lesion_extent_mm": [round(float(e) * s, 3) for e, s in zip(extent, spacing)],
        "lesion_outside_box": outside,
        "lesion_cut_fraction": round(outside / n_lesion, 4) if n_lesion else 0.0,
        "padded": any(c - h < -0.5 or c + h > n - 0.5 for c, h, n in zip(box.centre, box.half, lesion.shape)),
    }


def to_ras(lesion: np.ndarray, affine) -> tuple[np.ndarray, list[float]]:
    """(lesion, spacing) on the RAS-ordered voxel axes ``Orientationd(axcodes="RAS")`` gives training, so the box
    the validator places is the voxel-exact box ``TumourBoxd`` will place."""
    from nibabel import orientations

    from scripts.data.volumes import voxel_spacing

    ornt = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    spacing = [0.0] * 3
    for axis, (out_axis, _) in enumerate(ornt):
        spacing[int(out_axis)] = voxel_spacing(affine)[axis]
    return orientations.apply_orientation(lesion, ornt), spacing


def box_of(lesion: np.ndarray, affine, roi_size: Sequence[int], roi_spacing_mm: Sequence[float] | None = None) -> dict:
    """:func:`box_record` of the box ``TumourBoxd`` places (:func:`place_box`) on the lesion of a file with
    ``affine`` (reoriented to RAS first, as training does), for the validator."""
    lesion, spacing = to_ras(np.asarray(lesion, dtype=bool), affine)
    return box_record(lesion, spacing, roi_size, place(lesion, spacing, roi_size, roi_spacing_mm), roi_spacing_mm)


def geometry_warnings(record: dict) -> list[str]:
    """The sentences a user must read about a box record: anisotropic voxels, a lesion cut by the box."""
    out = []
    box = " x ".join(f"{v:g}" for v in record["box_mm"])
    if record["anisotropy"] > ANISOTROPY_WARN and record["resampled_to_mm"] is None:
        voxel = " x ".join(f"{v:g}" for v in record["spacing_mm"])
        out.append(
            f"anisotropic voxels {voxel} mm (ratio {record['anisotropy']:g}): the box of "
            f"{'x'.join(map(str, record['box_voxels']))} voxels is {box} mm, so shape and texture are described on "
            "that grid; set roi_spacing_mm (e.g. [1,1,1]) for a box in millimetres on resampled voxels"
        )
    if record["lesion_outside_box"]:
        extent = " x ".join(f"{v:g}" for v in record["lesion_extent_mm"])
        out.append(
            f"the box ({box} mm) cuts the lesion ({extent} mm): {record['lesion_outside_box']} of its "
            f"{record['lesion_voxels']} voxels ({100 * record['lesion_cut_fraction']:.1f}%) lie outside it; raise "
            "roi_size, or set roi_spacing_mm for a box in millimetres"
        )
    return out


def geometry_level(record: dict) -> int:
    """Log level of :func:`geometry_warnings`: a warning for anisotropic voxels or a lesion cut by >= ``CUT_WARN``,
    information for a few voxels outside the box."""
    import logging

    serious = record["lesion_cut_fraction"] >= CUT_WARN or (
        record["anisotropy"] > ANISOTROPY_WARN and record["resampled_to_mm"] is None
    )
    return logging.WARNING if serious else logging.INFO


def collect(geometry: dict, roi_size: Sequence[int], roi_spacing_mm: Sequence[float] | None = None):
    """An ``on_lesion`` callback for :func:`scripts.data.validation.validate_items` that fills ``geometry`` with
    ``{case id: {"mask": file, **box_of(...)}}`` from the masks the validator reads anyway."""

    def on_lesion(item: dict, lesion: np.ndarray, affine) -> None:
        geometry[str(item.get("id"))] = {"mask": item["mask"], **box_of(lesion, affine, roi_size, roi_spacing_mm)}

    return on_lesion
