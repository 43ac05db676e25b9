"""The one 3DSiam training step (paper Section 2, Eq. 1-2), plain PyTorch: every trainer and benchmark calls it.

``simsiam_step`` is what happens to one batch of two views: forward through ``SimSiam3D`` (under the caller's
autocast), the symmetric negative-cosine loss per sample, optional per-sample weights (RE), the finite check and the
optimiser update. The bundle's ``SimSiamTrainer`` (Ignite glue), ``benchmarks/learning_curve.py`` and
``benchmarks/train_step.py`` all train through it, so a benchmark measures the bundle's own step, not a copy.
``optimizer_step`` (zero, backward through the AMP scaler, step) is shared with the Rubik's cube trainer.

No Ignite, no config: tensors, a network, an optimiser and callables in; tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from monai.data import MetaTensor

from scripts.config_utils import BOOL_WORDS, as_bool
from scripts.pretrain.losses import check_finite, simsiam_loss_per_sample, weighted_mean

Weigh = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
Penalty = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


def plain_tensor(x) -> torch.Tensor:
    """A plain tensor: MONAI's ``MetaTensor`` would carry its metadata (and Python overhead) through every layer."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def views_on_device(
    x1, x2, device, channels_last: bool = False, non_blocking: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views as plain tensors on ``device``, in the channels-last-3d layout when the network uses it."""
    x1 = plain_tensor(x1).to(device, non_blocking=non_blocking)
    x2 = plain_tensor(x2).to(device, non_blocking=non_blocking)
    if channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last_3d)
        x2 = x2.contiguous(memory_format=torch.channels_last_3d)
    return x1, x2


def step_autocast(device, amp: bool = False, cpu_bf16: bool = False):
    """The step's precision: bf16 autocast on a CPU when ``cpu_bf16``; fp16 AMP on CUDA when ``amp``; else fp32."""
    if cpu_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return torch.autocast(device_type=torch.device(device).type, enabled=bool(amp))


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Zero the gradients, back-propagate ``loss`` (through the AMP ``scaler`` when given) and step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def simsiam_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    autocast=None,
    scaler=None,
    weigh: Weigh | None = None,
    loss_scale: Callable[[torch.Tensor | None], float] | None = None,
    penalty: Penalty | None = None,
    context: str = "",
) -> dict:
    """One optimiser step of 3DSiam on two views ``x1``, ``x2`` [B, C, D, H, W] (already on the device).

    ``weigh(z1, z2)`` returns the per-sample loss weights (RE) or ``None`` (equal weights); it sees the step's
    projections before the update. ``loss_scale(weights)`` multiplies the weighted mean (DDP: this rank's share of
    the global weight sum). ``penalty(z1, z2)`` returns ``(term, parts)``: a label-free term added to the loss
    (``scripts.pretrain.regularizers``; the weights do not apply to it) and its parts for the log. A non-finite loss raises ``FloatingPointError`` naming ``context`` before the update, so
    the weights stay good. Returns the detached ``loss``, ``per_sample`` losses, ``weights``, ``z1`` and ``z2``.
    """
    network.train()
    with autocast if autocast is not None else nullcontext():
        p1, p2, z1, z2 = network(x1, x2)
    per_sample = simsiam_loss_per_sample(p1.float(), p2.float(), z1.float(), z2.float())
    out = {"z1": z1.detach().float(), "z2": z2.detach().float(), "per_sample": per_sample.detach()}
    weights = weigh(z1, z2) if weigh is not None else None
    loss = weighted_mean(per_sample, weights)
    if loss_scale is not None:
        loss = loss * loss_scale(weights)
    if penalty is not None:
        term, parts = penalty(z1, z2)
        loss = loss + term
        out["penalty"] = parts
    check_finite(loss, context or "a training step")
    optimizer_step(loss, optimizer, scaler)
    out.update(loss=loss.detach(), weights=weights)
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
