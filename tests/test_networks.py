"""Tests for scripts.pretrain.networks: Table 3 encoder shapes, TorchScript, gradients, state-dict loading."""

from __future__ import annotations

import pytest
import torch

from scripts.pretrain.losses import SimSiamLoss
from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D, count_parameters

# torch 2.13 deprecates TorchScript (still the MONAI bundle export format); MONAI also scripts helpers on import.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [(27, 27, 27), (32, 32, 32), (48, 48, 48), (27, 32, 40)])
def test_encoder_output_shape(size: tuple[int, int, int]) -> None:
    encoder = Encoder3D().eval()
    with torch.no_grad():
        z = encoder(torch.randn(2, 1, *size))
    assert z.shape == (2, 256)
    assert encoder.feature_dim == 256
    assert torch.isfinite(z).all()


def test_encoder_multichannel() -> None:
    encoder = Encoder3D(in_channels=4, out_dim=128).eval()
    with torch.no_grad():
        z = encoder(torch.randn(2, 4, 27, 27, 27))
    assert z.shape == (2, 128)
    assert encoder.feature_dim == 128


def test_encoder_rejects_small_or_malformed_input() -> None:
    encoder = Encoder3D().eval()
    with pytest.raises(ValueError, match=r"spatial size \[16, 16, 16\]"):
        encoder(torch.randn(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\[27, 26, 27\]"):
        encoder(torch.randn(2, 1, 27, 26, 27))
    with pytest.raises(ValueError, match="1 input channel"):
        encoder(torch.randn(2, 4, 27, 27, 27))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        encoder(torch.randn(1, 27, 27, 27))


def test_parameter_count_matches_table3() -> None:
    """Pins the architecture: every layer of Table 3 with the default widths, counted by hand."""
    w, hidden, out = 32, 324, 256
    stem = 27 * 1 * w + 2 * w
    block = (w * w + 27 * w * w + w * w) + 3 * 2 * w
    convs = 27 * w * 2 * w + 2 * 2 * w + 27 * 2 * w * 4 * w + 2 * 4 * w + 27 * 4 * w * 8 * w + 2 * 8 * w
    dense = 8 * w * hidden + 2 * hidden + hidden * out + out
    expected = stem + 2 * block + convs + dense
    n_encoder = count_parameters(Encoder3D())
    n_predictor = count_parameters(Predictor())
    print(f"Encoder3D parameters: {n_encoder:,}; Predictor parameters: {n_predictor:,}")
    assert n_encoder == expected == 1_389_608
    assert n_predictor == 256 * 64 + 2 * 64 + 64 * 256 + 256


def test_torchscript_round_trip(tmp_path) -> None:
    encoder = Encoder3D(in_channels=2).eval()
    scripted = torch.jit.script(encoder)
    path = tmp_path / "model.ts"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    loaded.eval()
    x = torch.randn(2, 2, 30, 27, 33)
    with torch.no_grad():
        expected = encoder(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(Exception, match="spatial size"):
        loaded(torch.randn(1, 2, 16, 16, 16))


def test_gradients_reach_encoder_and_predictor() -> None:
    model = SimSiam3D(Encoder3D()).train()
    x = torch.randn(2, 1, 27, 27, 27)
    x1, x2 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == p2.shape == z1.shape == z2.shape == (2, 256)
    SimSiamLoss()((p1, p2, z1, z2)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.predictor.parameters())


def test_embed_is_encoder_output() -> None:
    model = SimSiam3D(Encoder3D()).eval()
    x = torch.randn(2, 1, 27, 27, 27)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), model.encoder(x))


def test_simsiam_needs_feature_dim_or_predictor() -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        SimSiam3D(torch.nn.Linear(4, 4))
    model = SimSiam3D(torch.nn.Linear(4, 4), Predictor(4, 2))
    assert isinstance(model.predictor, Predictor)


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strict", [True, False])
def test_encoder_only_state_dict_loads_into_wrapper(strict: bool, tmp_path) -> None:
    trained = Encoder3D()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # make sure the weights differ from any fresh init
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)  # what models/model.pt holds
    state = torch.load(path, weights_only=True)

    model = SimSiam3D(Encoder3D())
    predictor_before = {k: v.clone() for k, v in model.predictor.state_dict().items()}
    assert not _tensors_equal(model.encoder.state_dict(), trained.state_dict())
    result = model.load_state_dict(state, strict=strict)
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    assert _tensors_equal(model.encoder.state_dict(), trained.state_dict())
    assert _tensors_equal(model.predictor.state_dict(), predictor_before)


def test_full_state_dict_loads() -> None:
    source = SimSiam3D(Encoder3D())
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(0.5).add_(0.25)
    target = SimSiam3D(Encoder3D())
    target.load_state_dict(source.state_dict())
    assert _tensors_equal(target.state_dict(), source.state_dict())


def test_wrong_keys_raise() -> None:
    model = SimSiam3D(Encoder3D())
    encoder_state = Encoder3D().state_dict()
    incomplete = dict(encoder_state)
    incomplete.pop("fc8.weight")
    with pytest.raises(RuntimeError, match="fc8.weight"):
        model.load_state_dict(incomplete, strict=True)
    extra = {**model.state_dict(), "encoder.bogus": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="bogus"):
        model.load_state_dict(extra, strict=True)
    foreign = {"conv.weight": torch.zeros(1), "head.bias": torch.zeros(1)}
    for strict in (True, False):
        with pytest.raises(KeyError, match="none of the 2 keys"):
            model.load_state_dict(foreign, strict=strict)


def test_monai_checkpoint_loader_non_strict(tmp_path) -> None:
    """MONAI Label's injection: CheckpointLoader(load_dict={"model": wrapper}, strict=False) on model.pt."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    trained = Encoder3D()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    model = SimSiam3D(Encoder3D())
    CheckpointLoader(load_path=str(path), load_dict={"model": model}, strict=False)(Engine(lambda e, b: None))
    assert _tensors_equal(model.encoder.state_dict(), trained.state_dict())
