"""Balancing strategies: one small class per ``balance#mode``, with the hooks the SimSiam trainer calls.

The trainer (``scripts.pretrain.simsiam_trainer``) knows no mode names: it calls the hooks of the strategy the
config built (``make_strategy``, the ``balancing`` id of ``configs/train.json``). The math stays in the pure
modules: RE weights and SE selection in ``scripts.pretrain.balance`` (paper Section 2), the memory bank and its
sampler in ``scripts.pretrain.bank``. Every strategy but ``none`` trains plainly during the warm-up epochs
(``warmup_epochs``) and balances after them.

Hooks, in the order a run meets them (the base class ``Strategy`` has a no-op of each):

- data loading, asked by the config: ``loader_batch_size``, ``loader_transforms``, ``view_copies``, ``sampler``,
  ``checkpoint_objects`` (the state a checkpoint saves, via ``state_dict``/``load_state_dict``);
- training, called by the trainer with a ``StepContext`` (epoch, iteration, device, and two services: embed
  un-augmented volumes with the current encoder, make the two views of a case) and nothing else of the trainer:
  ``attach`` (once), ``epoch_started``, ``before_step`` (the batch the step trains on), ``after_forward`` (the step's
  embeddings), ``weights`` (per-sample loss weights), ``epoch_completed``, ``diagnostics`` (the epoch's
  ``balance/...`` metrics for the training log).

A new strategy subclasses ``Strategy``, overrides the hooks it needs and registers its name with ``@register``;
``--balance#mode <name>`` then selects it and the pipeline's ``--modes`` accepts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from scripts import distributed
from scripts.pretrain.balance import balance_step
from scripts.pretrain.bank import SAMPLING_STRATEGIES, ClusterBalancedSampler, EmbeddingBank
from scripts.pretrain.step import plain_tensor


@dataclass(frozen=True)
class StepContext:
    """All a strategy sees of the trainer (its narrow door): where training stands and the two services it may use.

    ``embed(x, chunk)``: embeddings of un-augmented volumes ``x`` (on ``device``) from the current encoder, eval mode,
    gathered from every rank. ``make_views(case)``: the two random views of one case, ``{"image": x}`` ->
    ``{"image": view 1, "image_2": view 2}`` (None when the trainer was given no view transform)."""

    epoch: int
    iteration: int
    device: torch.device
    embed: Callable[[torch.Tensor, int], torch.Tensor]
    make_views: Callable[[dict], dict] | None = None


STRATEGIES: dict[str, type[Strategy]] = {}
ALIASES = {"plain": "none"}  # the pipeline's run name (and report rows) for 3DSiam without balancing


def register(name: str):
    """Class decorator: make a strategy selectable as ``balance#mode <name>``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        if STRATEGIES.get(name, cls) is not cls or name in ALIASES:
            raise ValueError(f"balance mode {name!r} is taken (by {STRATEGIES.get(name, ALIASES.get(name))})")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return add


def canonical_mode(mode: str) -> str:
    """The registered name of ``mode`` (``plain`` -> ``none``); a clear error for an unknown one."""
    name = ALIASES.get(str(mode), str(mode))
    if name not in STRATEGIES:
        aliases = ", ".join(f"{a} = {n}" for a, n in ALIASES.items())
        raise ValueError(f"balance mode {mode!r} is not one of {tuple(STRATEGIES)} (aliases: {aliases})")
    return name


@dataclass
class BalanceSettings:
    """The ``balance`` settings of ``configs/train.json``; each strategy reads the ones it needs.

    ``mode``: none | re | se (paper Section 2) | bank (``scripts.pretrain.bank``). SE's candidate batch is
    N = k * q originals and it trains on m of them. ``re_embeddings``: "views" reuses the step's own z (mean of the
    two views, no extra forward pass); "original" is the paper-exact variant: an extra no-grad forward pass on the
    un-augmented volumes. Bank mode re-clusters its memory bank every ``recluster_every`` epochs after the warm-up
    (k, or the best silhouette in ``k_range``) and its ``ClusterBalancedSampler`` (``bank_sampling``: even |
    inverse) composes the batches. ``labels`` ({case id: label}) are used for the logged diagnostics only, never
    for the selection, the weights or the sampling."""

    mode: str = "none"
    k: int = 3
    q: int = 10
    m: int = 6
    warmup_epochs: int = 1
    re_embeddings: str = "views"
    seed: int = 0
    labels: dict | None = None
    bank_sampling: str = "even"
    recluster_every: int = 1
    k_range: list[int] | None = None

    def __post_init__(self) -> None:
        self.mode = canonical_mode(self.mode)
        if self.bank_sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"bank_sampling must be one of {SAMPLING_STRATEGIES}, got {self.bank_sampling!r}")
        if int(self.recluster_every) < 1:
            raise ValueError(f"recluster_every must be >= 1, got {self.recluster_every}")
        if self.re_embeddings not in ("views", "original"):
            raise ValueError(f"re_embeddings must be 'views' or 'original', got {self.re_embeddings!r}")


class Strategy:
    """The hooks with their neutral behaviour: every sample once, weight 1, nothing to save or log.

    ``batch_names``: the batches whose labels a strategy records (``record_labels``); the minority share of each
    is logged as ``balance/minority_share_<name>``."""

    name = ""
    batch_names: tuple[str, ...] = ()

    def __init__(self, settings: BalanceSettings | None = None) -> None:
        self.settings = settings or BalanceSettings(mode=self.name or "none")
        self._diag: dict[str, list] = {}

    @classmethod
    def build(cls, settings: BalanceSettings, case_ids: list[str] | None = None, dim: int = 256) -> Strategy:
        """The strategy for ``settings``; ``case_ids`` (the training cases) and ``dim`` (the embedding width) are
        there for strategies that keep per-case state."""
        return cls(settings)

    def active(self, epoch: int) -> bool:
        """Whether the strategy balances in ``epoch`` (1-based): after the warm-up epochs."""
        return epoch > self.settings.warmup_epochs

    def step_seed(self, iteration: int) -> int:
        """k-means++ / SE-fallback seed of one step: steps never share an initialisation, resumes repeat it."""
        return self.settings.seed * 1_000_003 + int(iteration)

    # ---- data loading (asked by the config)
    def loader_batch_size(self, batch_size: int) -> int:
        """Cases per loader batch (before any DDP split)."""
        return batch_size

    def loader_transforms(self, views: list) -> list:
        """The random transforms the loader applies: the two views, unless the step makes them itself."""
        return views

    def view_copies(self) -> list[str]:
        """Keys the loader copies ``image`` into before augmenting: the second view (plus any original kept)."""
        return ["image_2"]

    def sampler(self, batch_size: int, default=None):
        """The loader's sampler (``batch_size`` cases per rank and batch); ``default`` when the strategy does not
        compose the batches itself."""
        return default

    def checkpoint_objects(self) -> dict:
        """Objects the training checkpoint saves and a resume restores, besides network, optimiser and scheduler."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- training (called by the trainer)
    def attach(self, ctx: StepContext) -> None:
        """Called once by the trainer (epoch 0): check that the services the strategy needs are there."""

    def epoch_started(self, ctx: StepContext) -> None:
        self._diag.clear()

    def before_step(self, ctx: StepContext, batch: dict) -> dict:
        """The batch the step trains on (``{"image": view 1, "image_2": view 2, "id": ...}``)."""
        return batch

    def after_forward(self, ctx: StepContext, batch: dict, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Sees the step's projections of the two views (this rank's rows)."""

    def weights(self, ctx: StepContext, batch: dict, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights for this rank's rows; ``None``: equal weights."""
        return None

    def epoch_completed(self, ctx: StepContext) -> None:
        """Runs before the checkpoint of the epoch is saved and before ``diagnostics``."""

    def diagnostics(self) -> dict[str, float]:
        """The epoch's ``balance/...`` metrics: mean cluster sizes, minority share of the cohort and of the recorded
        batches (labels: logging only). Strategies add their own after these."""
        if not self._diag:
            return {}
        metrics = {}
        if self._diag.get("cluster_sizes"):
            k = self.settings.k
            sizes = [sorted(c, reverse=True) + [0] * (k - len(c)) for c in self._diag["cluster_sizes"]]
            for j, v in enumerate(np.mean(sizes, axis=0)):
                metrics[f"balance/cluster_size_{j}"] = float(v)
        all_labels = list((self.settings.labels or {}).values())
        if all_labels:
            minority = _minority(all_labels)
            metrics["balance/minority_share_cohort"] = float(np.mean([str(v) == minority for v in all_labels]))
            for name in self.batch_names:
                if self._diag.get(name):
                    metrics[f"balance/minority_share_{name}"] = float(
                        np.mean([str(v) == minority for v in self._diag[name]])
                    )
        return metrics

    def record(self, name: str, value) -> None:
        self._diag.setdefault(name, []).append(value)

    def record_labels(self, name: str, ids: list) -> None:
        labels = self.settings.labels or {}
        self._diag.setdefault(name, []).extend(labels[i] for i in ids if i in labels)


@register("none")
class NoBalancing(Strategy):
    """3DSiam without balancing (SimSiam as published); ``plain`` is its alias."""

    def active(self, epoch: int) -> bool:
        return False


@register("re")
class ReweightStrategy(Strategy):
    """RE: k-means on the batch's embeddings, each sample weighted by the inverse frequency of its cluster.

    Under DDP the decision is taken on the global batch (rows of all ranks, rank 0's result broadcast) and each
    rank keeps the weights of its own rows."""

    def view_copies(self) -> list[str]:
        return ["image_2", "image_0"] if self.settings.re_embeddings == "original" else ["image_2"]

    def weights(self, ctx: StepContext, batch: dict, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor | None:
        if not self.active(ctx.epoch):
            return None
        if self.settings.re_embeddings == "original":
            emb = ctx.embed(plain_tensor(batch["image_0"]).to(ctx.device), self.settings.m)
        else:
            emb = distributed.all_gather_rows(((z1 + z2) / 2).detach().float())
        res = balance_step(emb, "re", k=self.settings.k, seed=self.step_seed(ctx.iteration))
        weights = distributed.local_rows(distributed.broadcast_from_rank0(res.weights), z1.shape[0]).to(z1.device)
        self.record("cluster_sizes", res.cluster_sizes)
        labels = self.settings.labels or {}
        for case_id, w in zip(batch.get("id", []), weights.tolist()):
            if case_id in labels:
                self.record(f"re_weight_class_{labels[case_id]}", w)
        return weights

    def diagnostics(self) -> dict[str, float]:
        metrics = super().diagnostics()
        for key, vals in self._diag.items():
            if key.startswith("re_weight_class_"):
                metrics[f"balance/mean_{key}"] = float(np.mean(vals))
        return metrics


@register("se")
class ResampleStrategy(Strategy):
    """SE: the loader draws k*q un-augmented candidates; the step clusters them, keeps m (half near each of the two
    farthest clusters) and only then augments those m into two views.

    Under DDP the candidates of all ranks form one global batch of k*q; the m selected volumes are shared out
    evenly (m / world per rank), so the trained batch is the paper's m whatever the number of processes."""

    batch_names = ("se_batch", "random_batch")

    def __init__(self, settings: BalanceSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        if s.m > s.k * s.q:
            raise ValueError(f"SE needs m <= k*q candidates, got m={s.m}, k*q={s.k * s.q}")
        distributed.per_rank(s.m, what="SE batch m")

    def loader_batch_size(self, batch_size: int) -> int:
        return self.settings.k * self.settings.q

    def loader_transforms(self, views: list) -> list:
        return []  # the step augments the m selected candidates (ctx.make_views)

    def attach(self, ctx: StepContext) -> None:
        if ctx.make_views is None:
            raise ValueError("SE mode augments the selected cases inside the step: pass view_transform")

    def before_step(self, ctx: StepContext, batch: dict) -> dict:
        m = self.settings.m
        x0 = plain_tensor(batch["image"])
        ids = distributed.all_gather_list(list(batch.get("id", [])))
        if self.active(ctx.epoch):
            emb = ctx.embed(x0.to(ctx.device), m)
            res = balance_step(emb, "se", k=self.settings.k, m=m, seed=self.step_seed(ctx.iteration))
            chosen = distributed.broadcast_from_rank0(res.indices.to(emb.device)).cpu()
            self.record("cluster_sizes", res.cluster_sizes)
        else:  # warm-up: a random batch of m (the loader already shuffled the candidates)
            chosen = torch.arange(m)
        mine = distributed.rows_for_this_rank(x0.to(ctx.device), chosen.to(ctx.device)).cpu()
        chosen_ids = [ids[i] for i in chosen.tolist()] if ids else []
        self.record_labels("se_batch", chosen_ids)
        self.record_labels("random_batch", ids[:m])
        views = [ctx.make_views({"image": x}) for x in mine]
        share = distributed.per_rank(m, what="SE batch m")
        return {
            "image": torch.stack([plain_tensor(v["image"]) for v in views]),
            "image_2": torch.stack([plain_tensor(v["image_2"]) for v in views]),
            "id": chosen_ids[distributed.rank() * share : (distributed.rank() + 1) * share],
        }


@register("bank")
class BankStrategy(Strategy):
    """Bank (beyond the paper): one embedding per case in a memory bank fed by the steps' own embeddings (no extra
    forward pass), re-clustered on schedule; the loader's ``ClusterBalancedSampler`` composes the batches evenly
    across those clusters. The bank is checkpointed (as ``bank``), so a resumed run samples as an uninterrupted one."""

    batch_names = ("bank_batch",)

    def __init__(self, settings: BalanceSettings, bank: EmbeddingBank) -> None:
        super().__init__(settings)
        self.bank = bank

    @classmethod
    def build(cls, settings: BalanceSettings, case_ids: list[str] | None = None, dim: int = 256) -> BankStrategy:
        return cls(settings, EmbeddingBank(case_ids or [], dim=dim))

    def sampler(self, batch_size: int, default=None) -> ClusterBalancedSampler:
        s = self.settings
        return ClusterBalancedSampler(self.bank, batch_size, strategy=s.bank_sampling, seed=s.seed)

    def checkpoint_objects(self) -> dict:
        return {"bank": self}

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state)

    def after_forward(self, ctx: StepContext, batch: dict, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Store the step's own embeddings (mean of the two views), gathered from every rank."""
        ids = distributed.all_gather_list([str(i) for i in batch.get("id", [])])
        if len(ids) != distributed.world_size() * z1.shape[0]:
            raise ValueError("bank mode needs the case 'id' of every sample in the batch")
        z = (z1.detach().float() + z2.detach().float()) / 2
        self.bank.update(ids, distributed.all_gather_rows(z).cpu())
        self.record_labels("bank_batch", ids)

    def epoch_completed(self, ctx: StepContext) -> None:
        """Re-cluster the whole bank on schedule; rank 0's assignments are broadcast so every rank samples alike."""
        epoch, s, device = int(ctx.epoch), self.settings, ctx.device
        if epoch < s.warmup_epochs or (epoch - s.warmup_epochs) % int(s.recluster_every) != 0:
            return
        if distributed.world_size() > 1:  # every rank gathered the same rows each step, so the banks must agree
            digest = torch.tensor([[float(self.bank.z.double().sum()), float(self.bank.seen.sum()), self.bank.updates]])
            rows = distributed.all_gather_rows(digest.to(device, torch.float64)).cpu()
            if not bool((rows == rows[0]).all()):
                raise RuntimeError(f"memory banks differ across ranks at epoch {epoch}: {rows.tolist()}")
        result = self.bank.recluster(s.k, seed=s.seed * 1_000_003 + epoch, k_range=s.k_range)
        a = distributed.broadcast_from_rank0(self.bank.assignments.to(device)).cpu()
        self.bank.assignments = a
        self._diag["bank_k"] = [result.k]
        self._diag["bank_cluster_sizes"] = [sorted(result.sizes, reverse=True)]
        labels = s.labels or {}
        known = [(labels[i], int(c)) for i, c in zip(self.bank.ids, a.tolist()) if i in labels and c >= 0]
        if known:
            from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

            y, c = [str(v) for v, _ in known], [c for _, c in known]
            self._diag["bank_ari"] = [adjusted_rand_score(y, c)]
            self._diag["bank_nmi"] = [normalized_mutual_info_score(y, c)]
            minority = _minority(list(labels.values()))
            order = sorted(set(c), key=lambda j: -c.count(j))
            self._diag["bank_minority_share_by_cluster"] = [
                [float(np.mean([lab == minority for lab, cj in zip(y, c) if cj == j])) for j in order]
            ]

    def diagnostics(self) -> dict[str, float]:
        metrics = super().diagnostics()
        for name in ("bank_k", "bank_ari", "bank_nmi"):
            if self._diag.get(name):
                metrics[f"balance/{name}"] = float(self._diag[name][-1])
        for key in ("bank_cluster_sizes", "bank_minority_share_by_cluster"):
            for j, v in enumerate(self._diag.get(key, [[]])[-1]):
                metrics[f"balance/{key.replace('sizes', 'size')}_{j}"] = float(v)
        return metrics


def modes() -> tuple[str, ...]:
    """Every selectable ``balance#mode``, in registration order (their aliases: ``ALIASES``)."""
    return tuple(STRATEGIES)


def strategy_class(mode: str) -> type[Strategy]:
    """The class registered for ``mode`` (or its alias)."""
    return STRATEGIES[canonical_mode(mode)]


def make_strategy(mode: str = "none", case_ids: list[str] | None = None, dim: int = 256, **settings) -> Strategy:
    """The strategy of ``balance#mode`` built from the ``balance`` settings (``configs/train.json``'s ``balancing``).

    ``settings``: the other ``BalanceSettings`` fields; ``case_ids``: the training cases (the bank keeps one row per
    case); ``dim``: the embedding width."""
    config = BalanceSettings(mode=mode, **settings)
    return STRATEGIES[config.mode].build(config, case_ids=case_ids, dim=dim)


def _minority(labels: list) -> str:
    """The least frequent label (as a string), for the minority-share diagnostics."""
    values, counts = np.unique([str(v) for v in labels], return_counts=True)
    return str(values[counts.argmin()])
