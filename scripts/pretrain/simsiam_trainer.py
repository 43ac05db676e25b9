"""Ignite glue for 3DSiam pretraining: the training step, with an optional RE/SE hook.

The step is plain PyTorch around the core pieces (``SimSiam3D``, ``simsiam_loss_per_sample``, ``weighted_mean``);
this module only adapts it to MONAI's ``Trainer`` so bundle handlers (checkpoints, TensorBoard, LR schedule,
stats) and ``ConfigWorkflow`` work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch.utils.data import DataLoader

from scripts.config_utils import as_bool
from scripts.pretrain.balance import BALANCE_MODES, balance_step
from scripts.pretrain.bank import SAMPLING_STRATEGIES, EmbeddingBank
from scripts.pretrain.losses import check_finite, simsiam_loss_per_sample, weighted_mean
from scripts.run import distributed

logger = logging.getLogger(__name__)

TRAINING_MODES = BALANCE_MODES + ("bank",)


@dataclass
class BalanceSettings:
    """RE/SE/bank switches. ``mode``: none | re | se (paper Section 2) | bank (``scripts.pretrain.bank``).

    SE's candidate batch is N = k * q originals and it trains on m of them. ``re_embeddings``: "views" reuses the
    step's own z (mean of the two views, no extra forward pass); "original" is the paper-exact variant: an extra
    no-grad forward pass on the un-augmented volumes. Bank mode re-clusters its memory bank every
    ``recluster_every`` epochs after the warm-up (k, or the best silhouette in ``k_range``) and the data loader's
    ``ClusterBalancedSampler`` (``bank_sampling``: even | inverse) composes the batches. ``labels`` ({case id:
    label}) are used for the logged diagnostics only, never for the selection, the weights or the sampling."""

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
        if self.mode not in TRAINING_MODES:
            raise ValueError(f"balance mode {self.mode!r} is not one of {TRAINING_MODES}")
        if self.bank_sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"bank_sampling must be one of {SAMPLING_STRATEGIES}, got {self.bank_sampling!r}")
        if int(self.recluster_every) < 1:
            raise ValueError(f"recluster_every must be >= 1, got {self.recluster_every}")
        if self.re_embeddings not in ("views", "original"):
            raise ValueError(f"re_embeddings must be 'views' or 'original', got {self.re_embeddings!r}")
        if self.mode == "se" and self.m > self.k * self.q:
            raise ValueError(f"SE needs m <= k*q candidates, got m={self.m}, k*q={self.k * self.q}")


class SimSiamTrainer(Trainer):
    """Trains a ``SimSiam3D`` on batches ``{"image": view 1, "image_2": view 2}``.

    ``balance_hook(engine, batch) -> weights | None`` (optional) is called with the step's detached outputs and
    returns per-sample loss weights (RE); ``None`` means equal weights. The step's output dict holds the loss,
    the per-sample losses, the weights and the detached ``z1`` used by the collapse monitor.
    A non-finite loss raises ``FloatingPointError`` before the optimiser step, so the last checkpoint stays good.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        balance_hook: Callable[[Any, dict], torch.Tensor | None] | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        view_keys: tuple[str, str] = ("image", "image_2"),
        balance: BalanceSettings | None = None,
        view_transform: Callable[[dict], dict] | None = None,
        summary_writer=None,
        bank: EmbeddingBank | None = None,
        channels_last: bool = False,
        cpu_bf16: bool | str = "auto",
    ) -> None:
        if hasattr(train_data_loader, "__len__") and len(train_data_loader) == 0:
            dataset = getattr(train_data_loader, "dataset", [])
            raise ValueError(
                f"the training loader yields no batch: {len(dataset)} cases < batch size "
                f"{getattr(train_data_loader, 'batch_size', '?')} (SE candidate batch = k*q) with drop_last; "
                "lower balance#k/balance#q or batch_size"
            )
        if epoch_length is None:
            epoch_length = len(train_data_loader)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=None,
            handlers=None,
            amp=amp,
            decollate=False,
        )  # handlers are attached at the end, once the AMP scaler they checkpoint exists
        self.channels_last = as_bool(channels_last, "channels_last")
        on_cpu = torch.device(device).type == "cpu"
        wants_bf16 = cpu_has_native_bf16() if str(cpu_bf16).lower() == "auto" else as_bool(cpu_bf16, "cpu_bf16")
        self.cpu_bf16 = on_cpu and wants_bf16
        if self.channels_last:  # NDHWC: oneDNN's fast 3D convolution layout on CPU; weights follow the inputs
            network.to(memory_format=torch.channels_last_3d)
        self.network = network
        self.optimizer = optimizer
        self.balance_hook = balance_hook
        self.view_keys = view_keys
        self.amp = as_bool(amp, "amp") and torch.device(device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.balance = balance or BalanceSettings()
        self.view_transform = view_transform
        self.summary_writer = summary_writer
        if self.balance.mode == "se" and view_transform is None:
            raise ValueError("SE mode augments the selected cases inside the step: pass view_transform")
        self.bank = bank
        if self.balance.mode == "bank" and bank is None:
            raise ValueError(
                "bank mode needs the memory bank (scripts.pretrain.bank.EmbeddingBank) shared with the sampler"
            )
        self._diag: dict[str, list] = {}
        self.add_event_handler(Events.EPOCH_STARTED, lambda e: self._diag.clear())
        if self.balance.mode == "bank":
            self.add_event_handler(Events.EPOCH_COMPLETED, self._recluster_bank)  # before checkpoints save the bank
        self.add_event_handler(Events.EPOCH_COMPLETED, self._log_diagnostics)  # before StatsHandler reads metrics
        if train_handlers:
            self._register_handlers(train_handlers)

    def run(self) -> None:  # keep our own GradScaler (checkpointed) instead of Trainer.run's fresh one
        Workflow.run(self)

    def _autocast(self, device) -> torch.autocast:
        """fp16 AMP on CUDA (``amp``); bf16 on a CPU with native bf16 instructions (``cpu_bf16``); else fp32."""
        if self.cpu_bf16:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return torch.autocast(device_type=torch.device(device).type, enabled=self.amp)

    def _balancing(self, engine: Trainer) -> bool:
        return self.balance.mode != "none" and engine.state.epoch > self.balance.warmup_epochs

    def _step_seed(self, engine: Trainer) -> int:
        return self.balance.seed * 1_000_003 + int(engine.state.iteration)

    @torch.no_grad()
    def _embed_originals(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of un-augmented volumes from the current encoder (eval mode: BN statistics untouched).

        On CPU the candidates go through in chunks of m: SE's 30 volumes in one batch were 28% slower than five
        batches of 6 (measured at 32³, 2 threads: large activations cost more in page faults than they save).
        """
        encoder = distributed.unwrap(self.network).encoder
        was_training = encoder.training
        encoder.eval()
        chunk = max(1, self.balance.m) if x.device.type == "cpu" else x.shape[0]
        with self._autocast(x.device):
            z = torch.cat([encoder(part) for part in x.split(chunk)])
        encoder.train(was_training)
        return distributed.all_gather_rows(z.float())

    def _select_se(self, engine: Trainer, batchdata: dict) -> dict:
        """SE: cluster the candidate originals, keep m, and only then augment those m into two views.

        Under DDP the candidates of all ranks form one global batch of k*q; the m selected volumes are shared out
        evenly (m / world per rank), so the trained batch is the paper's m whatever the number of processes.
        """
        x0 = _plain(batchdata["image"])
        ids = distributed.all_gather_list(list(batchdata.get("id", [])))
        m = self.balance.m
        if self._balancing(engine):
            emb = self._embed_originals(x0.to(engine.state.device))
            res = balance_step(emb, "se", k=self.balance.k, m=m, seed=self._step_seed(engine))
            chosen = distributed.broadcast_from_rank0(res.indices.to(emb.device)).cpu()
            self._record("cluster_sizes", res.cluster_sizes)
        else:  # warm-up: a random batch of m (the loader already shuffled the candidates)
            chosen = torch.arange(m)
        mine = distributed.rows_for_this_rank(x0.to(engine.state.device), chosen.to(engine.state.device)).cpu()
        chosen_ids = [ids[i] for i in chosen.tolist()] if ids else []
        self._record_labels("se_batch", chosen_ids)
        self._record_labels("random_batch", ids[:m])
        views = [self.view_transform({"image": x}) for x in mine]
        share = distributed.per_rank(m, what="SE batch m")
        return {
            "image": torch.stack([_plain(v["image"]) for v in views]),
            "image_2": torch.stack([_plain(v["image_2"]) for v in views]),
            "id": chosen_ids[distributed.rank() * share : (distributed.rank() + 1) * share],
        }

    def _re_weights(self, engine: Trainer, batchdata: dict, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor | None:
        if self.balance.mode != "re" or not self._balancing(engine):
            return None
        if self.balance.re_embeddings == "original":
            emb = self._embed_originals(_plain(batchdata["image_0"]).to(engine.state.device))
        else:
            emb = distributed.all_gather_rows(((z1 + z2) / 2).detach().float())
        res = balance_step(emb, "re", k=self.balance.k, seed=self._step_seed(engine))
        weights = distributed.local_rows(distributed.broadcast_from_rank0(res.weights), z1.shape[0]).to(z1.device)
        self._record("cluster_sizes", res.cluster_sizes)
        labels = self.balance.labels or {}
        for case_id, w in zip(batchdata.get("id", []), weights.tolist()):
            if case_id in labels:
                self._diag.setdefault(f"re_weight_class_{labels[case_id]}", []).append(w)
        return weights

    def _update_bank(self, batchdata: dict, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Bank mode: store the step's own embeddings (mean of the two views), gathered from every rank."""
        ids = distributed.all_gather_list([str(i) for i in batchdata.get("id", [])])
        if len(ids) != distributed.world_size() * z1.shape[0]:
            raise ValueError("bank mode needs the case 'id' of every sample in the batch")
        self.bank.update(ids, distributed.all_gather_rows(((z1 + z2) / 2).detach().float()).cpu())
        self._record_labels("bank_batch", ids)

    def _recluster_bank(self, engine: Trainer) -> None:
        """Re-cluster the whole bank on schedule; rank 0's assignments are broadcast so every rank samples alike."""
        epoch, s = int(engine.state.epoch), self.balance
        if epoch < s.warmup_epochs or (epoch - s.warmup_epochs) % int(s.recluster_every) != 0:
            return
        if distributed.world_size() > 1:  # every rank gathered the same rows each step, so the banks must agree
            digest = torch.tensor([[float(self.bank.z.double().sum()), float(self.bank.seen.sum()), self.bank.updates]])
            rows = distributed.all_gather_rows(digest.to(engine.state.device, torch.float64)).cpu()
            if not bool((rows == rows[0]).all()):
                raise RuntimeError(f"memory banks differ across ranks at epoch {epoch}: {rows.tolist()}")
        result = self.bank.recluster(s.k, seed=s.seed * 1_000_003 + epoch, k_range=s.k_range)
        a = distributed.broadcast_from_rank0(self.bank.assignments.to(engine.state.device)).cpu()
        self.bank.assignments = a
        self._diag["bank_k"] = [result.k]
        self._diag["bank_cluster_sizes"] = [sorted(result.sizes, reverse=True)]
        labels = self.balance.labels or {}
        known = [(labels[i], int(c)) for i, c in zip(self.bank.ids, a.tolist()) if i in labels and c >= 0]
        if known:
            from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

            y, c = [str(v) for v, _ in known], [c for _, c in known]
            self._diag["bank_ari"], self._diag["bank_nmi"] = (
                [adjusted_rand_score(y, c)],
                [normalized_mutual_info_score(y, c)],
            )
            minority = _minority(list(labels.values()))
            order = sorted(set(c), key=lambda j: -c.count(j))
            self._diag["bank_minority_share_by_cluster"] = [
                [float(np.mean([lab == minority for lab, cj in zip(y, c) if cj == j])) for j in order]
            ]

    def _record(self, name: str, value) -> None:
        self._diag.setdefault(name, []).append(value)

    def _record_labels(self, name: str, ids: list) -> None:
        labels = self.balance.labels or {}
        self._diag.setdefault(name, []).extend(labels[i] for i in ids if i in labels)

    def _log_diagnostics(self, engine: Trainer) -> None:
        """Cluster sizes, minority share of SE vs random batches, mean RE weight per class (labels: logging only)."""
        if not self._diag:
            return
        metrics = {}
        if self._diag.get("cluster_sizes"):
            sizes = [sorted(c, reverse=True) + [0] * (self.balance.k - len(c)) for c in self._diag["cluster_sizes"]]
            for j, v in enumerate(np.mean(sizes, axis=0)):
                metrics[f"balance/cluster_size_{j}"] = float(v)
        all_labels = list((self.balance.labels or {}).values())
        if all_labels:
            minority = _minority(all_labels)
            metrics["balance/minority_share_cohort"] = float(np.mean([str(v) == minority for v in all_labels]))
            for name in ("se_batch", "random_batch", "bank_batch"):
                if self._diag.get(name):
                    metrics[f"balance/minority_share_{name}"] = float(
                        np.mean([str(v) == minority for v in self._diag[name]])
                    )
        for name in ("bank_k", "bank_ari", "bank_nmi"):
            if self._diag.get(name):
                metrics[f"balance/{name}"] = float(self._diag[name][-1])
        for key in ("bank_cluster_sizes", "bank_minority_share_by_cluster"):
            for j, v in enumerate(self._diag.get(key, [[]])[-1]):
                metrics[f"balance/{key.replace('sizes', 'size')}_{j}"] = float(v)
        for key, vals in self._diag.items():
            if key.startswith("re_weight_class_"):
                metrics[f"balance/mean_{key}"] = float(np.mean(vals))
        engine.state.metrics.update(metrics)
        if metrics:
            logger.info(
                "epoch %d balance diagnostics: %s", engine.state.epoch, {k: round(v, 3) for k, v in metrics.items()}
            )
        if self.summary_writer is not None and distributed.is_rank0():
            for k, v in metrics.items():
                self.summary_writer.add_scalar(k, v, engine.state.epoch)

    def _iteration(self, engine: Trainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("empty batch from the data loader")
        if self.balance.mode == "se":
            batchdata = self._select_se(engine, batchdata)
        x1 = _plain(batchdata[self.view_keys[0]]).to(engine.state.device, non_blocking=self.non_blocking)
        x2 = _plain(batchdata[self.view_keys[1]]).to(engine.state.device, non_blocking=self.non_blocking)
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last_3d)
            x2 = x2.contiguous(memory_format=torch.channels_last_3d)
        self.network.train()
        with self._autocast(engine.state.device):
            p1, p2, z1, z2 = self.network(x1, x2)
        per_sample = simsiam_loss_per_sample(p1.float(), p2.float(), z1.float(), z2.float())
        out = {"z1": z1.detach().float(), "z2": z2.detach().float(), "per_sample": per_sample.detach()}
        if self.balance.mode == "bank":
            self._update_bank(batchdata, out["z1"], out["z2"])
        weights = self._re_weights(engine, batchdata, z1, z2)
        if self.balance_hook is not None:
            weights = self.balance_hook(engine, {**batchdata, **out})
        loss = weighted_mean(per_sample, weights) * distributed.global_weight_scale(weights)
        check_finite(loss, f"epoch {engine.state.epoch} iteration {engine.state.iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out.update(loss=loss.detach(), weights=weights)
        engine.state.output = out
        return out


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX-BF16). Elsewhere bf16 is emulated and slower than
    fp32 (measured 0.66-0.73x on an AVX-512 Xeon without BF16), so ``cpu_bf16: auto`` keeps fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _minority(labels: list) -> str:
    """The least frequent label (as a string), for the minority-share diagnostics."""
    values, counts = np.unique([str(v) for v in labels], return_counts=True)
    return str(values[counts.argmin()])


def _plain(x) -> torch.Tensor:
    """A plain tensor: MONAI's ``MetaTensor`` would carry its metadata (and Python overhead) through every layer."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
