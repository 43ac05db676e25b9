"""Views made on the training device (``scripts.pretrain.device_augment``) against the MONAI chain they replace.

Exact checks where the two compute the same thing (symmetries, the affine, gamma, the Gaussian filters), ranges of
the drawn parameters, determinism, and a statistical comparison of whole views with ``view_transforms`` for the
default recipe and the paper preset."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import AdjustContrast, Affine, Compose, Flip, GaussianSharpen, GaussianSmooth, Rotate90
from scipy.stats import ks_2samp

from scripts.pretrain.augment import view_settings, view_transforms
from scripts.pretrain.device_augment import ROT90_AXES, DeviceViews, step_generator

ROOT = Path(__file__).resolve().parent.parent
STILL = dict(
    rotate_deg=0.0, scale=0.0, shift_fraction=0.0, prob_gamma=0.0, prob_sharpen=0.0, prob_blur=0.0, prob_noise=0.0
)


def _augmentation(*files: str) -> dict:
    out = {}
    for f in files:
        out.update(json.loads((ROOT / f).read_text())["augmentation"])
    return out


def _phantom(n: int = 24, seed: int = 0) -> torch.Tensor:
    """An off-centre textured ellipsoid on a zero background, intensities in [0, 255], [1, n, n, n]."""
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    c = torch.tensor([0.45, 0.55, 0.5]).view(3, 1, 1, 1) * n
    r = torch.tensor([0.3, 0.22, 0.26]).view(3, 1, 1, 1) * n
    inside = (((g - c) / r) ** 2).sum(0) <= 1
    texture = torch.rand(n, n, n, generator=torch.Generator().manual_seed(seed))
    texture = torch.nn.functional.avg_pool3d(texture[None, None], 3, 1, 1)[0, 0]
    vol = (80 + 120 * texture + 0.8 * g[0]).clamp(0, 255) * inside
    return vol[None]


def test_settings_are_view_transforms_settings():
    theirs = set(inspect.signature(view_transforms).parameters) - {"key", "roi_size"}
    assert set(view_settings()) == theirs  # one list of settings for both paths, with view_transforms' defaults
    assert view_settings(scale=0.1)["scale"] == 0.1 and view_settings()["scale"] == 0.3
    for preset in (("configs/train.json",), ("configs/train.json", "configs/presets/paper.json")):
        block = _augmentation(*preset)
        DeviceViews([8, 8, 8], **block)
        view_transforms("image", [8, 8, 8], **block)
    DeviceViews([8, 8, 8], device=True)  # the config's switch is accepted and ignored
    with pytest.raises(TypeError, match="unknown augmentation settings.*rotate"):
        DeviceViews([8, 8, 8], rotation_deg=10)


def test_parameter_ranges():
    dv = DeviceViews([20, 20, 20], **_augmentation("configs/train.json", "configs/presets/paper.json"))
    dv.prob_flip, dv.prob_rot90, dv.crop_min = 0.5, 0.5, 0.6
    p = dv.sample_params(4000, torch.Generator().manual_seed(0))
    rad = math.radians(20)
    assert p.rotate.abs().max() <= rad and p.rotate.abs().max() > 0.95 * rad
    assert ((p.scale - 1).abs() <= 0.3).all() and (p.scale - 1).abs().max() > 0.28
    assert (p.translate.abs() <= 0.05 * 20 + 1e-9).all() and p.translate.abs().max() > 0.95
    assert ((p.gamma >= 0.7) & (p.gamma <= 1.5)).all()
    assert ((p.sharpen_alpha >= 10) & (p.sharpen_alpha <= 30)).all()
    s1, s2 = p.sharpen_sigma1, p.sharpen_sigma2
    assert ((s1 >= 0.5) & (s1 <= 1.0)).all() and ((s2 >= 0.5) & (s2 <= s1)).all()
    assert ((p.blur_sigma >= 0.5) & (p.blur_sigma <= 1.0)).all()
    assert ((p.noise_std >= 0) & (p.noise_std <= 5.0)).all() and abs(float(p.noise_std.mean()) - 2.5) < 0.15
    assert set(p.rot90.unique().tolist()) == {0, 1, 2, 3}
    assert ((p.crop_size >= 12) & (p.crop_size <= 20)).all() and set(p.crop_size.unique().tolist()) == set(
        range(12, 21)
    )
    assert (p.crop_start >= 0).all() and (p.crop_start + p.crop_size <= 20).all()
    for flag, prob in (
        (p.flip, 0.5),
        (p.rot90 > 0, 0.5),
        (p.do_gamma, 0.8),
        (p.do_sharpen, 0.3),
        (p.do_blur, 0.3),
        (p.do_noise, 0.5),
    ):
        assert abs(float(flag.double().mean()) - prob) < 0.03


def test_deterministic_under_a_seed_and_a_step_key():
    x = _phantom(16).repeat(3, 1, 1, 1, 1)
    dv = DeviceViews([16, 16, 16], **_augmentation("configs/train.json"))
    torch.testing.assert_close(dv(x, 7), dv(x, 7), rtol=0, atol=0)
    assert not torch.equal(dv(x, 7), dv(x, 8))
    a1, a2 = dv.two_views(x, seed=0, epoch=2, iteration=5)
    b1, b2 = dv.two_views(x, seed=0, epoch=2, iteration=5)
    torch.testing.assert_close((a1, a2), (b1, b2), rtol=0, atol=0)
    assert not torch.equal(a1, a2)  # the two views of a step differ
    c1, _ = dv.two_views(x, seed=0, epoch=2, iteration=5, rank=1)
    assert not torch.equal(a1, c1)  # ranks draw their own views
    g1, g2 = step_generator(0, 1, 2), step_generator(0, 2, 1)
    assert torch.rand(1, generator=g1) != torch.rand(1, generator=g2)


def test_identity_when_nothing_is_drawn():
    x = _phantom(16).repeat(2, 1, 1, 1, 1)
    y = DeviceViews([16, 16, 16], **STILL)(x, 0)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-3)


def test_symmetries_alone_are_torch_flips_and_rot90():
    x = torch.rand(2, 2, 12, 12, 12) * 255
    dv = DeviceViews([12, 12, 12], **STILL)
    for j, (a, b) in enumerate(ROT90_AXES):
        for k in (1, 2, 3):
            p = dv.sample_params(2, torch.Generator().manual_seed(0))
            p.flip[:] = False
            p.rot90[:] = 0
            p.rot90[:, j] = k
            torch.testing.assert_close(dv.apply(x, p), torch.rot90(x, k, (a + 2, b + 2)), rtol=0, atol=1e-3)
    for a in range(3):
        p = dv.sample_params(2, torch.Generator().manual_seed(0))
        p.flip[:] = False
        p.rot90[:] = 0
        p.flip[:, a] = True
        torch.testing.assert_close(dv.apply(x, p), torch.flip(x, (a + 2,)), rtol=0, atol=1e-3)


def test_geometry_is_monai_flip_rot90_and_affine():
    """Without a crop, the one resampling equals MONAI's Flip / Rotate90 / Affine (zeros padding) with the same
    parameters."""
    x = torch.nn.functional.avg_pool3d(torch.rand(3, 1, 16, 16, 16) * 255, 3, 1, 1)
    dv = DeviceViews([16, 16, 16], **{**STILL, "rotate_deg": 25, "scale": 0.3, "shift_fraction": 0.1}, prob_flip=0.5)
    dv.prob_rot90 = 0.5
    p = dv.sample_params(3, torch.Generator().manual_seed(3))
    y = dv.apply(x, p)
    for i in range(3):
        v = x[i]
        for a in range(3):
            v = Flip(spatial_axis=a)(v) if p.flip[i, a] else v
        for j, axes in enumerate(ROT90_AXES):
            v = Rotate90(k=int(p.rot90[i, j]), spatial_axes=axes)(v) if p.rot90[i, j] else v
        torch.testing.assert_close(y[i], _monai_affine(p, i, v), rtol=0, atol=5e-3)


def _monai_affine(p, i: int, v: torch.Tensor) -> torch.Tensor:
    """MONAI's ``Affine`` with sample ``i``'s rotation, scale and shift of ``p``, on a 16³ grid: the reference."""
    affine = Affine(
        rotate_params=p.rotate[i].tolist(),
        scale_params=p.scale[i].tolist(),
        translate_params=p.translate[i].tolist(),
        mode="bilinear",
        padding_mode="zeros",
        spatial_size=(16, 16, 16),
        image_only=True,
    )
    return torch.as_tensor(affine(v))


def test_crop_geometry_follows_monai_on_a_ramp():
    """With the crop, the view is the crop box resized to the ROI then the affine (a ramp, where one trilinear
    interpolation and MONAI's two agree), and black outside the crop box."""
    from monai.transforms import Resize, SpatialCrop

    g = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    x = (100 + 3 * g[0] + 2 * g[1] - 1.5 * g[2])[None, None].repeat(2, 1, 1, 1, 1)
    dv = DeviceViews([16, 16, 16], **{**STILL, "rotate_deg": 20, "scale": 0.2, "shift_fraction": 0.1}, crop_min=0.6)
    p = dv.sample_params(2, torch.Generator().manual_seed(1))
    y = dv.apply(x, p)
    for i in range(2):
        start, size = p.crop_start[i].tolist(), p.crop_size[i].tolist()
        v = SpatialCrop(roi_start=start, roi_end=[a + b for a, b in zip(start, size)])(x[i])
        v = Resize([16, 16, 16], mode="trilinear")(v)
        v = _monai_affine(p, i, v)
        assert torch.equal(v > 0, y[i] > 0)
        assert float((v - y[i]).abs().mean()) < 0.1 and float((v - y[i]).abs().max()) < 2.0


def test_intensity_transforms_are_monai_formulas():
    x = torch.nn.functional.avg_pool3d(torch.rand(2, 1, 14, 14, 14) * 255, 3, 1, 1)
    dv = DeviceViews([14, 14, 14], **{**STILL, "prob_gamma": 1.0})
    p = dv.sample_params(2, torch.Generator().manual_seed(2))
    y = dv.apply(x, p)
    for i in range(2):
        ref = AdjustContrast(float(p.gamma[i]))(x[i])
        torch.testing.assert_close(y[i], torch.as_tensor(ref).clamp(0, 255), rtol=1e-4, atol=1e-3)
    dv = DeviceViews([14, 14, 14], **{**STILL, "prob_sharpen": 1.0})
    p = dv.sample_params(2, torch.Generator().manual_seed(2))
    y = dv.apply(x, p)
    for i in range(2):
        ref = GaussianSharpen(
            sigma1=p.sharpen_sigma1[i].tolist(), sigma2=p.sharpen_sigma2[i].tolist(), alpha=float(p.sharpen_alpha[i])
        )(x[i])
        torch.testing.assert_close(y[i], torch.as_tensor(ref).clamp(0, 255), rtol=1e-4, atol=1e-2)
    dv = DeviceViews([14, 14, 14], **{**STILL, "prob_blur": 1.0})
    p = dv.sample_params(2, torch.Generator().manual_seed(2))
    y = dv.apply(x, p)
    for i in range(2):
        ref = GaussianSmooth(sigma=p.blur_sigma[i].tolist())(x[i])
        torch.testing.assert_close(y[i], torch.as_tensor(ref), rtol=1e-4, atol=1e-3)
    dv = DeviceViews([14, 14, 14], **{**STILL, "prob_noise": 1.0, "noise_std": 5.0})
    p = dv.sample_params(2, torch.Generator().manual_seed(2))
    mid = torch.full((2, 1, 14, 14, 14), 128.0)
    noise = dv.apply(mid, p) - 128
    for i in range(2):
        assert abs(float(noise[i].std()) - float(p.noise_std[i])) < 0.1 * float(p.noise_std[i]) + 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views_but_the_noise():
    """The parameters come from the CPU generator: the same seed gives the same views on CUDA up to floating point
    (the noise field is drawn on the device, so it is left out here)."""
    x = _phantom(24).repeat(4, 1, 1, 1, 1)
    block = {**_augmentation("configs/train.json", "configs/presets/paper.json"), "prob_noise": 0.0}
    block.update(prob_flip=0.5, prob_rot90=0.5, crop_min=0.7)
    dv = DeviceViews([24, 24, 24], **block)
    cpu = dv(x, 3)
    cuda = dv(x.cuda(), 3)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=0.5)


def _stats(v: torch.Tensor) -> np.ndarray:
    """Mean, std, centre-of-mass offset from the ROI centre (voxels) and share of the lesion (voxels above a quarter
    of the intensity range) of each view [N, 1, n, n, n].

    Not the share of voxels above 0: with a crop, MONAI interpolates twice (the resize, then the affine) and spreads
    the lesion's edge by a fraction of a voxel more than the one resampling here, which moves the faint tail (about
    0.16 vs 0.15 of the ROI above 10 on the default recipe's phantom views) but not the edge itself."""
    v = v.double().flatten(0, 1)
    n = v.shape[-1]
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"))
    mass = v.sum(dim=(1, 2, 3)).clamp(min=1e-9)
    com = torch.stack([(v * g[a]).sum(dim=(1, 2, 3)) / mass for a in range(3)], 1)
    offset = (com - (n - 1) / 2).norm(dim=1)
    lesion = (v > 255 / 4).double().mean(dim=(1, 2, 3))
    return torch.stack([v.mean(dim=(1, 2, 3)), v.std(dim=(1, 2, 3)), offset, lesion], 1).numpy()


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_views_match_the_monai_chain_statistically(preset):
    files = ("configs/train.json",) + (("configs/presets/paper.json",) if preset == "paper" else ())
    block = _augmentation(*files)
    n, views = 24, 160
    vol = _phantom(n)
    chain = Compose(view_transforms("image", [n, n, n], **block))
    chain.set_random_state(0)
    monai_views = torch.stack([torch.as_tensor(chain({"image": vol.clone()})["image"]) for _ in range(views)])
    dv = DeviceViews([n, n, n], **block)
    batch = vol.expand(views // 4, 1, n, n, n)
    g = torch.Generator().manual_seed(0)
    ours = torch.cat([dv(batch, g) for _ in range(4)])
    assert ours.shape == monai_views.shape
    a, b = _stats(monai_views), _stats(ours)
    for j, name in enumerate(("mean", "std", "centre offset", "lesion share")):
        p = ks_2samp(a[:, j], b[:, j]).pvalue
        se = math.sqrt(a[:, j].var() / views + b[:, j].var() / views)
        assert p > 1e-3, (
            f"{preset}: {name} distributions differ (KS p={p:.2g}, means {a[:, j].mean():.3g} vs {b[:, j].mean():.3g})"
        )
        assert abs(a[:, j].mean() - b[:, j].mean()) < 4 * se + 1e-9, f"{preset}: {name} means differ"


# ---- the switch in the training workflow (configs/train.json augmentation#device)
FAST = {"epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "knn_monitor": False, "augmentation#device": True}


def _train(root: Path, datalist: Path, **override):
    from workflows import train_workflow

    wf = train_workflow(root, datalist, **{**FAST, **override})
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def test_device_views_train_plain_repeat_under_a_seed_and_resume(tiny_cohort, tmp_path):
    cache = str(tmp_path / "cache")
    a = _train(tmp_path / "a", tiny_cohort, cache_dir=cache, epochs=2)
    item = a.parser.get_parsed_content("train#dataset")[0]
    assert "image_2" not in item  # the loader yields the cached ROI only
    assert isinstance(a.trainer.device_views, DeviceViews)
    assert math.isfinite(float(a.trainer.state.output["loss"]))
    _train(tmp_path / "b", tiny_cohort, cache_dir=cache, epochs=2)
    _train(tmp_path / "c", tiny_cohort, cache_dir=cache, epochs=2, **{"train#trainer#max_epochs": 1})
    _train(tmp_path / "c", tiny_cohort, cache_dir=cache, epochs=2, resume=True)
    wa = torch.load(tmp_path / "a" / "models" / "model.pt", weights_only=True)
    init = torch.load(tmp_path / "a" / "models" / "checkpoints" / "model_init.pt", weights_only=True)
    assert not torch.equal(wa["fc8.weight"], init["fc8.weight"])
    for run in ("b", "c"):  # the same seed, straight or resumed after epoch 1: the same views, the same weights
        w = torch.load(tmp_path / run / "models" / "model.pt", weights_only=True)
        for key in wa:
            torch.testing.assert_close(wa[key], w[key], rtol=0, atol=1e-6, msg=f"{key} differs in run {run}")


@pytest.mark.parametrize(
    ("balance", "metric"),
    [
        ({"balance#mode": "se", "balance#k": 2, "balance#q": 4, "balance#m": 4}, "balance/cluster_size_0"),
        ({"balance#mode": "re", "balance#re_embeddings": "original"}, "balance/cluster_size_0"),
        ({"balance#mode": "bank", "balance#k": 2}, "balance/bank_k"),
    ],
    ids=["se", "re-original", "bank"],
)
def test_device_views_train_with_balancing(tiny_cohort, tmp_path, balance, metric):
    wf = _train(tmp_path, tiny_cohort, **{**balance, "balance#warmup_epochs": 0})
    assert wf.trainer.context().make_views is not wf.trainer.view_transform  # SE's selection: views on the device
    assert math.isfinite(float(wf.trainer.state.output["loss"]))
    assert wf.trainer.state.metrics[metric] > 0


def test_switch_off_keeps_the_loader_views(tiny_cohort, tmp_path):
    from workflows import train_workflow

    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4)
    wf.initialize()
    assert wf.parser.get_parsed_content("device_views") is None and wf.trainer.device_views is None
    names = [type(t).__name__ for t in wf.parser.get_parsed_content("train#random_transforms")]
    assert names[0] == "ViewCopyd" and "RandAffined" in names
