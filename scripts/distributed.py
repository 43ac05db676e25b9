"""What DDP needs beyond wrapping the network: the global batch for RE/SE, rank-0-only outputs, per-rank sizes.

Every helper is the identity (or rank 0 / world 1) when ``torch.distributed`` is not initialised, so the
single-process code path is the same code. RE/SE decide on the *global* batch: embeddings are gathered from all
ranks in rank order, every rank runs the same deterministic k-means on the same rows (and the selection is also
broadcast from rank 0, so floating-point drift between devices cannot split the ranks' decisions).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from scripts.config_utils import as_bool


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def init_process_group(device: torch.device | str) -> None:
    """Join the torchrun job: nccl on CUDA, gloo on CPU; pin this rank's GPU.

    Ignite's own distributed context is set up here too, on every rank: it is created lazily the first time
    ``ignite.distributed`` is queried and that creation is a collective (``new_group``), so if only rank 0
    queried it (rank-0-only ``CheckpointSaver``) the ranks would wait on each other forever.
    """
    import ignite.distributed as idist

    device = torch.device(device)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    idist.sync()


def shutdown(settle_s: float = 0.5) -> None:
    """Leave the process group so that a finished run exits 0 (no-op without torchrun).

    Gloo (the CPU backend) drops a collective's work object on its own worker thread *after* the caller has its
    result. When that is the last reference, the thread takes the GIL to release a Python object; if the
    interpreter is already finalising, the thread is killed inside a ``noexcept`` destructor and the rank aborts
    ("terminate called without an active exception", exit -6) with its outputs written: 7 in 221 runs of
    ``tests/ddp_worker.py`` on a loaded 2-core machine, 0 in 100 with this. ``destroy_process_group`` does not
    join gloo's threads. So: a barrier (no rank leaves while a peer still communicates), then a short sleep with
    the GIL released, in which the worker threads finish those releases while Python is still alive.
    """
    if not dist.is_initialized():
        return
    gloo = dist.get_backend() == "gloo"
    dist.barrier()
    dist.destroy_process_group()
    if gloo:
        time.sleep(float(settle_s))


def per_rank(global_size: int, world: int | None = None, what: str = "batch size") -> int:
    """This rank's share of a global size (batch 6, SE candidates k*q, SE batch m): they must divide evenly so
    that the global batch, and with it the paper's N and m, is the same whatever the number of processes."""
    world = world_size() if world is None else int(world)
    if global_size % world:
        raise ValueError(
            f"{what} {global_size} is not divisible by the {world} processes; choose a multiple of {world}"
        )
    return global_size // world


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (identity without DDP). All ranks must pass the same shape."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_list(items: list) -> list:
    """Concatenate every rank's Python list (e.g. case ids) in rank order."""
    if world_size() == 1:
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def local_rows(global_values: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's slice of a per-row result computed on the gathered batch (rank r holds rows r*n .. r*n+n-1)."""
    start = rank() * n_local
    return global_values[start : start + n_local]


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``x`` on every rank (same shape and dtype on all ranks)."""
    if world_size() > 1:
        x = x.contiguous()
        dist.broadcast(x, src=0)
    return x


def rows_for_this_rank(x_local: torch.Tensor, global_indices: torch.Tensor) -> torch.Tensor:
    """SE under DDP: the global selection (indices into the gathered batch) split evenly over the ranks.

    Rank r trains positions r*m/w .. (r+1)*m/w of the selection, whichever rank holds those volumes: each owner
    writes its selected rows into a zero buffer of m rows and one all-reduce (sum) gives every rank all m, so only
    the m selected volumes travel, never the whole candidate batch.
    """
    m, n_local = int(global_indices.numel()), x_local.shape[0]
    if world_size() == 1:
        return x_local[global_indices.to(x_local.device)]
    share = per_rank(m, what="SE batch m")
    start = rank() * n_local
    buf = torch.zeros((m, *x_local.shape[1:]), dtype=x_local.dtype, device=x_local.device)
    for pos, idx in enumerate(global_indices.tolist()):
        if start <= idx < start + n_local:
            buf[pos] = x_local[idx - start]
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf[rank() * share : (rank() + 1) * share]


def global_weight_scale(local_weights: torch.Tensor | None) -> float:
    """Factor turning this rank's weighted mean into its share of the *global* weighted mean.

    DDP averages gradients over ranks, so rank r must contribute ``world * sum_r(w*l) / sum_all(w)``; with
    ``mean_r = sum_r(w*l) / sum_r(w)`` that is ``mean_r * world * sum_r(w) / sum_all(w)``. 1 without DDP.
    """
    if world_size() == 1 or local_weights is None:  # equal weights and equal per-rank batches: DDP's mean is right
        return 1.0
    w = local_weights.detach().float()
    local_sum = w.sum().reshape(1)
    total = local_sum.clone().to(_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(world_size() * local_sum.item() / total.item())


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_ddp(network: torch.nn.Module, device: torch.device | str, sync_batchnorm: bool | None = None):
    """``DistributedDataParallel`` around the training wrapper, after moving it to this rank's device.

    BatchNorm becomes SyncBatchNorm on CUDA by default (SimSiam's practice: per-GPU BN on a batch of 3 is noise).
    The conversion swaps the BN children in place, so references to the encoder held elsewhere in the config
    (checkpointing, ``models/model.pt`` export) keep pointing at the trained modules.
    """
    device = torch.device(device)
    if sync_batchnorm is None:
        sync_batchnorm = device.type == "cuda"
    if as_bool(sync_batchnorm, "sync_batchnorm"):
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    network = network.to(device)
    if not is_distributed():
        return network
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


class NullSummaryWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` on ranks > 0: every call is accepted and does nothing, so
    handlers can be built identically on every rank and only rank 0 writes event files."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def rank0_summary_writer(log_dir: str):
    """A real ``SummaryWriter`` on rank 0, a ``NullSummaryWriter`` elsewhere."""
    if not is_rank0():
        return NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


class ReshufflingDistributedSampler(torch.utils.data.DistributedSampler):
    """``DistributedSampler`` that draws a new permutation each time it is iterated within an epoch.

    SE reads k*q candidates per step, so an epoch of ``len(dataset) / batch`` steps passes over the data several
    times and Ignite re-iterates the loader; the stock sampler would replay the same order (its seed depends on
    the epoch only). The permutation depends on (seed, epoch, pass), identical on every rank, and ``set_epoch``
    resets the pass count, so a resumed run draws the same candidates as an uninterrupted one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pass = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._pass = 0

    def __iter__(self):
        epoch = self.epoch
        self.epoch = epoch * 1009 + self._pass  # the parent seeds its shuffle with seed + self.epoch
        try:
            return super().__iter__()
        finally:
            self.epoch, self._pass = epoch, self._pass + 1
