"""3DSiam loss (paper Eq. 1-2): symmetric negative cosine with stop-gradient, kept per sample.

The loss stays per sample so that RE (sample re-weighting) can weight it; the batch loss is the weighted mean.
Plain PyTorch, no Ignite and no config dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(p: torch.Tensor, z: torch.Tensor) -> None:
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"expected two [B, D] tensors of the same shape, got {list(p.shape)} and {list(z.shape)}")


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """S(p, z) = -cos(p, sg(z)) per sample, shape [B]; the stop-gradient on z is what prevents collapse."""
    _check_pair(p, z)
    return -F.cosine_similarity(p, z.detach(), dim=1)


def simsiam_loss_per_sample(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised loss 0.5*S(p1, sg z2) + 0.5*S(p2, sg z1) per sample, shape [B], values in [-1, 1]."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar sum(w * l) / sum(w); the plain mean when ``weights`` is None.

    Weights are treated as constants (detached): RE weights come from cluster counts, not from the loss.
    """
    if per_sample.dim() != 1 or per_sample.numel() == 0:
        raise ValueError(f"per-sample loss must be a non-empty [B] tensor, got shape {list(per_sample.shape)}")
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(
            f"weights shape {list(weights.shape)} does not match per-sample loss shape {list(per_sample.shape)}"
        )
    w = weights.detach().to(dtype=per_sample.dtype, device=per_sample.device)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if not bool(total > 0):
        raise ValueError(f"weights sum to zero, the weighted mean is undefined (weights {w.tolist()})")
    return (w * per_sample).sum() / total


def check_finite(loss: torch.Tensor, context: str) -> torch.Tensor:
    """Raise ``FloatingPointError`` naming ``context`` (e.g. epoch/iteration/case ids) if ``loss`` has NaN/inf.

    Returns ``loss`` unchanged so it can wrap an expression.
    """
    finite = torch.isfinite(loss.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        shown = loss.detach().flatten()[:8].tolist()
        raise FloatingPointError(
            f"non-finite loss at {context}: {bad} of {loss.numel()} value(s) are NaN/inf (first values {shown}). "
            "Check the input intensities, the learning rate and the AMP settings."
        )
    return loss


class SimSiamLoss(nn.Module):
    """Config-friendly loss: ``forward((p1, p2, z1, z2), weights=None)`` -> scalar weighted mean of Eq. 2."""

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(outputs) != 4:
            raise ValueError(f"SimSiamLoss expects the 4 outputs (p1, p2, z1, z2) of SimSiam3D, got {len(outputs)}")
        p1, p2, z1, z2 = outputs
        return weighted_mean(simsiam_loss_per_sample(p1, p2, z1, z2), weights)
