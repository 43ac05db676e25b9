"""Ignite glue for 3DSiam pretraining: the training step, shaped by a balancing strategy's hooks.

The step is plain PyTorch around the core pieces (``SimSiam3D``, ``simsiam_loss_per_sample``, ``weighted_mean``);
this module only adapts it to MONAI's ``Trainer`` so bundle handlers (checkpoints, TensorBoard, LR schedule,
stats) and ``ConfigWorkflow`` work unchanged. Balancing (none, RE, SE, bank) lives in ``scripts.pretrain.strategies``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch.utils.data import DataLoader

from scripts.config_utils import BOOL_WORDS, as_bool
from scripts.pretrain.losses import check_finite, simsiam_loss_per_sample, weighted_mean
from scripts.pretrain.strategies import NoBalancing, Strategy, plain_tensor
from scripts.run import distributed

logger = logging.getLogger(__name__)


class SimSiamTrainer(Trainer):
    """Trains a ``SimSiam3D`` on batches ``{"image": view 1, "image_2": view 2}``.

    ``balancing`` (a ``scripts.pretrain.strategies.Strategy``; default: none) shapes each step through its hooks:
    the batch the step trains on, what it sees of the embeddings, the per-sample loss weights, its epoch-end work and
    the epoch's ``balance/...`` diagnostics. ``view_transform`` makes the two views of one case, for strategies that
    augment inside the step (SE). The step's output dict holds the loss, the per-sample losses, the weights and the
    detached ``z1`` used by the collapse monitor. A non-finite loss raises ``FloatingPointError`` before the
    optimiser step, so the last checkpoint stays good.
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
        train_handlers: Sequence | None = None,
        amp: bool = False,
        view_keys: tuple[str, str] = ("image", "image_2"),
        balancing: Strategy | None = None,
        view_transform: Callable[[dict], dict] | None = None,
        summary_writer=None,
        channels_last: bool = False,
        cpu_bf16: bool | str = "auto",
        torch_compile: bool | str = False,
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
        self.cpu_bf16 = uses_cpu_bf16(cpu_bf16, device)
        if self.channels_last:  # NDHWC: oneDNN's fast 3D convolution layout on CPU; weights follow the inputs
            network.to(memory_format=torch.channels_last_3d)
        self.compile_backend = compile_backend(torch_compile)
        if self.compile_backend:  # in place: state-dict keys, checkpoints and the encoder export stay unchanged
            network.compile(backend=self.compile_backend)
        self.network = network
        self.optimizer = optimizer
        self.view_keys = view_keys
        self.amp = as_bool(amp, "amp") and torch.device(device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.view_transform = view_transform
        self.summary_writer = summary_writer
        self.balancing = balancing if balancing is not None else NoBalancing()
        self.balancing.attach(self)
        self.add_event_handler(Events.EPOCH_STARTED, self.balancing.epoch_started)
        self.add_event_handler(Events.EPOCH_COMPLETED, self.balancing.epoch_completed)  # before checkpoints save it
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

    @torch.no_grad()
    def embed_originals(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Embeddings of un-augmented volumes from the current encoder (eval mode: BN statistics untouched),
        gathered from every rank.

        On CPU the volumes go through in chunks of ``chunk`` (SE's m): SE's 30 volumes in one batch were 28% slower
        than five batches of 6 (measured at 32³, 2 threads: large activations cost more in page faults than they
        save)."""
        encoder = distributed.unwrap(self.network).encoder
        was_training = encoder.training
        encoder.eval()
        chunk = max(1, int(chunk)) if x.device.type == "cpu" else x.shape[0]
        with self._autocast(x.device):
            z = torch.cat([encoder(part) for part in x.split(chunk)])
        encoder.train(was_training)
        return distributed.all_gather_rows(z.float())

    def _log_diagnostics(self, engine: Trainer) -> None:
        """The strategy's epoch diagnostics into the epoch metrics, the log and TensorBoard (rank 0)."""
        metrics = self.balancing.diagnostics()
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
        batchdata = self.balancing.before_step(engine, batchdata)
        x1 = plain_tensor(batchdata[self.view_keys[0]]).to(engine.state.device, non_blocking=self.non_blocking)
        x2 = plain_tensor(batchdata[self.view_keys[1]]).to(engine.state.device, non_blocking=self.non_blocking)
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last_3d)
            x2 = x2.contiguous(memory_format=torch.channels_last_3d)
        self.network.train()
        with self._autocast(engine.state.device):
            p1, p2, z1, z2 = self.network(x1, x2)
        per_sample = simsiam_loss_per_sample(p1.float(), p2.float(), z1.float(), z2.float())
        out = {"z1": z1.detach().float(), "z2": z2.detach().float(), "per_sample": per_sample.detach()}
        self.balancing.after_forward(engine, batchdata, z1, z2)
        weights = self.balancing.weights(engine, batchdata, z1, z2)
        loss = weighted_mean(per_sample, weights) * distributed.global_weight_scale(weights)
        check_finite(loss, f"epoch {engine.state.epoch} iteration {engine.state.iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out.update(loss=loss.detach(), weights=weights)
        engine.state.output = out
        return out


def compile_backend(torch_compile: bool | str) -> str | None:
    """The ``torch.compile`` backend for the config's ``torch_compile``: false -> None (eager), true -> "inductor",
    or a backend's name (e.g. "aot_eager", which traces without generating code: a quick check that the step
    compiles). Inductor's first compile of the step takes minutes on a 2-core CPU and pays only over long or repeated
    runs (its kernels are cached on disk, ``TORCHINDUCTOR_CACHE_DIR``): docs/learning.md, CPU speed."""
    if isinstance(torch_compile, str) and torch_compile.strip().lower() not in BOOL_WORDS:
        import torch._dynamo

        name = torch_compile.strip()
        known = torch._dynamo.list_backends(exclude_tags=())
        if name not in known:
            raise ValueError(f"torch_compile must be true, false or a torch.compile backend ({known}), got {name!r}")
        return name
    return "inductor" if as_bool(torch_compile, "torch_compile") else None


def uses_cpu_bf16(cpu_bf16: bool | str, device) -> bool:
    """Whether a step on ``device`` runs under bf16 autocast for the config's ``cpu_bf16`` (``auto``: only on a CPU
    with native bf16 instructions; never on CUDA, which has its own ``amp``)."""
    wants = cpu_has_native_bf16() if str(cpu_bf16).lower() == "auto" else as_bool(cpu_bf16, "cpu_bf16")
    return torch.device(device).type == "cpu" and wants


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX-BF16). Elsewhere bf16 is emulated and slower than
    fp32 (measured 0.66-0.73x on an AVX-512 Xeon without BF16), so ``cpu_bf16: auto`` keeps fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
