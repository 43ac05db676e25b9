"""Rubik's cube pretraining (Zhuang et al., MICCAI 2019; the paper's reference 25, Table 2's proxy-task row).

The ROI is cut into a 2x2x2 grid of sub-cubes; the cubes are shuffled by one permutation of a fixed set and each
cube is rotated. The network (the bundle's ``Encoder3D`` on every cube, weights shared) predicts which permutation
was applied ("cube ordering") and how each cube was rotated ("cube orientation").

Choices, where the paper leaves room or our setting differs:

* **Permutation set**: ``n_permutations`` (8) permutations of the 8 cubes chosen greedily for maximal minimal
  Hamming distance (Noroozi & Favaro's algorithm, which Zhuang et al. use), deterministically: it starts from the
  identity and breaks ties by the lowest lexicographic index, so every run and every machine gets the same set. By
  default (``rotation_distinct``) the greedy choice only admits permutations whose slots differ from every chosen
  one in the parity of at least one cell: a 180-degree turn of a cube moves its inner corner to a cell of the same
  parity, and a lesion-centred ROI has no preferred orientation, so without this rule the set holds puzzles that
  are identical up to per-cube turns (the plain greedy set's rows 1-7 are the identity XOR a constant; rows 3, 5
  and 6 are the whole volume turned by 180 degrees) and the order cannot be told from the cubes (measured: the
  plain 100-permutation set stays at chance).
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
* **Heads**: the ordering head (two fully connected layers) reads the 8 cube embeddings concatenated in slot
  order, as Zhuang's shared-weight Siamese branches feed fully connected layers. The orientation head is one
  two-layer MLP shared by the slots, reading a cube's embedding and the ordering head's belief of the cube's cell
  (softmax over permutations through the permutation table): a turn is only defined relative to the cell the cube
  came from. Loss = CE(order) + ``rotation_weight`` * mean CE(rotation). Only the encoder is exported
  (``models/model.pt``, flat keys).
* **Rotation warm-up** (``rotation_warmup_epochs``): the share of turned cubes rises linearly from 0 to Zhuang's
  uniform draw. With every cube turned from the first step, neither label has a first-order cue in one cube (where
  the lesion centre sits in a cube is cell XOR turn, independent of each alone), so gradient descent from random
  weights sees no signal (measured: order and rotation at chance); unturned cubes first teach the encoder where each
  cube came from. Accuracy is logged on full-difficulty puzzles.

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
from monai.engines import Trainer
from torch import nn

from scripts import distributed
from scripts.pretrain.losses import check_finite
from scripts.pretrain.step import optimizer_step, plain_tensor
from scripts.pretrain.strategies import NoBalancing, strategy_class
from scripts.pretrain.trainer import PretrainTrainer

logger = logging.getLogger(__name__)

N_CUBES = 8  # a 2x2x2 grid
N_ROTATIONS = 4  # identity, 180 degrees about D, about H, about W
# spatial dims (of a [..., D, H, W] tensor, counted from the end) flipped by each rotation class
_FLIPS = {0: (), 1: (-2, -1), 2: (-3, -1), 3: (-3, -2)}
_CELLS = tuple(itertools.product((0, 1), repeat=3))  # grid position of cube i, (d, h, w) in C order


# ------------------------------------------------------------------------------------------------------ permutations
def cell_parity(cells: torch.Tensor | np.ndarray):
    """Parity (d + h + w mod 2) of grid cells given by their index 0..7 (C order, as ``_CELLS``)."""
    return (cells ^ (cells >> 1) ^ (cells >> 2)) & 1


@lru_cache(maxsize=16)
def _permutation_set(n: int, rotation_distinct: bool) -> tuple[tuple[int, ...], ...]:
    every = np.asarray(list(itertools.permutations(range(N_CUBES))), dtype=np.int8)  # 40320 x 8, lexicographic
    # parity pattern of each permutation: which slots show an even cell (a bit per slot)
    pattern = (cell_parity(every) * (1 << np.arange(N_CUBES))).sum(1)
    allowed = np.ones(len(every), dtype=bool)
    chosen = [0]  # the identity
    min_dist = (every != every[0]).sum(1)
    for _ in range(n - 1):
        if rotation_distinct:
            allowed &= pattern != pattern[chosen[-1]]
        nxt = int(np.argmax(np.where(allowed, min_dist, -1)))  # first index among ties: deterministic
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, (every != every[nxt]).sum(1))
    return tuple(tuple(int(v) for v in every[i]) for i in chosen)


MAX_ROTATION_DISTINCT = 70  # C(8, 4) parity patterns: 4 even and 4 odd cells over 8 slots


def permutation_set(n: int, rotation_distinct: bool = True) -> torch.Tensor:
    """``[n, 8]`` long tensor: ``n`` permutations of the 8 cubes with maximal minimal Hamming distance (greedy).

    Row ``p`` lists, for every slot, the grid cell whose cube is shown there. Row 0 is the identity.

    ``rotation_distinct`` (default) keeps only permutations that stay distinguishable after the cubes are turned:
    a 180-degree turn of the cube of cell ``c`` puts its inner corner (the one at the ROI centre) where the cube of
    cell ``c XOR flips`` has it, with an even number of flipped axes, i.e. a cell of the same parity. On an ROI
    centred on a lesion, with no preferred orientation, that corner is all a cube tells about its cell, so two
    permutations that put even cells in the same slots are the same puzzle up to per-cube turns (e.g. the plain
    greedy set's 2nd-8th rows are the identity turned as a whole). At most one permutation per parity pattern is
    kept (70 patterns), which makes the order recoverable from what every cube shows.
    """
    n = int(n)
    top = MAX_ROTATION_DISTINCT if rotation_distinct else 40320
    if not 2 <= n <= top:
        raise ValueError(
            f"n_permutations must be in [2, {top}] "
            + ("(one per parity pattern of the 8 slots)" if rotation_distinct else "(8! permutations of 8 cubes)")
            + f", got {n}"
        )
    return torch.tensor(_permutation_set(n, bool(rotation_distinct)), dtype=torch.long)


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
    x: torch.Tensor,
    perms: torch.Tensor,
    generator: torch.Generator,
    cube_size: int = 27,
    gap: float = 0.125,
    rotation_prob: float = 1.0,
) -> Puzzle:
    """Cut every volume of ``x`` [B, C, D, H, W] into a 2x2x2 grid, shuffle and rotate the cubes.

    Each grid cell of ``(D//2, H//2, W//2)`` voxels gives one cube of ``round(cell * (1 - gap))`` voxels per side at
    a random offset inside the cell; after rotation it is resized (trilinear) to ``cube_size``^3. Each cube's
    rotation class is uniform over the 4 (Zhuang's task) with probability ``rotation_prob``, else the identity (the
    trainer's warm-up). All random draws come from ``generator`` (CPU), in a fixed order whatever ``rotation_prob``,
    so the same generator state gives the same puzzle.
    """
    if x.dim() != 5:
        raise ValueError(f"make_puzzle expects a [B, C, D, H, W] batch, got shape {list(x.shape)}")
    if not 0.0 <= gap < 1.0:
        raise ValueError(f"gap must be in [0, 1), got {gap}")
    if not 0.0 <= rotation_prob <= 1.0:
        raise ValueError(f"rotation_prob must be in [0, 1], got {rotation_prob}")
    cell = [s // 2 for s in x.shape[2:]]
    size = [max(1, round(c * (1.0 - gap))) for c in cell]
    if min(cell) < 2:
        raise ValueError(f"ROI {list(x.shape[2:])} is too small for a 2x2x2 grid of cubes")
    b = x.shape[0]
    order = torch.randint(len(perms), (b,), generator=generator)
    rotation = torch.randint(N_ROTATIONS, (b, N_CUBES), generator=generator)
    turned = torch.rand((b, N_CUBES), generator=generator) < float(rotation_prob)
    rotation = torch.where(turned, rotation, torch.zeros_like(rotation))
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
    ``n_permutations`` and ``rotation_distinct`` name the fixed permutation set (:func:`permutation_set`).

    The ordering head reads the 8 cube embeddings concatenated in slot order. The orientation head is one small MLP
    shared by the slots: it reads a cube's own embedding and the ordering head's belief of which cell that cube came
    from (the softmax over permutations mapped through the permutation table), because a cube's turn is only defined
    relative to its cell: on an orientation-free ROI, "cell c turned by 180 degrees" and "cell c XOR flips, not
    turned" look alike, so the turn cannot be read from the cube alone.
    """

    def __init__(
        self, encoder: nn.Module, n_permutations: int = 8, hidden_dim: int = 512, rotation_distinct: bool = True
    ) -> None:
        super().__init__()
        dim = getattr(encoder, "feature_dim", None)
        if not isinstance(dim, int):
            raise ValueError("RubikNet needs an encoder with an int `feature_dim` attribute (as Encoder3D has)")
        self.encoder = encoder
        self.n_permutations = int(n_permutations)
        self.rotation_distinct = bool(rotation_distinct)
        self.channels_last = False  # the trainer turns it on (oneDNN's fast NDHWC 3D convolutions on CPU)
        perms = permutation_set(self.n_permutations, self.rotation_distinct)  # refuses a bad size here
        # [P, slot, cell] one-hot: which cell each permutation shows in each slot (not a parameter, not saved)
        self.register_buffer("slot_cells", F.one_hot(perms, N_CUBES).float(), persistent=False)
        self.order_head = _head(N_CUBES * dim, hidden_dim, self.n_permutations)
        self.rotation_head = _head(dim + N_CUBES, hidden_dim, N_ROTATIONS)

    def forward(self, cubes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if cubes.dim() != 6 or cubes.shape[1] != N_CUBES:
            raise ValueError(f"RubikNet expects [B, 8, C, D, H, W] cubes, got shape {list(cubes.shape)}")
        b = cubes.shape[0]
        flat = cubes.flatten(0, 1)
        if self.channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last_3d)
        z = self.encoder(flat).view(b, N_CUBES, -1)
        order_logits = self.order_head(z.flatten(1))
        cell_belief = torch.einsum("bp,psc->bsc", order_logits.float().softmax(1), self.slot_cells)  # [B, 8, 8]
        rotation_logits = self.rotation_head(torch.cat([z, cell_belief.to(z.dtype)], dim=2))
        return order_logits, rotation_logits, z

    def permutations(self) -> torch.Tensor:
        return permutation_set(self.n_permutations, self.rotation_distinct)

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
def pretext_counts(
    net: nn.Module,
    volumes: torch.Tensor,
    perms: torch.Tensor,
    generator: torch.Generator,
    cube_size: int = 27,
    gap: float = 0.125,
    batch_size: int = 8,
) -> tuple[int, int]:
    """(right orders, right rotations) of ``net`` in eval mode on fresh full-difficulty puzzles of ``volumes``."""
    was_training = net.training
    net.eval()
    n_order = n_rot = 0
    device = next(net.parameters()).device
    try:
        for part in volumes.split(batch_size):
            pz = make_puzzle(part.float().cpu(), perms, generator, cube_size, gap)
            o, r, _ = net(pz.cubes.to(device))
            a, b = pretext_correct(o.cpu(), r.cpu(), pz.order, pz.rotation)
            n_order, n_rot = n_order + a, n_rot + b
    finally:
        net.train(was_training)
    return n_order, n_rot


def pretext_accuracy(
    net: RubikNet,
    volumes: torch.Tensor,
    perms: torch.Tensor,
    seed: int = 0,
    cube_size: int = 27,
    gap: float = 0.125,
    batch_size: int = 8,
) -> dict[str, float]:
    """Order and rotation accuracy of ``net`` (eval mode) on fresh puzzles of ``volumes`` [N, C, D, H, W]
    (chance: ``1 / len(perms)`` and 1/4)."""
    g = torch.Generator().manual_seed(int(seed))
    n_order, n_rot = pretext_counts(net, volumes, perms, g, cube_size, gap, batch_size)
    n = volumes.shape[0]
    return {"order_accuracy": n_order / n, "rotation_accuracy": n_rot / (n * N_CUBES)}


# ------------------------------------------------------------------------------------------------------------ trainer
class RubikTrainer(PretrainTrainer):
    """Ignite trainer of the Rubik's cube pretext task on batches ``{"image": ROI [B, C, D, H, W]}``.

    Device, epochs, loader, network, optimiser, AMP, layout and compile are ``PretrainTrainer``'s arguments
    (``trainer_args``); the others are the puzzle's.

    A drop-in for ``scripts.pretrain.simsiam_trainer.SimSiamTrainer`` in ``train#trainer``: the same handlers work (checkpoint and
    resume, LR schedule, TensorBoard, ``training_log.json``, encoder export, collapse and kNN monitors). The step's
    output holds ``loss`` and ``z1`` (the cube embeddings, for the collapse monitor).

    ``rotation_warmup_epochs``: the share of turned cubes rises linearly from 0 to Zhuang's uniform draw over these
    epochs (see the module docstring for why). Every epoch, before the log handlers read ``engine.state.metrics``:
    ``rubik/order_accuracy`` and ``rubik/rotation_accuracy`` on fresh full-difficulty puzzles (every cube's rotation
    drawn uniformly) of up to ``eval_volumes`` of the epoch's training volumes, network in eval mode (chance: 1/P
    and 1/4); ``rubik/train_order_accuracy``, ``rubik/train_rotation_accuracy`` on the training puzzles as drawn
    (easier during the warm-up) and ``rubik/rotation_prob``, the share of cubes turned in the epoch's last step.
    """

    def __init__(
        self,
        *,
        train_handlers: Sequence | None = None,
        seed: int = 0,
        cube_size: int = 27,
        gap: float = 0.125,
        rotation_weight: float = 1.0,
        rotation_warmup_epochs: float = 0.0,
        eval_volumes: int = 24,
        image_key: str = "image",
        summary_writer=None,
        balance_mode: str = "none",
        **trainer_args,
    ) -> None:
        if strategy_class(balance_mode) is not NoBalancing:
            raise ValueError(
                f"Rubik's cube pretraining has no RE/SE/bank balancing (balance#mode {balance_mode!r}); "
                "leave balance#mode at 'none' with configs/rubik.json"
            )
        if float(rotation_warmup_epochs) < 0 or int(eval_volumes) < 0:
            raise ValueError(
                f"rotation_warmup_epochs ({rotation_warmup_epochs}) and eval_volumes ({eval_volumes}) must be >= 0"
            )
        super().__init__(**trainer_args)
        inner = distributed.unwrap(self.network)
        if not isinstance(inner, RubikNet):
            raise TypeError(f"RubikTrainer trains a scripts.pretrain.rubik.RubikNet, got {type(inner).__name__}")
        self.perms = inner.permutations()
        self.seed, self.cube_size, self.gap = int(seed), int(cube_size), float(gap)
        self.rotation_weight, self.image_key, self.summary_writer = float(rotation_weight), image_key, summary_writer
        self.rotation_warmup_epochs, self.eval_volumes = float(rotation_warmup_epochs), int(eval_volumes)
        inner.channels_last = self.channels_last  # the cubes are flattened inside the network
        self._counts = np.zeros(4, dtype=np.int64)  # order right, volumes, rotation right, cubes
        self._held: list[torch.Tensor] = []  # this epoch's first training volumes, for the full-difficulty check
        self._rotation_prob = 1.0
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._log_accuracy)  # before the handlers that log metrics
        if train_handlers:
            self._register_handlers(train_handlers)

    def _reset_epoch(self, engine: Trainer) -> None:
        self._counts.fill(0)
        self._held = []

    def _generator(self, engine: Trainer, salt: int = 0) -> torch.Generator:
        """Puzzle randomness from (seed, rank, iteration) only: resume-exact, different on every DDP rank."""
        return torch.Generator().manual_seed(
            self.seed * 1_000_003 + 7_919 * distributed.rank() + int(engine.state.iteration) + salt
        )

    def rotation_prob(self, iteration: int) -> float:
        """Share of turned cubes at (1-based) ``iteration``: 0 at the start, 1 (Zhuang's task) after the warm-up."""
        ramp = self.rotation_warmup_epochs * int(self.state.epoch_length or 1)
        return 1.0 if ramp <= 0 else min(1.0, (int(iteration) - 1) / ramp)

    def _log_accuracy(self, engine: Trainer) -> None:
        held = torch.cat(self._held) if self._held else None
        evaluated = np.zeros(2, dtype=np.int64)
        if held is not None:  # full-difficulty puzzles; the salt keeps them apart from any training puzzle
            evaluated[:] = pretext_counts(
                self.network, held, self.perms, self._generator(engine, salt=500_009), self.cube_size, self.gap
            )
        counts = np.concatenate([self._counts, evaluated, [0 if held is None else len(held)]]).astype(np.float64)
        if distributed.world_size() > 1:
            counts = (
                distributed.all_gather_rows(torch.tensor(counts[None], dtype=torch.float64, device=engine.state.device))
                .sum(0)
                .cpu()
                .numpy()
            )
        if counts[1] == 0:
            return
        metrics = {
            "rubik/train_order_accuracy": counts[0] / counts[1],
            "rubik/train_rotation_accuracy": counts[2] / counts[3],
            "rubik/rotation_prob": self._rotation_prob,
        }
        if counts[6] > 0:
            metrics["rubik/order_accuracy"] = counts[4] / counts[6]
            metrics["rubik/rotation_accuracy"] = counts[5] / (counts[6] * N_CUBES)
        engine.state.metrics.update({k: float(v) for k, v in metrics.items()})
        logger.info(
            "epoch %d pretext accuracy (eval, %d volumes): order %.3f (chance %.3f), rotation %.3f (chance %.3f); "
            "training puzzles (cubes turned: %.2f): order %.3f, rotation %.3f",
            engine.state.epoch, int(counts[6]), metrics.get("rubik/order_accuracy", float("nan")), 1 / len(self.perms),
            metrics.get("rubik/rotation_accuracy", float("nan")), 1 / N_ROTATIONS, self._rotation_prob,
            metrics["rubik/train_order_accuracy"], metrics["rubik/train_rotation_accuracy"],
        )  # fmt: skip
        if self.summary_writer is not None and distributed.is_rank0():
            for k, v in metrics.items():
                self.summary_writer.add_scalar(k, float(v), engine.state.epoch)

    def _iteration(self, engine: Trainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("empty batch from the data loader")
        x = plain_tensor(batchdata[self.image_key]).detach().float().cpu()
        room = self.eval_volumes - sum(len(h) for h in self._held)
        if room > 0:
            self._held.append(x[:room].clone())
        self._rotation_prob = self.rotation_prob(engine.state.iteration)
        puzzle = make_puzzle(x, self.perms, self._generator(engine), self.cube_size, self.gap, self._rotation_prob)
        dev = engine.state.device
        cubes = puzzle.cubes.to(dev, non_blocking=self.non_blocking)
        order, rotation = puzzle.order.to(dev), puzzle.rotation.to(dev)
        self.network.train()
        with self._autocast(dev):
            order_logits, rotation_logits, z = self.network(cubes)
        loss, l_order, l_rot = rubik_loss(order_logits, rotation_logits, order, rotation, self.rotation_weight)
        check_finite(loss, f"epoch {engine.state.epoch} iteration {engine.state.iteration}")
        optimizer_step(loss, self.optimizer, self.scaler)
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
