"""Tests for scripts.pretrain.losses: negative cosine, stop-gradient, symmetric loss, weighted mean, finiteness."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.pretrain.losses import (
    SimSiamLoss,
    check_finite,
    negative_cosine,
    simsiam_loss_per_sample,
    weighted_mean,
)


def test_negative_cosine_values() -> None:
    p = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    z = torch.tensor([[2.0, 4.0, 6.0], [-3.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    torch.testing.assert_close(negative_cosine(p, z), torch.tensor([-1.0, 1.0, 0.0]))


def test_identical_inputs_give_minus_one() -> None:
    z = torch.randn(5, 16)
    torch.testing.assert_close(negative_cosine(z, z), -torch.ones(5))
    z1, z2 = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(simsiam_loss_per_sample(z2, z1, z1, z2), -torch.ones(5))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\[4, 8\] and \[4, 7\]"):
        negative_cosine(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match="B, D"):
        negative_cosine(torch.randn(8), torch.randn(8))


def test_stop_gradient_on_targets() -> None:
    """z1, z2 are only targets in the symmetric loss, so the detached path gives them no gradient."""
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam_loss_per_sample(p1, p2, z1, z2).mean().backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0


def test_stop_gradient_when_target_shares_graph() -> None:
    """Through a shared encoder the target branch contributes nothing: grad equals that of the p-branch only."""
    w = torch.randn(8, 8, requires_grad=True)
    x1, x2 = torch.randn(4, 8), torch.randn(4, 8)
    z1, z2 = x1 @ w, x2 @ w
    negative_cosine(z1 * 2.0, z2).sum().backward()  # p = 2*z1 as a trivial predictor
    grad_with_target_in_graph = w.grad.clone()
    w.grad = None
    negative_cosine((x1 @ w) * 2.0, (x2 @ w).detach()).sum().backward()
    torch.testing.assert_close(grad_with_target_in_graph, w.grad)


def test_weighted_mean_hand_computation() -> None:
    losses = torch.tensor([-0.5, -0.2, 0.1, -0.9])
    weights = torch.tensor([1.0, 3.0, 1.0, 2.0])
    expected = (-0.5 * 1 + -0.2 * 3 + 0.1 * 1 + -0.9 * 2) / 7.0
    assert math.isclose(weighted_mean(losses, weights).item(), expected, rel_tol=1e-6)
    assert math.isclose(weighted_mean(losses).item(), losses.mean().item(), rel_tol=1e-6)
    ones = torch.ones(4)
    torch.testing.assert_close(weighted_mean(losses, ones), losses.mean())


def test_weighted_mean_detaches_weights() -> None:
    losses = torch.randn(3, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    weighted_mean(losses, weights).backward()
    assert weights.grad is None
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 2.0, 3.0]) / 6.0)


def test_weighted_mean_validation() -> None:
    losses = torch.zeros(3)
    with pytest.raises(ValueError, match="does not match"):
        weighted_mean(losses, torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(losses, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        weighted_mean(losses, torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_mean(losses, torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        weighted_mean(torch.zeros(2, 2))


def test_simsiam_loss_module_matches_functions() -> None:
    p1, p2, z1, z2 = (torch.randn(6, 16) for _ in range(4))
    weights = torch.tensor([1.0, 1.0, 3.0, 3.0, 1.5, 1.0])
    per_sample = simsiam_loss_per_sample(p1, p2, z1, z2)
    loss = SimSiamLoss()((p1, p2, z1, z2), weights)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, (weights * per_sample).sum() / weights.sum())
    torch.testing.assert_close(SimSiamLoss()((p1, p2, z1, z2)), per_sample.mean())
    assert bool((per_sample >= -1.0 - 1e-6).all() and (per_sample <= 1.0 + 1e-6).all())
    with pytest.raises(ValueError, match="4 outputs"):
        SimSiamLoss()((p1, p2, z1))


def test_check_finite() -> None:
    ok = torch.tensor(-0.7)
    assert check_finite(ok, "epoch 1 iteration 3") is ok
    with pytest.raises(FloatingPointError, match="epoch 2 iteration 5"):
        check_finite(torch.tensor(float("nan")), "epoch 2 iteration 5")
    with pytest.raises(FloatingPointError, match="1 of 3"):
        check_finite(torch.tensor([0.1, float("inf"), 0.2]), "batch of cases a, b, c")
