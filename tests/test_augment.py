"""The two-view augmentation chain: the optional random-size crop (``crop_min``) keeps the ROI size and shows a part."""

import torch
from monai.transforms import Compose, RandSpatialCropd

from scripts.pretrain.augment import view_transforms

STILL = dict(
    rotate_deg=0.0, scale=0.0, shift_fraction=0.0, prob_gamma=0.0, prob_sharpen=0.0, prob_blur=0.0, prob_noise=0.0
)


def test_no_crop_unless_asked():
    assert not any(isinstance(t, RandSpatialCropd) for t in view_transforms("image", [16, 16, 16], **STILL))


def test_crop_shows_a_resized_part_of_the_roi():
    ramp = torch.linspace(0, 255, 16).view(1, 16, 1, 1).expand(1, 16, 16, 16).clone()
    chain = Compose(view_transforms("image", [16, 16, 16], crop_min=0.5, **STILL))
    chain.set_random_state(0)
    spans = []
    for _ in range(8):
        v = torch.as_tensor(chain({"image": ramp.clone()})["image"])
        assert v.shape == ramp.shape
        spans.append(float(v.max() - v.min()))
    # a crop of at most half to all of the ramp, resized back: some views see only a part of the intensity range
    assert min(spans) < 0.9 * 255
    assert max(spans) > 0.45 * 255
