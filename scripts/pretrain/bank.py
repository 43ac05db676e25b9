"""Dataset-level cluster-balanced sampling (``balance#mode bank``), an alternative to the paper's per-batch RE/SE.

Why: SE clusters 30 fresh candidates every step. Early in training those small clusters do not follow phenotypes,
and the candidates' extra forward pass costs more than the step it feeds. Here every training case keeps one
embedding in a memory bank, taken from the embeddings the training step computes anyway (the mean of the two
views' ``z``; no extra forward pass). The whole bank is re-clustered on a schedule (every epoch by default) with the
RE/SE k-means, and the sampler composes each batch evenly across those dataset-level clusters.

Plain PyTorch (scikit-learn only for the optional silhouette choice of k); no Ignite, no config dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scripts.pretrain.balance import cluster_sizes, kmeans

SAMPLING_STRATEGIES = ("even", "inverse")


@dataclass(frozen=True)
class BankClustering:
    """Outcome of :meth:`EmbeddingBank.recluster`: ``k`` used (chosen by silhouette when a range was given),
    ``sizes`` of the clusters over the cases seen so far, ``silhouette`` per tried k (empty without a range)."""

    k: int
    sizes: list[int]
    silhouette: dict[int, float]


class EmbeddingBank:
    """One L2-normalised embedding per training case, keyed by case id, plus the latest cluster of each case.

    Embeddings are normalised because SimSiam's loss is a cosine: the encoder learns directions, while raw norms
    drift during training and would dominate Euclidean k-means. ``assignments`` is -1 for cases not clustered yet
    (never seen in a step). ``state_dict``/``load_state_dict`` put the bank in the training checkpoint, so a
    resumed run samples exactly as an uninterrupted one.
    """

    def __init__(self, ids: Sequence[str], dim: int = 256) -> None:
        self.ids = [str(i) for i in ids]
        if not self.ids:
            raise ValueError("memory bank: the training datalist has no cases")
        self.row = {case: r for r, case in enumerate(self.ids)}
        if len(self.row) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ValueError(f"memory bank: duplicate case ids {dup[:10]}")
        self.z = torch.zeros(len(self.ids), int(dim))
        self.seen = torch.zeros(len(self.ids), dtype=torch.bool)
        self.assignments = torch.full((len(self.ids),), -1, dtype=torch.long)
        self.updates = 0

    def __len__(self) -> int:
        return len(self.ids)

    def update(self, ids: Sequence[str], z: torch.Tensor) -> None:
        """Store the (detached) embeddings ``z`` [B, D] of the cases ``ids``; a later update of a case wins."""
        unknown = [i for i in ids if str(i) not in self.row]
        if unknown:
            raise KeyError(f"memory bank: case(s) {unknown[:10]} are not in the training datalist")
        if z.shape != (len(ids), self.z.shape[1]):
            raise ValueError(
                f"memory bank: expected embeddings of shape ({len(ids)}, {self.z.shape[1]}), got {tuple(z.shape)}"
            )
        rows = torch.tensor([self.row[str(i)] for i in ids], dtype=torch.long)
        self.z[rows] = torch.nn.functional.normalize(z.detach().float().cpu(), dim=1)
        self.seen[rows] = True
        self.updates += 1

    def recluster(self, k: int = 3, seed: int = 0, k_range: Sequence[int] | None = None) -> BankClustering:
        """k-means (the RE/SE one) over the cases seen so far; unseen cases keep assignment -1.

        With ``k_range`` (e.g. ``[2, 6]``, inclusive) k is the one with the highest silhouette score among those
        the seen cases allow (a silhouette needs 2 <= k < number of cases); ``k`` is the fallback.
        """
        x = self.z[self.seen]
        if x.shape[0] == 0:
            raise RuntimeError("memory bank: no embeddings yet; re-cluster only after at least one training step")
        scores: dict[int, float] = {}
        if k_range:
            scores = silhouette_by_k(x, range(int(k_range[0]), int(k_range[-1]) + 1), seed)
            if scores:
                k = max(scores, key=scores.get)
        result = kmeans(x, int(k), seed=seed)
        assignments = torch.full_like(self.assignments, -1)
        assignments[self.seen] = result.assignments.cpu().long()
        self.assignments = assignments
        k_eff = int(result.centroids.shape[0])
        return BankClustering(k=k_eff, sizes=cluster_sizes(result.assignments, k_eff), silhouette=scores)

    def state_dict(self) -> dict:
        return {
            "z": self.z.clone(),
            "seen": self.seen.clone(),
            "assignments": self.assignments.clone(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["z"].shape != self.z.shape:
            raise ValueError(
                f"memory bank in the checkpoint has shape {tuple(state['z'].shape)} but this cohort needs "
                f"{tuple(self.z.shape)}: the checkpoint was made with a different training datalist"
            )
        self.z, self.seen = state["z"].clone(), state["seen"].clone()
        self.assignments, self.updates = state["assignments"].clone(), int(state["updates"])


def silhouette_by_k(x: torch.Tensor, ks: Sequence[int], seed: int = 0) -> dict[int, float]:
    """Silhouette score of k-means with each k in ``ks`` (those the data allow), for choosing k without labels."""
    from sklearn.metrics import silhouette_score

    xs = x.double().numpy()
    scores = {}
    for k in ks:
        if not 2 <= k < x.shape[0]:
            continue
        a = kmeans(x, k, seed=seed).assignments.numpy()
        if len(set(a.tolist())) >= 2:
            scores[int(k)] = float(silhouette_score(xs, a))
    return scores


class ClusterBalancedSampler(torch.utils.data.Sampler):
    """Dataset indices for batches composed evenly across the bank's clusters (a ``DataLoader`` ``sampler``).

    Until the bank has been clustered (the warm-up) it is a plain seeded shuffle. Afterwards, each global batch of
    ``batch_size * world_size`` slots is shared out across the clusters:

    - ``even``: ``slots // K`` per cluster, the remainder to randomly chosen clusters. Within a cluster, cases are
      drawn in a shuffled order that restarts (reshuffled) when exhausted, so every member is used before any is
      reused; minority cases are therefore repeated within an epoch (sampling with replacement across batches).
      A case appears twice in one batch only if its cluster has fewer members than its share of that batch.
    - ``inverse``: cases drawn without replacement within a batch with probability proportional to 1/f of their
      cluster (each cluster gets 1/K of the mass in expectation); batches are independent.

    Cases not clustered yet (never seen, e.g. dropped by ``drop_last`` in the warm-up) are put first in the next
    epoch, so the bank fills up. The order depends on (seed, epoch, pass) only; under DDP every rank computes the
    same global order and takes its own ``batch_size`` block of each global batch, so ranks never overlap.
    """

    def __init__(
        self,
        bank: EmbeddingBank,
        batch_size: int,
        num_batches: int | None = None,
        strategy: str = "even",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from scripts import distributed

        if strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"bank sampling strategy {strategy!r} is not one of {SAMPLING_STRATEGIES}")
        self.bank, self.batch_size, self.strategy, self.seed = bank, int(batch_size), strategy, int(seed)
        self.rank = distributed.rank() if rank is None else int(rank)
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        self.global_batch = self.batch_size * self.world_size
        if self.global_batch > len(bank):
            raise ValueError(f"global batch {self.global_batch} is larger than the cohort ({len(bank)} cases)")
        self.num_batches = int(num_batches) if num_batches else len(bank) // self.global_batch
        self.epoch, self._pass = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._pass = int(epoch), 0

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self._pass)
        self._pass += 1
        order = self.global_order(g)
        start = self.rank * self.batch_size
        mine = [
            order[b * self.global_batch + start : b * self.global_batch + start + self.batch_size]
            for b in range(self.num_batches)
        ]
        return iter([i for block in mine for i in block])

    def global_order(self, g: torch.Generator) -> list[int]:
        """The indices of all ranks, global batch after global batch (``num_batches * global_batch`` of them)."""
        total = self.num_batches * self.global_batch
        a = self.bank.assignments
        if bool((a < 0).all()):
            return _cycle(torch.arange(len(a)), total, g)
        unseen = (a < 0).nonzero().flatten()
        head = unseen[torch.randperm(len(unseen), generator=g)].tolist()[:total]
        groups = [(a == c).nonzero().flatten() for c in sorted(set(a[a >= 0].tolist()))]
        n_batches = -(-(total - len(head)) // self.global_batch)
        if self.strategy == "even":
            body = self._even(groups, n_batches, g)
        else:
            body = self._inverse(groups, n_batches, g)
        return (head + body)[:total]

    def _even(self, groups: list[torch.Tensor], n_batches: int, g: torch.Generator) -> list[int]:
        streams = [_Stream(members, g) for members in groups]
        out = []
        for _ in range(n_batches):
            share = [self.global_batch // len(groups)] * len(groups)
            for c in torch.randperm(len(groups), generator=g)[: self.global_batch % len(groups)].tolist():
                share[c] += 1
            batch = [i for stream, n in zip(streams, share) for i in stream.take(n)]
            out += [batch[j] for j in torch.randperm(len(batch), generator=g).tolist()]
        return out

    def _inverse(self, groups: list[torch.Tensor], n_batches: int, g: torch.Generator) -> list[int]:
        members = torch.cat(groups)
        probs = torch.cat([torch.full((len(m),), 1.0 / len(m), dtype=torch.double) for m in groups])
        out = []
        for _ in range(n_batches):
            out += members[torch.multinomial(probs, self.global_batch, replacement=False, generator=g)].tolist()
        return out


class _Stream:
    """Members of one cluster in a shuffled order that is reshuffled each time it runs out."""

    def __init__(self, members: torch.Tensor, g: torch.Generator) -> None:
        self.members, self.g, self.queue = members, g, []

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = self.members[torch.randperm(len(self.members), generator=self.g)].tolist()
            out.append(self.queue.pop(0))
        return out


def _cycle(indices: torch.Tensor, total: int, g: torch.Generator) -> list[int]:
    """``total`` indices from successive shuffles of ``indices`` (a plain shuffled epoch when total <= len)."""
    out: list[int] = []
    while len(out) < total:
        out += indices[torch.randperm(len(indices), generator=g)].tolist()
    return out[:total]
