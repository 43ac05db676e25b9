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
    ``{"image": view 1, "image_2": view 2}`` (None when the trainer was given no view transform; with
    ``augmentation#device`` the views are made on ``device``, from the step's seeded generator)."""

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


SE_SOURCES = ("forward", "bank")


@dataclass
class BalanceSettings:
    """The ``balance`` settings of ``configs/train.json``; each strategy reads the ones it needs.

    ``mode``: none | re | se (paper Section 2) | bank (``scripts.pretrain.bank``). SE's candidate batch is
    N = k * q originals and it trains on m of them. ``re_embeddings``: "views" reuses the step's own z (mean of the
    two views, no extra forward pass); "original" is the paper-exact variant: an extra no-grad forward pass on the
    un-augmented volumes. Bank mode re-clusters its memory bank every ``recluster_every`` epochs after the warm-up
    (k, or the best silhouette in ``k_range``) and its ``ClusterBalancedSampler`` (``bank_sampling``: even |
    inverse) composes the batches. SE's ``se_source``: "forward" (the paper: every step embeds its k*q candidates)
    or "bank" (a candidate's stored embedding is reused until it is ``se_max_age`` epochs old; ``StoredEmbeddings``).
    ``labels`` ({case id: label}) are used for the logged diagnostics only, never
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
    se_source: str = "forward"
    se_max_age: int = 1

    def __post_init__(self) -> None:
        self.mode = canonical_mode(self.mode)
        if self.bank_sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"bank_sampling must be one of {SAMPLING_STRATEGIES}, got {self.bank_sampling!r}")
        if int(self.recluster_every) < 1:
            raise ValueError(f"recluster_every must be >= 1, got {self.recluster_every}")
        if self.re_embeddings not in ("views", "original"):
            raise ValueError(f"re_embeddings must be 'views' or 'original', got {self.re_embeddings!r}")
        if self.se_source not in SE_SOURCES:
            raise ValueError(f"se_source must be one of {SE_SOURCES}, got {self.se_source!r}")
        if int(self.se_max_age) < 1:
            raise ValueError(f"se_max_age must be >= 1 epoch, got {self.se_max_age}")


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


class StoredEmbeddings:
    """Eval-mode embeddings of un-augmented cases kept by case id with the epoch they were computed in: SE's
    ``se_source: bank``. A candidate is embedded again only when it has none yet or its embedding is ``max_age``
    epochs old, so each case costs about one no-grad forward pass per ``max_age`` epochs instead of one per draw
    (SE draws every case k*q / batch_size = 5 times an epoch with the paper's settings). The stored embeddings are
    the ones the paper's SE computes (current encoder, eval mode, un-augmented volume), only up to an epoch older.
    Checkpointed (``state_dict``), so a resumed run selects as an uninterrupted one."""

    def __init__(self, ids: list[str], dim: int, max_age: int = 1) -> None:
        self.row = {str(i): r for r, i in enumerate(ids)}
        self.z = torch.zeros(len(self.row), int(dim))
        self.epoch_of = torch.full((len(self.row),), -1, dtype=torch.long)
        self.max_age = int(max_age)
        self.forwards = 0  # volumes embedded since the start (the overhead this source saves)

    def stale(self, ids: list[str], epoch: int) -> torch.Tensor:
        rows = torch.tensor([self._row(i) for i in ids], dtype=torch.long)
        age = epoch - self.epoch_of[rows]
        return (self.epoch_of[rows] < 0) | (age >= self.max_age)

    def _row(self, case: str) -> int:
        if str(case) not in self.row:
            raise KeyError(f"SE embedding store: case {case!r} is not in the training datalist")
        return self.row[str(case)]

    def lookup(self, ctx: StepContext, ids: list[str], x_local: torch.Tensor, chunk: int) -> torch.Tensor:
        """Embeddings [len(ids), D] of the global candidates ``ids`` (this rank's volumes ``x_local`` are rows
        ``rank * n .. rank * n + n - 1``), embedding the stale ones first."""
        stale = self.stale(ids, ctx.epoch)
        n = x_local.shape[0]
        mine = stale[distributed.rank() * n : (distributed.rank() + 1) * n]
        counts = distributed.all_gather_list([int(mine.sum())])
        if max(counts) > 0:
            local = x_local[mine] if bool(mine.any()) else x_local[:0]
            pad = max(counts) - local.shape[0]  # equal shapes for the gather: pad with this rank's first volume
            if pad:
                local = torch.cat([local, x_local[:1].expand(pad, *x_local.shape[1:])])
            z = ctx.embed(local.to(ctx.device), chunk).cpu()
            per_rank = z.shape[0] // len(counts)
            fresh = torch.cat([z[r * per_rank : r * per_rank + c] for r, c in enumerate(counts)])
            rows = torch.tensor([self._row(i) for i, s in zip(ids, stale.tolist()) if s], dtype=torch.long)
            self.z[rows] = fresh.float()
            self.epoch_of[rows] = int(ctx.epoch)
            self.forwards += int(fresh.shape[0])
        return self.z[torch.tensor([self._row(i) for i in ids], dtype=torch.long)]

    def state_dict(self) -> dict:
        return {"z": self.z.clone(), "epoch_of": self.epoch_of.clone(), "forwards": self.forwards}

    def load_state_dict(self, state: dict) -> None:
        if state["z"].shape != self.z.shape:
            raise ValueError(
                f"SE embedding store in the checkpoint has shape {tuple(state['z'].shape)} but this cohort needs "
                f"{tuple(self.z.shape)}: the checkpoint was made with a different training datalist"
            )
        self.z, self.epoch_of, self.forwards = state["z"].clone(), state["epoch_of"].clone(), int(state["forwards"])


@register("se")
class ResampleStrategy(Strategy):
    """SE: the loader draws k*q un-augmented candidates; the step clusters them, keeps m (half near each of the two
    farthest clusters) and only then augments those m into two views.

    Under DDP the candidates of all ranks form one global batch of k*q; the m selected volumes are shared out
    evenly (m / world per rank), so the trained batch is the paper's m whatever the number of processes."""

    batch_names = ("se_batch", "random_batch")

    def __init__(self, settings: BalanceSettings | None = None, store: StoredEmbeddings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        if s.m > s.k * s.q:
            raise ValueError(f"SE needs m <= k*q candidates, got m={s.m}, k*q={s.k * s.q}")
        distributed.per_rank(s.m, what="SE batch m")
        if s.se_source == "bank" and store is None:
            raise ValueError("SE with se_source 'bank' needs the training case ids (make_strategy(case_ids=...))")
        self.store = store if s.se_source == "bank" else None

    @classmethod
    def build(cls, settings: BalanceSettings, case_ids: list[str] | None = None, dim: int = 256) -> ResampleStrategy:
        store = StoredEmbeddings(case_ids or [], dim, settings.se_max_age) if settings.se_source == "bank" else None
        return cls(settings, store)

    def checkpoint_objects(self) -> dict:
        return {"se_store": self} if self.store is not None else {}

    def state_dict(self) -> dict:
        return self.store.state_dict() if self.store is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.store is not None:
            self.store.load_state_dict(state)

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
            if self.store is not None:
                before = self.store.forwards
                emb = self.store.lookup(ctx, ids, x0, m).to(ctx.device)
                self.record("se_embedded", (self.store.forwards - before) / max(len(ids), 1))
            else:
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

    def diagnostics(self) -> dict[str, float]:
        """Adds, with ``se_source: bank``, the share of the candidates embedded anew in the epoch's steps (1.0 is
        the paper's SE, which embeds every candidate of every step)."""
        metrics = super().diagnostics()
        if self._diag.get("se_embedded"):
            metrics["balance/se_embedded_share"] = float(np.mean(self._diag["se_embedded"]))
        return metrics


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
