"""Preprocessing transforms on small arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.data.transforms import (
    CheckFinited,
    LesionContextd,
    LungBoxd,
    LungMaskd,
    RobustRescaled,
    TumourBoxd,
    background_values,
    crop_or_pad,
    lung_mask_from_ct,
)


def _case(shape=(20, 20, 20), centre=(10, 10, 10), radius=2, channels=1, background=0.0):
    img = torch.full((channels, *shape), background, dtype=torch.float32)
    mask = torch.zeros((1, *shape), dtype=torch.uint8)
    sl = tuple(slice(c - radius, c + radius + 1) for c in centre)
    mask[(0, *sl)] = 1
    for c in range(channels):
        img[(c, *sl)] = 100.0 + c
    return {"id": "case7", "image": MetaTensor(img, affine=torch.eye(4)), "mask": MetaTensor(mask, affine=torch.eye(4))}


def test_tumour_box_centred_on_mask_centroid():
    d = TumourBoxd(keys=["image", "mask"], roi_size=(8, 8, 8))(_case(centre=(5, 12, 9)))
    assert d["image"].shape == (1, 8, 8, 8) and d["mask"].shape == (1, 8, 8, 8)
    assert d["mask_box"]["start"] == [1, 8, 5]
    # lesion (5 voxels wide) sits in the middle of the box
    assert d["mask"][0, 2:7, 2:7, 2:7].all() and d["mask"].sum() == 125
    # affine follows the crop: voxel (0,0,0) of the ROI is voxel (1,8,5) of the volume
    assert torch.allclose(d["image"].affine[:3, 3], torch.tensor([1.0, 8.0, 5.0], dtype=torch.float64))


def test_tumour_box_pads_with_background_not_zero():
    case = _case(centre=(2, 2, 17), background=-1024.0)
    d = TumourBoxd(keys=["image", "mask"], roi_size=(10, 10, 10))(case)
    assert d["mask_box"]["clipped"] is True
    img = d["image"][0]
    assert img[0, 0, 0] == -1024.0 and img[-1, -1, -1] == -1024.0  # padded corners carry the background
    assert d["mask"].sum() == 125  # the whole lesion survives the crop
    assert d["mask"][0, 0, 0, 0] == 0


def test_tumour_box_multichannel_per_channel_background():
    case = _case(channels=4)
    case["image"][1] += 50.0  # channel 1 has a non-zero background
    d = TumourBoxd(keys=["image", "mask"], roi_size=(30, 30, 30))(case)
    assert d["image"].shape == (4, 30, 30, 30)
    assert d["image"][1, 0, 0, 0] == 50.0 and d["image"][0, 0, 0, 0] == 0.0
    assert torch.equal(d["image"][3][d["mask"][0] > 0], torch.full((125,), 103.0))


def test_tumour_box_errors_name_the_case():
    case = _case()
    case["mask"] = MetaTensor(torch.zeros_like(case["mask"]), affine=torch.eye(4))
    with pytest.raises(ValueError, match=r"case7.*empty mask"):
        TumourBoxd(keys=["image", "mask"], roi_size=(8, 8, 8))(case)
    case = _case()
    case["image"] = case["image"][:, :10]
    with pytest.raises(ValueError, match=r"case7.*shape"):
        TumourBoxd(keys=["image", "mask"], roi_size=(8, 8, 8))(case)


def test_crop_or_pad_box_outside_volume_is_all_fill():
    img = torch.ones((1, 4, 4, 4))
    out = crop_or_pad(img, (10, 10, 10), (3, 3, 3), torch.tensor([7.0]))
    assert torch.equal(out, torch.full((1, 3, 3, 3), 7.0))


def test_background_rules():
    img = torch.zeros((2, 5, 5, 5))
    img[1] = 3.0
    img[1, 2, 2, 2] = -9.0
    assert background_values(img, "corner").tolist() == [0.0, 3.0]
    assert background_values(img, "min").tolist() == [0.0, -9.0]
    assert background_values(img, 4.5).tolist() == [4.5, 4.5]


def chest_phantom(shape=(64, 64, 40)):
    """Air outside an elliptic body (soft tissue 40 HU) holding two lungs (-850 HU) with vessels (50 HU)."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = ((x - 32) / 28) ** 2 + ((y - 32) / 22) ** 2 <= 1
    hu[body] = 40.0
    lungs = np.zeros(shape, bool)
    for cx in (20, 44):
        lungs |= (((x - cx) / 9) ** 2 + ((y - 32) / 13) ** 2 + ((z - 20) / 16) ** 2) <= 1
    hu[lungs] = -850.0
    hu[lungs & (x % 5 == 0) & (y % 5 == 0)] = 50.0  # vessels (lines along z): holes the mask must fill
    return hu.astype(np.float32), lungs


def test_lung_mask_on_chest_phantom():
    hu, lungs = chest_phantom()
    mask = lung_mask_from_ct(hu)
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.97
    assert not mask[0].any() and not mask[:, 0].any()  # outside air is not lung


def test_lung_box_resizes_to_roi_and_keeps_masks_binary():
    hu, _ = chest_phantom()
    gtv = np.zeros_like(hu, dtype=np.uint8)
    gtv[18:23, 30:35, 18:23] = 1
    aff = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    d = {
        "id": "ct1",
        "image": MetaTensor(torch.from_numpy(hu)[None], affine=aff),
        "mask": MetaTensor(torch.from_numpy(gtv)[None], affine=aff),
    }
    d = LungMaskd(keys="image")(d)
    d = LungBoxd(keys=["image", "mask", "lung_mask"], box_mm=(100, 100, 90), roi_size=(28, 28, 28))(d)
    assert d["image"].shape == (1, 28, 28, 28) and d["mask"].shape == (1, 28, 28, 28)
    assert d["lung_mask_box"]["size_voxels"] == [50, 50, 30]  # mm -> voxels with the spacing
    assert set(torch.unique(d["mask"]).tolist()) <= {0, 1} and d["mask"].sum() > 0
    # world position of the ROI's first voxel = box start in world coordinates (half-voxel shift for the resize)
    spacing = torch.linalg.norm(d["image"].affine[:3, :3], dim=0)
    assert torch.allclose(spacing, torch.tensor([2 * 50 / 28, 2 * 50 / 28, 3 * 30 / 28], dtype=torch.float64))


def test_lung_box_applies_the_mask_rule_before_the_resize():
    """A soft GTV (0.9 core, 0.3 rim) through the NSCLC box: thresholded at 0.5 on the whole volume, recorded; the
    uint8 resize would otherwise truncate 0.9 to 0 and lose the lesion."""
    hu, _ = chest_phantom()
    soft = np.zeros_like(hu, dtype=np.float32)
    soft[16:25, 28:37, 16:25] = 0.3
    soft[18:23, 30:35, 18:23] = 0.9
    aff = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    d = {"id": "ct1", "image": MetaTensor(torch.from_numpy(hu)[None], affine=aff),
         "mask": MetaTensor(torch.from_numpy(soft)[None], affine=aff)}  # fmt: skip
    d = LungMaskd(keys="image")(d)
    d = LungBoxd(keys=["image", "mask", "lung_mask"], box_mm=(100, 100, 90), roi_size=(50, 50, 30))(d)
    assert d["lung_mask_box"]["mask_rule"].startswith("soft mask thresholded at 0.5")
    assert int(d["mask"].sum()) == 125 and d["lung_mask_box"]["touches_border"] == []


def test_lung_mask_without_lungs_is_an_error():
    hu = np.full((20, 20, 10), 40.0, dtype=np.float32)
    with pytest.raises(ValueError, match="no lung found"):
        LungMaskd(keys="image")({"id": "solid", "image": torch.from_numpy(hu)[None]})


def test_robust_rescale_per_channel_to_0_255():
    img = torch.stack([torch.linspace(0, 1000, 8000), torch.linspace(-5, 5, 8000)]).reshape(2, 20, 20, 20)
    out = RobustRescaled(keys="image", lower=0, upper=100)({"image": img})["image"]
    for c in range(2):
        assert float(out[c].min()) == pytest.approx(0.0) and float(out[c].max()) == pytest.approx(255.0)
    flat = RobustRescaled(keys="image")({"image": torch.ones((1, 4, 4, 4))})["image"]
    assert torch.equal(flat, torch.zeros((1, 4, 4, 4)))


def test_robust_rescale_ignores_background_with_nonzero_reference():
    img = torch.zeros((1, 10, 10, 10))
    img[0, 3:7, 3:7, 3:7] = torch.linspace(100, 200, 64).reshape(4, 4, 4)
    out = RobustRescaled(keys="image", lower=0, upper=100, ref_key="nonzero")({"image": img})["image"]
    assert float(out[0, 3:7, 3:7, 3:7].min()) == pytest.approx(0.0)
    assert float(out[0, 3:7, 3:7, 3:7].max()) == pytest.approx(255.0)


def test_check_finite_names_case_and_count():
    img = torch.zeros((1, 4, 4, 4))
    img[0, 0, 0, :2] = float("nan")
    with pytest.raises(ValueError, match=r"case 'bad'.*2 non-finite"):
        CheckFinited(keys="image")({"id": "bad", "image": img})


def test_lesion_context_keeps_the_lesion_and_its_margin_only():
    d = _case(shape=(20, 20, 20), centre=(10, 10, 10), radius=2, background=7.0)
    d["image"] = d["image"] + 1.0  # every voxel non-zero, so a blanked one is visible
    out = LesionContextd("image", margin=2)(d)
    img, mask = out["image"][0], d["mask"][0] > 0
    assert torch.equal(img[mask], d["image"][0][mask])  # the lesion untouched
    assert float(img[10, 10, 14]) == 8.0 and float(img[10, 10, 15]) == 0.0  # 2 voxels beyond the edge kept, 3 not
    assert float(img[0, 0, 0]) == 0.0 and isinstance(out["image"], MetaTensor)
    assert torch.equal(out["mask"], d["mask"])  # only the image keys change


def test_lesion_context_refuses_an_empty_mask_by_case():
    d = _case()
    d["mask"] = torch.zeros_like(d["mask"])
    with pytest.raises(ValueError, match=r"case 'case7'.*mask 'mask' is empty"):
        LesionContextd("image")(d)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        LesionContextd("image", margin=-1)


def test_lung_box_records_what_it_does_to_the_lesion():
    """Issue 29: the NSCLC box records the lesion's geometry as TumourBoxd does: resampled to the ROI's spacing,
    and the share of a lesion lying partly outside the 224 mm (here 60 mm) box."""
    hu, _ = chest_phantom()
    gtv = np.zeros_like(hu, dtype=np.uint8)
    gtv[18:23, 30:35, 18:23] = 1
    gtv[0:3, 0:3, 18:23] = 1  # a second part in the corner, outside a small lung box
    aff = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    d = {"id": "ct1", "image": MetaTensor(torch.from_numpy(hu)[None], affine=aff),
         "mask": MetaTensor(torch.from_numpy(gtv)[None], affine=aff)}  # fmt: skip
    d = LungMaskd(keys="image")(d)
    geometry = LungBoxd(keys=["image", "mask", "lung_mask"], box_mm=(60, 60, 60), roi_size=(20, 20, 20))(d)[
        "lung_mask_box"
    ]["geometry"]
    assert geometry["box_mm"] == [60, 60, 60] and geometry["resampled_to_mm"] == [3.0, 3.0, 3.0]
    assert geometry["lesion_voxels"] == 170 and geometry["lesion_outside_box"] == 45
    assert geometry["lesion_cut_fraction"] == pytest.approx(45 / 170, abs=1e-4)
