"""Balancing strategies: the registry, the hooks as the real trainer calls them, and their one place in train.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import Compose, CopyItemsd, RandFlipd

from scripts.pretrain import strategies
from scripts.pretrain.balance import balance_step
from scripts.pretrain.bank import ClusterBalancedSampler
from scripts.pretrain.losses import weighted_mean
from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D
from scripts.pretrain.simsiam_trainer import SimSiamTrainer
from scripts.pretrain.strategies import BalanceSettings, NoBalancing, Strategy, make_strategy

ROOT = Path(__file__).resolve().parent.parent


def _batches(n_batches: int, size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.rand(size, 1, 27, 27, 27, generator=g),
            "image_2": torch.rand(size, 1, 27, 27, 27, generator=g),
            "id": [f"case{b * size + i}" for i in range(size)],
        }
        for b in range(n_batches)
    ]


def _train(strategy: Strategy, batches: list[dict], view_transform=None) -> tuple[SimSiamTrainer, list[dict]]:
    """Two epochs of the real SimSiamTrainer (a narrow encoder on 27³ volumes) over in-memory batches; one thread,
    which is faster than two at this size."""
    torch.manual_seed(0)
    network = SimSiam3D(Encoder3D(width=2, out_dim=16, hidden_dim=16), Predictor(dim=16, hidden_dim=8))
    trainer = SimSiamTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=batches,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        balancing=strategy,
        view_transform=view_transform,
        cpu_bf16=False,
    )
    outs: list[dict] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: outs.append({**e.state.output, "epoch": e.state.epoch, "iteration": e.state.iteration}),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    return trainer, outs


def test_registry_lists_each_mode_once_and_plain_is_an_alias_of_none():
    assert strategies.modes() == ("none", "re", "se", "bank")
    assert strategies.strategy_class("plain") is NoBalancing is strategies.strategy_class("none")
    assert make_strategy("plain").settings.mode == "none"
    assert isinstance(make_strategy("bank", case_ids=["a", "b"], dim=4), strategies.BankStrategy)
    with pytest.raises(ValueError, match=r"balance mode 'reweight' is not one of \('none', 're', 'se', 'bank'\)"):
        make_strategy("reweight")
    with pytest.raises(ValueError, match=r"SE needs m <= k\*q candidates"):
        make_strategy("se", k=2, q=2, m=6)
    with pytest.raises(ValueError, match="'re' is taken"):
        strategies.register("re")(type("Other", (Strategy,), {}))


def test_a_new_strategy_plugs_in_by_registering_and_the_trainer_calls_its_hooks_in_order():
    calls: list[tuple[str, int]] = []

    class DropFirst(Strategy):
        """Weight 0 for each batch's first sample (a strategy the trainer has never heard of)."""

        def attach(self, ctx):
            calls.append(("attach", ctx.epoch))

        def epoch_started(self, ctx):
            super().epoch_started(ctx)
            calls.append(("epoch_started", ctx.epoch))

        def before_step(self, ctx, batch):
            calls.append(("before_step", ctx.iteration))
            return batch

        def after_forward(self, ctx, batch, z1, z2):
            calls.append(("after_forward", ctx.iteration))

        def weights(self, ctx, batch, z1, z2):
            calls.append(("weights", ctx.iteration))
            self.record("dropped", 1)
            return torch.tensor([0.0] + [1.0] * (z1.shape[0] - 1))

        def epoch_completed(self, ctx):
            calls.append(("epoch_completed", ctx.epoch))

        def diagnostics(self):
            return {"balance/dropped": float(len(self._diag.get("dropped", [])))}

    strategies.register("drop_first")(DropFirst)
    try:
        assert strategies.modes()[-1] == "drop_first" and strategies.strategy_class("drop_first") is DropFirst
        trainer, outs = _train(make_strategy("drop_first"), _batches(1, 4))
    finally:
        strategies.STRATEGIES.pop("drop_first")
    step = ["before_step", "after_forward", "weights"]
    assert [c for c, _ in calls] == ["attach"] + (["epoch_started"] + step + ["epoch_completed"]) * 2
    for out in outs:  # the trainer trains on the strategy's weights
        torch.testing.assert_close(out["loss"], weighted_mean(out["per_sample"], out["weights"]))
        assert out["weights"][0] == 0
    assert trainer.state.metrics["balance/dropped"] == 1.0  # the epoch's diagnostics reach the epoch metrics


def test_re_weights_only_after_the_warm_up_and_exactly_as_balance_step():
    strategy = make_strategy("re", k=2, warmup_epochs=1, seed=7, labels={"case0": 1, "case1": 0})
    _, outs = _train(strategy, _batches(1, 4))
    assert [o["weights"] is None for o in outs] == [True, False]
    for out in outs[1:]:
        emb = (out["z1"] + out["z2"]) / 2
        expected = balance_step(emb, "re", k=2, seed=7 * 1_000_003 + out["iteration"]).weights
        torch.testing.assert_close(out["weights"], expected)
    metrics = strategy.diagnostics()
    assert metrics["balance/cluster_size_0"] > 0 and "balance/mean_re_weight_class_1" in metrics


def test_se_trains_on_m_of_the_candidates_chosen_by_balance_step_after_the_warm_up():
    view = Compose([CopyItemsd(keys="image", names=["image_2"]), RandFlipd(keys="image_2", prob=0.5, spatial_axis=0)])
    strategy = make_strategy("se", k=2, q=4, m=4, warmup_epochs=1, seed=3)
    assert strategy.loader_batch_size(6) == 8 and strategy.loader_transforms(["views"]) == []
    with pytest.raises(ValueError, match="pass view_transform"):
        _train(make_strategy("se", k=2, q=4, m=4), _batches(1, 8))
    chosen: list[list[int]] = []
    original = strategies.balance_step

    def spy(emb, mode, **kw):
        res = original(emb, mode, **kw)
        chosen.append(res.indices.tolist())
        return res

    strategies.balance_step = spy
    try:
        _, outs = _train(strategy, _batches(1, 8), view_transform=view)
    finally:
        strategies.balance_step = original
    assert [o["z1"].shape[0] for o in outs] == [4, 4]  # m volumes trained per step
    assert len(chosen) == 1 and len(set(chosen[0])) == 4  # one SE decision in the epoch after the warm-up, none in it
    assert outs[0]["weights"] is None and outs[1]["weights"] is None  # SE selects, it does not re-weight


def test_train_json_builds_each_strategy_in_one_place(tiny_cohort, tmp_path):
    for name in ("train.json", "multi_gpu_train.json"):  # the config branches on no mode name
        text = (ROOT / "configs" / name).read_text(encoding="utf-8")
        assert text.count("@balance#mode") == (1 if name == "train.json" else 0), name
    for mode in strategies.modes():
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "train.json"))
        parser.update(
            {
                "bundle_root": str(tmp_path),
                "datalist": str(tiny_cohort),
                "cache_dir": str(tmp_path / "cache"),
                "batch_size": 4,
                "balance#mode": mode,
                "balance#q": 2,
                "balance#re_embeddings": "original",
            }
        )
        balancing = parser.get_parsed_content("balancing")
        assert type(balancing) is strategies.STRATEGIES[mode]
        assert parser.get_parsed_content("train#loader_batch_size") == (6 if mode == "se" else 4)
        assert isinstance(parser.get_parsed_content("train#sampler"), ClusterBalancedSampler) == (mode == "bank")
        assert (parser.get_parsed_content("train#random_transforms") == []) == (mode == "se")
        copies = list(parser.get_parsed_content("train#copy_views").names)
        assert copies == (["image_2", "image_0"] if mode == "re" else ["image_2"])
        assert set(balancing.checkpoint_objects()) == ({"bank"} if mode == "bank" else set())


def test_bank_strategy_state_round_trips_through_a_checkpoint_dict():
    ids = [f"c{i}" for i in range(6)]
    a = make_strategy("bank", case_ids=ids, dim=4, k=2)
    a.bank.update(ids, torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    a.bank.recluster(2, seed=0)
    b = make_strategy("bank", case_ids=ids, dim=4, k=2)
    b.load_state_dict(a.checkpoint_objects()["bank"].state_dict())
    assert torch.equal(b.bank.assignments, a.bank.assignments) and torch.equal(b.bank.z, a.bank.z)
    assert BalanceSettings(mode="plain").mode == "none"


def test_se_from_stored_embeddings_embeds_each_candidate_once_per_epoch_and_selects_like_se_at_first():
    """``balance#se_source bank``: the first SE step embeds every (new) candidate, so it selects exactly as the
    paper's SE; later draws of a case in the same epoch reuse its stored embedding (no forward pass)."""
    batches = _batches(2, 8)
    batches = batches + [dict(b) for b in batches]  # every case drawn twice an epoch
    ids = [i for b in batches[:2] for i in b["id"]]
    runs = {}
    for source in ("forward", "bank"):
        strategy = make_strategy("se", k=2, q=4, m=4, warmup_epochs=1, seed=3, se_source=source, case_ids=ids, dim=16)
        view = Compose(
            [CopyItemsd(keys="image", names=["image_2"]), RandFlipd(keys="image_2", prob=0.5, spatial_axis=0)]
        ).set_random_state(0)  # the same views in both runs
        chosen: list[list[int]] = []
        original = strategies.balance_step

        def spy(emb, mode, original=original, chosen=chosen, **kw):
            res = original(emb, mode, **kw)
            chosen.append(res.indices.tolist())
            return res

        strategies.balance_step = spy
        try:
            trainer, outs = _train(strategy, batches, view_transform=view)
        finally:
            strategies.balance_step = original
        runs[source] = (strategy, chosen, trainer)
    fwd, bank = runs["forward"], runs["bank"]
    assert bank[1][0] == fwd[1][0]  # the first active step: every candidate embedded fresh, the same choice
    assert bank[0].store.forwards == len(ids)  # 4 active steps of 8 candidates, each case embedded once
    assert bank[2].state.metrics["balance/se_embedded_share"] == pytest.approx(0.5)  # 2 of 4 steps embed
    assert "balance/se_embedded_share" not in fwd[2].state.metrics
    assert set(bank[0].checkpoint_objects()) == {"se_store"} and fwd[0].checkpoint_objects() == {}
    copy = make_strategy("se", k=2, q=4, m=4, se_source="bank", case_ids=ids, dim=16)
    copy.load_state_dict(bank[0].state_dict())
    assert torch.equal(copy.store.z, bank[0].store.z) and torch.equal(copy.store.epoch_of, bank[0].store.epoch_of)
    with pytest.raises(ValueError, match="se_source must be one of"):
        make_strategy("se", se_source="cache")
    with pytest.raises(ValueError, match="different training datalist"):
        make_strategy("se", se_source="bank", case_ids=ids[:3], dim=16).load_state_dict(bank[0].state_dict())
