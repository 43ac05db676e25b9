"""Rubik's cube pretraining (Zhuang et al., MICCAI 2019; the paper's reference 25, Table 2's proxy-task row).

The ROI is cut into a 2x2x2 grid of sub-cubes; the cubes are shuffled by one permutation of a fixed set and each
cube is rotated. The network (the bundle's ``Encoder3D`` on every cube, weights shared) predicts which permutation
was applied ("cube ordering") and how each cube was rotated ("cube orientation").

Choices, where the paper leaves room or our setting differs:

* **Permutation set**: ``n_permutations`` permutations of the 8 cubes chosen greedily for maximal minimal Hamming
  distance (Noroozi & Favaro's algorithm, which Zhuang et al. use), deterministically: it starts from the identity
  and breaks ties by the lowest lexicographic index, so every run and every machine gets the same set.
* **Rotation classes**: Zhuang et al. rotate each cube by 180 degrees "horizontally" and/or "vertically" and predict
  both flags per cube. The two flags together are one of 4 classes, the identity and the three 180-degree rotations
  about the D, H and W axes (the Klein four-group; "both" = 180 degrees about the third axis), so we predict one
  4-way class per cube with cross-entropy (chance 0.25). A 180-degree rotation keeps a cube's shape, so it works
  for anisotropic ROIs too.
* **Cube size**: ``Encoder3D`` needs >= 27 voxels per side, but the default 32^3 ROI gives 16^3 grid cells. We keep
  the bundle's ROI (same data, same ROI as 3DSiam) and resize: from each cell we cut a cube of
  ``round(cell * (1 - gap))`` voxels at a random offset inside the cell (Zhuang's random gaps, so the task cannot be
  solved from continuity at the cube borders) and resize it trilinearly to ``cube_size``^3 (27 by default). The
  encoder thus sees cubes magnified ~2x relative to whole-ROI inference; that is the price of the fixed ROI.
* **Heads**: the 8 cube embeddings, concatenated in slot order, feed two small MLP heads (order: P logits; rotation:
  8 x 4 logits), as Zhuang's shared-weight Siamese branches feed fully connected layers. Loss = CE(order) +
  ``rotation_weight`` * mean CE(rotation). Only the encoder is exported (``models/model.pt``, flat keys).

Everything random in a step (permutation, rotations, gap offsets) is drawn from a ``torch.Generator`` seeded by
``(seed, iteration)`` so a resumed run replays the same puzzles as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch import nn
from torch.utils.data import DataLoader

from scripts.config_utils import as_bool
from scripts.pretrain.losses import check_finite
from scripts.pretrain.strategies import NoBalancing, strategy_class
from scripts.run import distributed

logger = logging.getLogger(__name__)

N_CUBES = 8  # a 2x2x2 grid
N_ROTATIONS = 4  # identity, 180 degrees about D, about H, about W
# spatial dims (of a [..., D, H, W] tensor, counted from the end) flipped by each rotation class
_FLIPS = {0: (), 1: (-2, -1), 2: (-3, -1), 3: (-3, -2)}
_CELLS = tuple(itertools.product((0, 1), repeat=3))  # grid position of cube i, (d, h, w) in C order


# ------------------------------------------------------------------------------------------------------ permutations
@lru_cache(maxsize=8)
def _permutation_set(n: int) -> tuple[tuple[int, ...], ...]:
    every = np.asarray(list(itertools.permutations(range(N_CUBES))), dtype=np.int8)  # 40320 x 8, lexicographic
    chosen = [0]  # the identity
    min_dist = (every != every[0]).sum(1)
    for _ in range(n - 1):
        nxt = int(np.argmax(min_dist))  # first index among ties: deterministic
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, (every != every[nxt]).sum(1))
    return tuple(tuple(int(v) for v in every[i]) for i in chosen)


def permutation_set(n: int) -> torch.Tensor:
    """``[n, 8]`` long tensor: ``n`` permutations of the 8 cubes with maximal minimal Hamming distance (greedy).

    Row ``p`` lists, for every slot, the grid cell whose cube is shown there. Row 0 is the identity.
    """
    n = int(n)
    if not 2 <= n <= 40320:
        raise ValueError(f"n_permutations must be in [2, 40320] (8! permutations of 8 cubes), got {n}")
    return torch.tensor(_permutation_set(n), dtype=torch.long)


def min_hamming_distance(perms: torch.Tensor) -> int:
    """Smallest number of slots in which two permutations of the set differ (what the greedy choice maximises)."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    d.fill_diagonal_(N_CUBES + 1)
    return int(d.min())


# ------------------------------------------------------------------------------------------------------------ puzzle
def rotate_cube(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """180-degree rotation class ``rotation`` (0 none, 1 about D, 2 about H, 3 about W) of a [..., D, H, W] tensor."""
    dims = _FLIPS[int(rotation)]
    return torch.flip(x, dims) if dims else x


@dataclass
class Puzzle:
    """A batch of shuffled, rotated cubes and the answers: ``cubes`` [B, 8, C, s, s, s], ``order`` [B] (index into
    the permutation set), ``rotation`` [B, 8] (class of the cube shown in each slot)."""

    cubes: torch.Tensor
    order: torch.Tensor
    rotation: torch.Tensor


def make_puzzle(
    x: torch.Tensor, perms: torch.Tensor, generator: torch.Generator, cube_size: int = 27, gap: float = 0.125
) -> Puzzle:
    """Cut every volume of ``x`` [B, C, D, H, W] into a 2x2x2 grid, shuffle and rotate the cubes.

    Each grid cell of ``(D//2, H//2, W//2)`` voxels gives one cube of ``round(cell * (1 - gap))`` voxels per side at
    a random offset inside the cell; after rotation it is resized (trilinear) to ``cube_size``^3. All random draws
    come from ``generator`` (CPU), in a fixed order, so the same generator state gives the same puzzle.
    """
    if x.dim() != 5:
        raise ValueError(f"make_puzzle expects a [B, C, D, H, W] batch, got shape {list(x.shape)}")
    if not 0.0 <= gap < 1.0:
        raise ValueError(f"gap must be in [0, 1), got {gap}")
    cell = [s // 2 for s in x.shape[2:]]
    size = [max(1, round(c * (1.0 - gap))) for c in cell]
    if min(cell) < 2:
        raise ValueError(f"ROI {list(x.shape[2:])} is too small for a 2x2x2 grid of cubes")
    b = x.shape[0]
    order = torch.randint(len(perms), (b,), generator=generator)
    rotation = torch.randint(N_ROTATIONS, (b, N_CUBES), generator=generator)
    slack = torch.tensor([c - s for c, s in zip(cell, size)])
    offsets = (torch.rand((b, N_CUBES, 3), generator=generator) * (slack + 1)).long().clamp_max(slack)
    out = []
    for i in range(b):
        cubes = []
        for slot in range(N_CUBES):
            src = int(perms[order[i], slot])
            start = [p * c + int(o) for p, c, o in zip(_CELLS[src], cell, offsets[i, src])]
            cube = x[i, :, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]
            cubes.append(rotate_cube(cube, int(rotation[i, slot])))
        out.append(torch.stack(cubes))
    stacked = torch.stack(out)  # [B, 8, C, d, h, w]
    flat = stacked.flatten(0, 1)
    resized = F.interpolate(flat.float(), size=(cube_size,) * 3, mode="trilinear", align_corners=False)
    return Puzzle(resized.view(b, N_CUBES, *resized.shape[1:]).to(x.dtype), order, rotation)


# ----------------------------------------------------------------------------------------------------------- network
def _head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Two fully connected layers. No BatchNorm: the heads see one row per volume, and a pretraining batch of a few
    volumes gives BatchNorm too noisy a batch statistic (the encoder's BN sees 8 cubes per volume)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class RubikNet(nn.Module):
    """The shared encoder on every cube, then the ordering head (P logits) and the orientation head (8 x 4 logits).

    ``forward(cubes [B, 8, C, s, s, s])`` returns ``(order_logits [B, P], rotation_logits [B, 8, 4], z [B, 8, d])``
    in one call, so DistributedDataParallel sees every parameter used. ``embed`` is the downstream representation.
    """

    def __init__(self, encoder: nn.Module, n_permutations: int = 100, hidden_dim: int = 512) -> None:
        super().__init__()
        dim = getattr(encoder, "feature_dim", None)
        if not isinstance(dim, int):
            raise ValueError("RubikNet needs an encoder with an int `feature_dim` attribute (as Encoder3D has)")
        self.encoder = encoder
        self.n_permutations = int(n_permutations)
        self.order_head = _head(N_CUBES * dim, hidden_dim, self.n_permutations)
        self.rotation_head = _head(N_CUBES * dim, hidden_dim, N_CUBES * N_ROTATIONS)

    def forward(self, cubes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cubes.dim() != 6 or cubes.shape[1] != N_CUBES:
            raise ValueError(f"RubikNet expects [B, 8, C, D, H, W] cubes, got shape {list(cubes.shape)}")
        b = cubes.shape[0]
        z = self.encoder(cubes.flatten(0, 1)).view(b, N_CUBES, -1)
        joint = z.flatten(1)
        return self.order_head(joint), self.rotation_head(joint).view(b, N_CUBES, N_ROTATIONS), z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def rubik_loss(
    order_logits: torch.Tensor,
    rotation_logits: torch.Tensor,
    order: torch.Tensor,
    rotation: torch.Tensor,
    rotation_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ordering CE, orientation CE averaged over the 8 cubes)."""
    l_order = F.cross_entropy(order_logits.float(), order)
    l_rot = F.cross_entropy(rotation_logits.float().reshape(-1, N_ROTATIONS), rotation.reshape(-1))
    return l_order + float(rotation_weight) * l_rot, l_order, l_rot


def pretext_correct(
    order_logits: torch.Tensor, rotation_logits: torch.Tensor, order: torch.Tensor, rotation: torch.Tensor
) -> tuple[int, int]:
    """(volumes whose permutation is predicted right, cubes whose rotation is predicted right)."""
    return int((order_logits.argmax(1) == order).sum()), int((rotation_logits.argmax(-1) == rotation).sum())


@torch.no_grad()
def pretext_accuracy(
    net: RubikNet,
    volumes: torch.Tensor,
    perms: torch.Tensor,
    seed: int = 0,
    cube_size: int = 27,
    gap: float = 0.125,
    batch_size: int = 8,
) -> dict[str, float]:
    """Order and rotation accuracy of ``net`` (eval mode) on fresh puzzles of ``volumes`` [N, C, D, H, W]."""
    was_training = net.training
    net.eval()
    g = torch.Generator().manual_seed(int(seed))
    n_order = n_rot = 0
    device = next(net.parameters()).device
    for part in volumes.split(batch_size):
        pz = make_puzzle(part, perms, g, cube_size, gap)
        o, r, _ = net(pz.cubes.to(device))
        a, b = pretext_correct(o.cpu(), r.cpu(), pz.order, pz.rotation)
        n_order, n_rot = n_order + a, n_rot + b
    net.train(was_training)
    n = volumes.shape[0]
    return {"order_accuracy": n_order / n, "rotation_accuracy": n_rot / (n * N_CUBES)}


# ------------------------------------------------------------------------------------------------------------ trainer
class RubikTrainer(Trainer):
    """Ignite trainer of the Rubik's cube pretext task on batches ``{"image": ROI [B, C, D, H, W]}``.

    A drop-in for ``scripts.pretrain.simsiam_trainer.SimSiamTrainer`` in ``train#trainer``: the same handlers work (checkpoint and
    resume, LR schedule, TensorBoard, ``training_log.json``, encoder export, collapse and kNN monitors). The step's
    output holds ``loss`` and ``z1`` (the cube embeddings, for the collapse monitor); every epoch the training-batch
    pretext accuracies go into ``engine.state.metrics`` as ``rubik/order_accuracy`` and ``rubik/rotation_accuracy``
    (chance: 1/P and 1/4) before the log handlers read them.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        seed: int = 0,
        cube_size: int = 27,
        gap: float = 0.125,
        rotation_weight: float = 1.0,
        image_key: str = "image",
        summary_writer=None,
        balance_mode: str = "none",
    ) -> None:
        if strategy_class(balance_mode) is not NoBalancing:
            raise ValueError(
                f"Rubik's cube pretraining has no RE/SE/bank balancing (balance#mode {balance_mode!r}); "
                "leave balance#mode at 'none' with configs/rubik.json"
            )
        if hasattr(train_data_loader, "__len__") and len(train_data_loader) == 0:
            raise ValueError(
                f"the training loader yields no batch: {len(getattr(train_data_loader, 'dataset', []))} cases < "
                f"batch size {getattr(train_data_loader, 'batch_size', '?')} with drop_last; lower batch_size"
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length or len(train_data_loader),
            non_blocking=non_blocking,
            iteration_update=None,
            handlers=None,
            amp=amp,
            decollate=False,
        )
        self.network, self.optimizer = network, optimizer
        inner = distributed.unwrap(network)
        if not isinstance(inner, RubikNet):
            raise TypeError(f"RubikTrainer trains a scripts.pretrain.rubik.RubikNet, got {type(inner).__name__}")
        self.perms = permutation_set(inner.n_permutations)
        self.seed, self.cube_size, self.gap = int(seed), int(cube_size), float(gap)
        self.rotation_weight, self.image_key, self.summary_writer = float(rotation_weight), image_key, summary_writer
        self.amp = as_bool(amp, "amp") and torch.device(device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self._counts = np.zeros(4, dtype=np.int64)  # order right, volumes, rotation right, cubes
        self.add_event_handler(Events.EPOCH_STARTED, lambda e: self._counts.fill(0))
        self.add_event_handler(Events.EPOCH_COMPLETED, self._log_accuracy)  # before the handlers that log metrics
        if train_handlers:
            self._register_handlers(train_handlers)

    def run(self) -> None:  # keep our own GradScaler (checkpointed) instead of Trainer.run's fresh one
        Workflow.run(self)

    def _generator(self, engine: Trainer) -> torch.Generator:
        """Puzzle randomness from (seed, rank, iteration) only: resume-exact, different on every DDP rank."""
        return torch.Generator().manual_seed(
            self.seed * 1_000_003 + 7_919 * distributed.rank() + int(engine.state.iteration)
        )

    def _log_accuracy(self, engine: Trainer) -> None:
        counts = self._counts.copy()
        if distributed.world_size() > 1:
            counts = (
                distributed.all_gather_rows(torch.tensor(counts[None], dtype=torch.float64, device=engine.state.device))
                .sum(0)
                .cpu()
                .numpy()
            )
        if counts[1] == 0:
            return
        metrics = {"rubik/order_accuracy": counts[0] / counts[1], "rubik/rotation_accuracy": counts[2] / counts[3]}
        engine.state.metrics.update({k: float(v) for k, v in metrics.items()})
        logger.info(
            "epoch %d pretext accuracy: order %.3f (chance %.3f), rotation %.3f (chance %.3f)",
            engine.state.epoch, metrics["rubik/order_accuracy"], 1 / len(self.perms),
            metrics["rubik/rotation_accuracy"], 1 / N_ROTATIONS,
        )  # fmt: skip
        if self.summary_writer is not None and distributed.is_rank0():
            for k, v in metrics.items():
                self.summary_writer.add_scalar(k, float(v), engine.state.epoch)

    def _iteration(self, engine: Trainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("empty batch from the data loader")
        x = batchdata[self.image_key]
        x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
        puzzle = make_puzzle(x.float().cpu(), self.perms, self._generator(engine), self.cube_size, self.gap)
        dev = engine.state.device
        cubes = puzzle.cubes.to(dev, non_blocking=self.non_blocking)
        order, rotation = puzzle.order.to(dev), puzzle.rotation.to(dev)
        self.network.train()
        with torch.autocast(device_type=torch.device(dev).type, enabled=self.amp):
            order_logits, rotation_logits, z = self.network(cubes)
        loss, l_order, l_rot = rubik_loss(order_logits, rotation_logits, order, rotation, self.rotation_weight)
        check_finite(loss, f"epoch {engine.state.epoch} iteration {engine.state.iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n_order, n_rot = pretext_correct(order_logits.detach(), rotation_logits.detach(), order, rotation)
        self._counts += np.array([n_order, order.numel(), n_rot, rotation.numel()])
        out = {
            "loss": loss.detach(),
            "loss_order": l_order.detach(),
            "loss_rotation": l_rot.detach(),
            "z1": z.detach().float().flatten(0, 1),
        }
        engine.state.output = out
        return out
