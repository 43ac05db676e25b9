"""The two-view augmentation of 3DSiam (Li et al., MICCAI 2021, Fig. 1) made on the training device, a batch at once.

``scripts.pretrain.augment.view_transforms`` makes each view on the CPU in the loader, one case at a time, with a
chain of MONAI transforms: optional flips and quarter turns, an optional random-size crop resized back to the ROI,
the paper's affine (rotation, scale, shift), then gamma, sharpening, blur, Gaussian noise and a clamp.
``DeviceViews`` draws the same random parameters from the same ranges (the config's ``augmentation`` block, the
same keyword arguments) and applies them to a batch ``[B, C, D, H, W]`` wherever it lives:

- geometry: every spatial part of one sample (flips, quarter turns, crop + resize, rotation / scale / shift) is
  composed into ONE affine matrix, and the batch is resampled by ONE ``F.affine_grid`` + ``F.grid_sample``
  (trilinear, ``align_corners=False``: MONAI's convention, a voxel centre at ``(i - (n - 1) / 2)`` in the
  centred voxel frame, the frame its ``RandAffine``, ``Resized`` and the symmetries share). Voxels that MONAI's chain
  leaves 0 (outside the resized crop, outside the ROI) are 0 here too: without a crop by zeros padding; with one, the
  sample is read with border padding and multiplied by the trilinear weight of the inside of the crop's frame (the
  same as zeros padding on that frame), so the crop's outside stays black (one interpolation instead of MONAI's two);
- intensity: MONAI's formulas as batched tensor ops: gamma ``((x - min) / range) ** g * range + min`` per sample,
  Gaussian sharpening ``b1 + alpha (b1 - G(sigma2) b1)`` with ``b1 = G(sigma1) x`` and blur ``G(sigma) x``
  (MONAI's ``erf`` kernels truncated at 4 sigma, zero padding; separable grouped ``conv3d`` with per-sample sigmas),
  noise of a std drawn in ``[0, noise_std]`` per sample (MONAI's ``sample_std``), the clamp to ``[0, b_max]``.

Random parameters come from a ``torch.Generator`` on the CPU (``sample_params``; a fixed number of draws per batch
whatever the outcomes), the matrices are composed in float64 on the CPU and moved, so a seed gives the same views on
any device up to floating point, except the noise field, drawn on the device from a seed the CPU generator gives
(CUDA and CPU generators differ). ``two_views`` seeds a generator from (seed, epoch, iteration, rank): a resumed
run makes the same views, and ranks differ.

Module boundary: plain PyTorch, no Ignite, no config, no MONAI transform (the settings and their defaults are
``augment.view_settings``, so the two paths cannot drift apart); the trainer calls it
(``scripts.pretrain.simsiam_trainer``), the MONAI chain stays the reference (``tests/test_device_augment.py``
compares the two statistically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from scripts.pretrain.augment import view_settings
from scripts.pretrain.step import plain_tensor

# MONAI's RandGaussianSharpen defaults (monai 1.x): sigma1 in [0.5, 1.0] per axis, sigma2 in [0.5, sigma1]
SHARPEN_SIGMA1 = (0.5, 1.0)
SHARPEN_SIGMA2_LOW = 0.5
BLUR_SIGMA = (0.5, 1.0)  # view_transforms' RandGaussianSmoothd
TRUNCATED = 4.0  # MONAI GaussianFilter's tail, in sigmas
GAMMA_EPS = 1e-7  # MONAI AdjustContrast


@dataclass
class ViewParams:
    """The random parameters of one view per sample (CPU tensors; first dimension the batch).

    Spatial axes are MONAI's (0 = D, 1 = H, 2 = W of ``[B, C, D, H, W]``). ``rot90[:, j]`` is the number of quarter
    turns in the j-th axis pair of ``ROT90_AXES`` (0: none); ``crop_size``/``crop_start`` are in voxels of the frame
    after the symmetries (the whole frame when there is no crop); ``rotate`` in radians, ``translate`` in voxels;
    the intensity parameters are drawn for every sample and used where their ``do_*`` flag is set."""

    flip: torch.Tensor  # [B, 3] bool
    rot90: torch.Tensor  # [B, 3] int64 in 0..3
    crop_size: torch.Tensor  # [B, 3] int64
    crop_start: torch.Tensor  # [B, 3] int64
    rotate: torch.Tensor  # [B, 3] float64
    scale: torch.Tensor  # [B, 3]
    translate: torch.Tensor  # [B, 3]
    do_gamma: torch.Tensor  # [B] bool
    gamma: torch.Tensor  # [B]
    do_sharpen: torch.Tensor
    sharpen_sigma1: torch.Tensor  # [B, 3]
    sharpen_sigma2: torch.Tensor  # [B, 3]
    sharpen_alpha: torch.Tensor  # [B]
    do_blur: torch.Tensor
    blur_sigma: torch.Tensor  # [B, 3]
    do_noise: torch.Tensor
    noise_std: torch.Tensor  # [B]
    noise_seed: int

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ROT90_AXES = ((0, 1), (0, 2), (1, 2))  # view_transforms' RandRotate90d axis pairs, in its order


class DeviceViews:
    """One random view per sample of a batch ``x`` [B, C, D, H, W], made on ``x``'s device.

    Takes ``roi_size`` (the output's spatial size) and the keyword arguments of
    ``scripts.pretrain.augment.view_transforms`` (``**@augmentation`` of ``configs/train.json``); ``device``, the
    config's switch that selects this class, is accepted and ignored; an unknown key is refused with the known ones.
    ``view = DeviceViews(...)(x, generator_or_seed)``; ``sample_params`` and ``apply`` split the draw from the
    application; ``two_views(x, seed, epoch, iteration, rank)`` is a training step's pair."""

    def __init__(self, roi_size: Sequence[int], **settings) -> None:
        s = view_settings(**settings)  # view_transforms' keywords and defaults; an unknown key is refused
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 3:
            raise ValueError(f"roi_size must have 3 sides, got {roi_size}")
        self.rotate_rad = math.radians(float(s["rotate_deg"]))
        self.scale = float(s["scale"])
        self.shift = tuple(float(s["shift_fraction"]) * side for side in self.roi_size)
        self.gamma = (float(min(s["gamma"])), float(max(s["gamma"])))
        self.prob_gamma, self.prob_sharpen = float(s["prob_gamma"]), float(s["prob_sharpen"])
        self.prob_blur, self.prob_noise, self.noise_std = (
            float(s["prob_blur"]),
            float(s["prob_noise"]),
            float(s["noise_std"]),
        )
        self.sharpen_alpha = (float(s["sharpen_alpha"][0]), float(s["sharpen_alpha"][1]))
        self.prob_flip, self.prob_rot90 = float(s["prob_flip"]), float(s["prob_rot90"])
        self.crop_min = float(s["crop_min"])
        self.b_max = float(s["b_max"])

    # ---- random parameters
    def sample_params(self, batch: int, generator: torch.Generator, shape: Sequence[int] | None = None) -> ViewParams:
        """The parameters of ``batch`` views from ``generator`` (CPU). ``shape``: the input's spatial size (default
        ``roi_size``), which bounds the crop. The number of draws depends on ``batch`` only."""
        g = generator
        b = int(batch)
        src = torch.tensor(tuple(shape) if shape is not None else self.roi_size, dtype=torch.float64)

        def uniform(lo: float, hi, *size) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, *size, generator=g, dtype=torch.float64)

        flip = torch.rand(b, 3, generator=g, dtype=torch.float64) < self.prob_flip
        turn = torch.rand(b, 3, generator=g, dtype=torch.float64) < self.prob_rot90
        k = torch.randint(1, 4, (b, 3), generator=g)  # RandRotate90(max_k=3): 1..3 quarter turns
        rot90 = torch.where(turn, k, torch.zeros_like(k))
        # the frame after the symmetries (a quarter turn swaps two sides of a non-cubic ROI)
        frame = (self._symmetry(flip, rot90).abs().transpose(1, 2) @ src).round()
        hi = frame
        lo = (self.crop_min * frame).round().clamp(min=1.0) if self.crop_min < 1.0 else frame
        lo = torch.minimum(lo, hi)
        crop_size = (lo + torch.floor(torch.rand(b, 3, generator=g, dtype=torch.float64) * (hi - lo + 1))).clamp(max=hi)
        crop_start = torch.floor(torch.rand(b, 3, generator=g, dtype=torch.float64) * (frame - crop_size + 1))
        params = ViewParams(
            flip=flip,
            rot90=rot90,
            crop_size=crop_size.long(),
            crop_start=crop_start.long(),
            rotate=uniform(-self.rotate_rad, self.rotate_rad, 3),
            scale=1.0 + uniform(-self.scale, self.scale, 3),
            translate=uniform(-1.0, 1.0, 3) * torch.tensor(self.shift, dtype=torch.float64),
            do_gamma=torch.rand(b, generator=g) < self.prob_gamma,
            gamma=uniform(*self.gamma),
            do_sharpen=torch.rand(b, generator=g) < self.prob_sharpen,
            sharpen_sigma1=uniform(*SHARPEN_SIGMA1, 3),
            sharpen_sigma2=torch.zeros(b, 3, dtype=torch.float64),
            sharpen_alpha=uniform(*self.sharpen_alpha),
            do_blur=torch.rand(b, generator=g) < self.prob_blur,
            blur_sigma=uniform(*BLUR_SIGMA, 3),
            do_noise=torch.rand(b, generator=g) < self.prob_noise,
            noise_std=uniform(0.0, self.noise_std),
            noise_seed=int(torch.randint(0, 2**62, (1,), generator=g)),
        )
        u = torch.rand(b, 3, generator=g, dtype=torch.float64)
        params.sharpen_sigma2 = SHARPEN_SIGMA2_LOW + u * (params.sharpen_sigma1 - SHARPEN_SIGMA2_LOW)
        return params

    # ---- geometry
    @staticmethod
    def _symmetry(flip: torch.Tensor, rot90: torch.Tensor) -> torch.Tensor:
        """[B, 3, 3] sampling matrices (output -> input, centred voxel frame) of the flips then the quarter turns,
        composed in view_transforms' order: flips of axes 0, 1, 2, then turns in (0,1), (0,2), (1,2)."""
        b = flip.shape[0]
        m = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
        for a in range(3):
            f = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
            f[:, a, a] = torch.where(flip[:, a], -1.0, 1.0)
            m = m @ f
        for j, (a, c) in enumerate(ROT90_AXES):
            # torch.rot90(x, 1, (a, c)): out[p, q] = x[q, n - 1 - p], i.e. in_a = out_c, in_c = -out_a
            q = torch.eye(3, dtype=torch.float64)
            q[a, a] = q[c, c] = 0.0
            q[a, c], q[c, a] = 1.0, -1.0
            turns = [torch.linalg.matrix_power(q, int(k)) for k in range(4)]
            m = m @ torch.stack(turns)[rot90[:, j]]
        return m

    @staticmethod
    def _rotation(angles: torch.Tensor) -> torch.Tensor:
        """MONAI's ``create_rotate`` (3D, ``rotate_order="XYZ"``, intrinsic): Rx @ Ry @ Rz, [B, 3, 3]."""
        b = angles.shape[0]
        c, s = torch.cos(angles), torch.sin(angles)
        rx, ry, rz = (torch.eye(3, dtype=torch.float64).repeat(b, 1, 1) for _ in range(3))
        rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
        ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = c[:, 1], s[:, 1], -s[:, 1], c[:, 1]
        rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = c[:, 2], -s[:, 2], s[:, 2], c[:, 2]
        return rx @ ry @ rz

    def matrices(self, params: ViewParams, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(full, view, view_shape)``: [B, 4, 4] float64 sampling maps in the centred voxel frame from the output
        (``roi_size``) to the input of spatial ``shape`` (all spatial parts composed) and to the frame the affine
        reads (the resized crop, or the input after the symmetries), and that frame's [B, 3] size."""
        b = params.rotate.shape[0]
        src = torch.tensor(tuple(shape), dtype=torch.float64)
        sym = self._symmetry(params.flip, params.rot90)
        frame = (sym.abs().transpose(1, 2) @ src).round()
        # RandAffine: in = R (S out + t)  (rotate @ translate @ scale)
        rot = self._rotation(params.rotate)
        affine = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
        affine[:, :3, :3] = rot @ torch.diag_embed(params.scale)
        affine[:, :3, 3] = (rot @ params.translate.unsqueeze(-1)).squeeze(-1)
        cropped = self.crop_min < 1.0
        out = torch.tensor(self.roi_size, dtype=torch.float64)
        size = params.crop_size.double()
        # crop + Resized (trilinear, align_corners False): crop = out * size / roi; crop centre within the frame
        crop = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
        if cropped:
            crop[:, :3, :3] = torch.diag_embed(size / out)
            crop[:, :3, 3] = params.crop_start.double() + (size - 1) / 2 - (frame - 1) / 2
        symmetry = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
        symmetry[:, :3, :3] = sym
        full = symmetry @ crop @ affine
        view_shape = out.expand(b, 3).clone() if cropped else frame
        return full, affine, view_shape

    @staticmethod
    def _theta(m: torch.Tensor, in_shape: torch.Tensor, out_shape: torch.Tensor) -> torch.Tensor:
        """[B, 3, 4] ``affine_grid`` theta (normalised, x = last axis, align_corners False) of a centred-voxel map."""
        d_in = torch.diag_embed(2.0 / in_shape) if in_shape.dim() == 2 else torch.diag(2.0 / in_shape)
        d_out_inv = torch.diag(out_shape / 2.0)
        lin = d_in @ m[:, :3, :3] @ d_out_inv
        t = (d_in @ m[:, :3, 3:]).squeeze(-1)
        rev = [2, 1, 0]
        return torch.cat([lin[:, rev][:, :, rev], t[:, rev].unsqueeze(-1)], dim=2)

    def _resample(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        b, c = x.shape[:2]
        shape = tuple(x.shape[2:])
        full, view, view_shape = self.matrices(params, shape)
        out = torch.tensor(self.roi_size, dtype=torch.float64)
        size = (b, c, *self.roi_size)
        theta = self._theta(full, torch.tensor(shape, dtype=torch.float64), out).to(x.device, torch.float32)
        grid = F.affine_grid(theta, size, align_corners=False)
        if self.crop_min >= 1.0:  # the view's frame is the input's (up to symmetries): zeros padding is the mask
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        theta_view = self._theta(view, view_shape, out).to(x.device, torch.float32)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # zeros outside the view's frame: the trilinear weight of its inside, per axis (grid order x=W, y=H, z=D)
        u = F.affine_grid(theta_view, size, align_corners=False)
        n = view_shape[:, [2, 1, 0]].to(x.device, torch.float32).view(b, 1, 1, 1, 3)
        r = ((u + 1.0) * n - 1.0) / 2.0
        inside = torch.minimum(r + 1.0, n - r).clamp(0.0, 1.0).prod(dim=-1)
        return y * inside.unsqueeze(1)

    # ---- intensity
    @staticmethod
    def _kernels(sigma: torch.Tensor) -> torch.Tensor:
        """[n, 3, 2T+1] MONAI ``gaussian_1d(approx="erf")`` kernels, each truncated at its own tail."""
        sigma = sigma.float()
        tails = torch.floor(torch.clamp(sigma * TRUNCATED, min=0.5) + 0.5)
        t_max = int(tails.max()) if sigma.numel() else 0
        xs = torch.arange(-t_max, t_max + 1, dtype=torch.float32)
        t = 0.70710678 / sigma.abs().unsqueeze(-1)
        k = 0.5 * (torch.erf(t * (xs + 0.5)) - torch.erf(t * (xs - 0.5)))
        return k.clamp(min=0) * (xs.abs() <= tails.unsqueeze(-1))

    @staticmethod
    def _gaussian(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Separable zero-padded filtering of x [n, C, D, H, W] with per-sample kernels [n, 3, K] (grouped conv3d)."""
        n, c = x.shape[:2]
        half = kernels.shape[-1] // 2
        y = x.reshape(1, n * c, *x.shape[2:])
        w = kernels.to(x.device, x.dtype).repeat_interleave(c, dim=0)  # [n*C, 3, K]
        for axis in range(3):
            shape = [n * c, 1, 1, 1, 1]
            shape[2 + axis] = kernels.shape[-1]
            pad = [0, 0, 0]
            pad[axis] = half
            y = F.conv3d(y, w[:, axis].reshape(shape), padding=tuple(pad), groups=n * c)
        return y.reshape(x.shape)

    def _intensity(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        def subset(flag: torch.Tensor) -> torch.Tensor | None:
            idx = flag.nonzero().flatten()
            return idx if idx.numel() else None

        dev = x.device
        if (idx := subset(p.do_gamma)) is not None:
            v = x[idx.to(dev)]
            mn = v.amin(dim=(1, 2, 3, 4), keepdim=True)
            rng = v.amax(dim=(1, 2, 3, 4), keepdim=True) - mn
            g = p.gamma[idx].to(dev, x.dtype).view(-1, 1, 1, 1, 1)
            x = x.index_copy(0, idx.to(dev), ((v - mn) / (rng + GAMMA_EPS)) ** g * rng + mn)
        if (idx := subset(p.do_sharpen)) is not None:
            v = x[idx.to(dev)]
            b1 = self._gaussian(v, self._kernels(p.sharpen_sigma1[idx]))
            b2 = self._gaussian(b1, self._kernels(p.sharpen_sigma2[idx]))
            a = p.sharpen_alpha[idx].to(dev, x.dtype).view(-1, 1, 1, 1, 1)
            x = x.index_copy(0, idx.to(dev), b1 + a * (b1 - b2))
        if (idx := subset(p.do_blur)) is not None:
            x = x.index_copy(0, idx.to(dev), self._gaussian(x[idx.to(dev)], self._kernels(p.blur_sigma[idx])))
        if (idx := subset(p.do_noise)) is not None:
            gen = torch.Generator(device=dev).manual_seed(p.noise_seed)
            v = x[idx.to(dev)]
            noise = torch.randn(v.shape, generator=gen, device=dev, dtype=x.dtype)
            x = x.index_copy(0, idx.to(dev), v + noise * p.noise_std[idx].to(dev, x.dtype).view(-1, 1, 1, 1, 1))
        return x.clamp(0.0, self.b_max)

    # ---- the view
    def apply(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The view of ``x`` [B, C, D, H, W] under ``params`` (float32, spatial size ``roi_size``, on x's device)."""
        x = plain_tensor(x).float()
        if x.dim() != 5:
            raise ValueError(f"DeviceViews expects a batch [B, C, D, H, W], got shape {tuple(x.shape)}")
        return self._intensity(self._resample(x, params), params)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """One random view per sample of ``x``; ``generator`` a CPU ``torch.Generator`` or a seed (None: torch's
        global generator)."""
        if generator is None or isinstance(generator, int):
            generator = torch.Generator().manual_seed(int(generator)) if generator is not None else None
        return self.apply(x, self.sample_params(x.shape[0], generator, x.shape[2:]))

    def two_views(
        self, x: torch.Tensor, seed: int, epoch: int, iteration: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of a training step, drawn from ``step_generator(seed, epoch, iteration, rank)``."""
        g = step_generator(seed, epoch, iteration, rank)
        return self(x, g), self(x, g)


def step_generator(seed: int, epoch: int, iteration: int, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from a training step's key: the same key, the same views (a resumed run repeats them);
    neighbouring keys give unrelated streams (``numpy.random.SeedSequence`` mixing)."""
    key = [int(v) & 0xFFFFFFFF for v in (seed, epoch, iteration, rank)]
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
