"""3DSiam networks: the 3D encoder of the paper's supplementary Table 3, the SimSiam predictor and the wrapper.

Plain PyTorch, no Ignite and no config dicts. The encoder is what ships (``models/model.pt``, TorchScript
``models/model.ts``); the predictor only exists during pre-training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

MIN_INPUT_SIZE = 27  # three max-pools of kernel 3 / stride 3: 27 -> 9 -> 3 -> 1


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv3d (size-preserving, no bias because BN follows) + BatchNorm3d + ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


class Bottleneck3D(nn.Module):
    """Residual bottleneck block of Table 3: 1x1x1 -> 3x3x3 -> 1x1x1 convs with an identity shortcut.

    Table 3 lists only the convolutions; BN after each conv, ReLU after the first two and ReLU after the
    residual add follow the standard ResNet bottleneck that the paper names.
    """

    def __init__(self, channels: int = 32, bottleneck_channels: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, bottleneck_channels, 1)
        self.conv2 = _conv_bn_relu(bottleneck_channels, bottleneck_channels, 3)
        self.conv3 = nn.Conv3d(bottleneck_channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv3(self.conv2(self.conv1(x))))
        return self.relu(out + x)


class Encoder3D(nn.Module):
    """The 3D encoder E of the paper (supplementary Table 3); maps [B, C, D, H, W] to a [B, out_dim] embedding.

    Layers: conv 3^3 x width -> 2 bottleneck residual blocks -> maxpool 3 (stride 3) -> conv 3^3 x 2*width ->
    maxpool 3 -> conv 3^3 x 4*width -> maxpool 3 -> conv 3^3 x 8*width -> global average pool ->
    dense hidden_dim + BN1d + ReLU -> dense out_dim.

    Our readings of Table 3, where it is silent:
    - conv1 is followed by BN + ReLU like the other convs (the table omits them only for conv1; without a
      non-linearity conv1 and the first 1x1x1 conv of block 2 would compose into one linear map).
    - dense7 is "324, bn"; we add a ReLU after the BN, since two stacked linear layers with only an affine
      BN between them collapse into one linear map.
    - max-pool "stride 0" means non-overlapping pooling (stride = kernel = 3), which matches the table's
      output sizes 96 -> 32 -> 10 -> 3 (floor division).
    Any input with every spatial size >= 27 works (27 -> 9 -> 3 -> 1); smaller input raises ``ValueError``.
    """

    def __init__(
        self, in_channels: int = 1, out_dim: int = 256, hidden_dim: int = 324, width: int = 32, out_bn: bool = False
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feature_dim = out_dim
        self.min_input_size = MIN_INPUT_SIZE  # an attribute, because TorchScript cannot read module globals
        self.stem = _conv_bn_relu(in_channels, width, 3)
        self.blocks = nn.Sequential(Bottleneck3D(width, width), Bottleneck3D(width, width))
        self.pool = nn.MaxPool3d(kernel_size=3, stride=3)
        self.conv4 = _conv_bn_relu(width, 2 * width, 3)
        self.conv5 = _conv_bn_relu(2 * width, 4 * width, 3)
        self.conv6 = _conv_bn_relu(4 * width, 8 * width, 3)
        self.global_pool = nn.AdaptiveAvgPool3d(1)
        self.fc7 = nn.Linear(8 * width, hidden_dim, bias=False)  # bias is redundant before BN
        self.bn7 = nn.BatchNorm1d(hidden_dim)
        self.relu7 = nn.ReLU(inplace=True)
        self.fc8 = nn.Linear(hidden_dim, out_dim, bias=not out_bn)
        # SimSiam's projector ends in a BN without affine parameters; Table 3 has none (``out_bn=False``)
        self.bn8 = nn.BatchNorm1d(out_dim, affine=False) if out_bn else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        """Fail early with the offending shape instead of a cryptic pooling error deep inside the network."""
        if x.dim() != 5:
            raise ValueError(f"Encoder3D expects a [B, C, D, H, W] tensor, got shape {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Encoder3D was built for {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {list(x.shape)})"
            )
        for size in x.shape[2:]:
            if size < self.min_input_size:
                raise ValueError(
                    f"Encoder3D needs every spatial size >= {self.min_input_size} (three stride-3 max-pools), "
                    f"got spatial size {list(x.shape[2:])}"
                )

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled conv6 features [B, 8*width]: the convolutional trunk without the dense head."""
        self._check_input(x)
        x = self.blocks(self.stem(x))
        x = self.conv4(self.pool(x))
        x = self.conv5(self.pool(x))
        x = self.conv6(self.pool(x))
        return torch.flatten(self.global_pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu7(self.bn7(self.fc7(self.backbone(x))))
        return self.bn8(self.fc8(x))


class Predictor(nn.Module):
    """SimSiam predictor p: bottleneck MLP dim -> hidden (BN, ReLU) -> dim, applied to the encoder output."""

    def __init__(self, dim: int = 256, hidden_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SimSiam3D(nn.Module):
    """3DSiam training wrapper: shared encoder on both views, predictor on top.

    ``forward(x1, x2)`` returns ``(p1, p2, z1, z2)`` in one call so that DistributedDataParallel sees every
    parameter used inside ``forward`` and syncs its gradient. ``z1``/``z2`` are NOT detached here: the loss
    applies the stop-gradient (``scripts.pretrain.losses``), so the encoder still gets gradients through ``p1``/``p2``.

    ``load_state_dict`` also accepts an encoder-only state dict (keys without the ``encoder.`` prefix, as
    saved in ``models/model.pt``) and loads it into the encoder, leaving the predictor untouched. This is
    what lets MONAI Label's ``CheckpointLoader(load_dict={"model": network}, strict=False)`` resume from
    ``model.pt``: a plain ``nn.Module.load_state_dict`` would match no key and silently load nothing.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        if predictor is None:
            dim = getattr(encoder, "feature_dim", None)
            if not isinstance(dim, int):
                raise ValueError("SimSiam3D needs a predictor, or an encoder with an int `feature_dim` attribute")
            predictor = Predictor(dim)
        self.predictor = predictor

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z1 = self.encoder(x1)
        z2 = self.encoder(x2)
        return self.predictor(z1), self.predictor(z2), z1, z2

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Representation z = E(x) used downstream (the predictor is discarded after pre-training)."""
        return self.encoder(x)

    def _is_encoder_only(self, state_dict: Mapping[str, Any]) -> bool:
        """True when no key carries a submodule prefix and at least one key names an encoder entry."""
        keys = list(state_dict.keys())
        if any(k.startswith(("encoder.", "predictor.")) for k in keys):
            return False
        encoder_keys = set(self.encoder.state_dict().keys())
        return any(k in encoder_keys for k in keys)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a full ``encoder.*``/``predictor.*`` dict, or an encoder-only dict into the encoder.

        A dict that shares no key with this model raises ``KeyError`` even with ``strict=False``: loading
        nothing is never what the caller meant.
        """
        if self._is_encoder_only(state_dict):
            return self.encoder.load_state_dict(state_dict, strict=strict, assign=assign)
        own_keys = set(self.state_dict().keys())
        if len(state_dict) > 0 and not any(k in own_keys for k in state_dict):
            sample = sorted(state_dict.keys())[:5]
            raise KeyError(
                f"SimSiam3D.load_state_dict: none of the {len(state_dict)} keys (e.g. {sample}) matches the model "
                "(expected 'encoder.*'/'predictor.*' keys or an encoder-only state dict)"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def checkpoint_has_output_bn(path: str) -> bool:
    """Whether an encoder state dict (``models/model.pt``) was trained with the output BN (``out_bn=True``).

    Inference builds its encoder to match the checkpoint it loads, so a model trained with either recipe (the
    default, or the paper preset without the output BN) loads strictly. A missing file reads as ``False``; the
    loader then reports the missing checkpoint itself.
    """
    import os

    if not os.path.isfile(path):
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    refuse_training_checkpoint(path, state)
    return "bn8.running_mean" in state


# Top-level keys of the training state ``scripts.pretrain.handlers.TrainingCheckpoint`` saves every epoch.
TRAINING_STATE_KEYS = ("network", "optimizer", "lr_scheduler", "trainer")


def refuse_training_checkpoint(path, state) -> None:
    """A resumable training checkpoint (``checkpoints/checkpoint_epoch=N.pt``: the SimSiam network with its
    predictor, the optimiser's, scheduler's and engine's state) given where an encoder is expected: refused naming
    what it is and what to pass, instead of a list of missing and unexpected keys."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not an encoder state dict: pass models/model.pt")
    found = [k for k in TRAINING_STATE_KEYS if k in state]
    if found:
        raise ValueError(
            f"{path} is a training checkpoint (its keys {sorted(map(str, state))}: the network with its predictor "
            "and the optimiser's, scheduler's and engine's state, for --resume), not an encoder: pass "
            "models/model.pt (the encoder training exports after every epoch) or models/checkpoints/model_best.pt"
        )
