"""Bank mode: memory bank, re-clustering, the cluster-balanced sampler, and its wiring in the training workflow."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from workflows import train_workflow  # noqa: E402

from scripts.pretrain.bank import ClusterBalancedSampler, EmbeddingBank

ROOT = Path(__file__).resolve().parent.parent


def _blob_bank(n_major: int = 90, n_minor: int = 30, seed: int = 0) -> tuple[EmbeddingBank, set[int]]:
    """A bank whose embeddings are two well-separated blobs at n_major:n_minor; returns it and the minority rows."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(2, 16)
    centre[0, 0], centre[1, 1] = 1.0, 1.0
    z = torch.cat(
        [
            centre[0] + 0.05 * torch.randn(n_major, 16, generator=g),
            centre[1] + 0.05 * torch.randn(n_minor, 16, generator=g),
        ]
    )
    ids = [f"c{i:03d}" for i in range(n_major + n_minor)]
    bank = EmbeddingBank(ids, dim=16)
    bank.update(ids, z)
    return bank, set(range(n_major, n_major + n_minor))


@pytest.mark.parametrize("strategy", ["even", "inverse"])
def test_sampler_turns_3_to_1_clusters_into_1_to_1_batches(strategy):
    bank, minority = _blob_bank()
    result = bank.recluster(k=2, seed=0)
    assert sorted(result.sizes) == [30, 90]
    sampler = ClusterBalancedSampler(bank, batch_size=6, num_batches=200, strategy=strategy, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 1200
    share = sum(i in minority for i in order) / len(order)
    assert 0.45 <= share <= 0.55, share  # random batches would hold 25% minority
    if strategy == "even":  # exactly 3 + 3 in every batch
        assert all(sum(i in minority for i in order[b : b + 6]) == 3 for b in range(0, 1200, 6))
    for b in range(0, 1200, 6):  # clusters are larger than their share: no case twice in a batch
        assert len(set(order[b : b + 6])) == 6


def test_even_sampler_uses_every_member_before_reusing_one():
    bank, minority = _blob_bank()
    bank.recluster(k=2, seed=0)
    order = list(ClusterBalancedSampler(bank, batch_size=6, num_batches=10, seed=0))  # 30 minority slots
    assert Counter(i for i in order if i in minority) == Counter({i: 1 for i in minority})


def test_sampler_before_clustering_is_a_plain_shuffle_and_unseen_cases_come_first():
    ids = [f"c{i}" for i in range(20)]
    bank = EmbeddingBank(ids, dim=4)
    first = list(ClusterBalancedSampler(bank, batch_size=4, seed=0))
    assert sorted(first) == list(range(20))  # no clustering yet: one pass over the data
    bank.update(ids[:16], torch.randn(16, 4))
    bank.recluster(k=2, seed=0)
    assert (bank.assignments[16:] == -1).all()
    order = list(ClusterBalancedSampler(bank, batch_size=4, seed=0))
    assert sorted(order[:4]) == [16, 17, 18, 19]


def test_sampler_is_deterministic_under_a_seed_and_ranks_split_global_batches():
    bank, _ = _blob_bank()
    bank.recluster(k=2, seed=0)
    a = ClusterBalancedSampler(bank, batch_size=6, seed=5)
    b = ClusterBalancedSampler(bank, batch_size=6, seed=5)
    a.set_epoch(3), b.set_epoch(3)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # a second pass within the epoch draws anew ...
    a.set_epoch(3)
    assert list(a) == first  # ... and set_epoch replays
    ranks = [ClusterBalancedSampler(bank, batch_size=3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    whole = list(ClusterBalancedSampler(bank, batch_size=6, seed=5, rank=0, world_size=1))
    r0, r1 = (list(s) for s in ranks)
    assert whole == [x for b in range(len(r0) // 3) for x in r0[3 * b : 3 * b + 3] + r1[3 * b : 3 * b + 3]]


def test_recluster_choice_of_k_by_silhouette_and_state_round_trip():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:4] * 3
    z = torch.cat([c + 0.05 * torch.randn(10, 8, generator=g) for c in centres])
    ids = [str(i) for i in range(40)]
    bank = EmbeddingBank(ids, dim=8)
    bank.update(ids, z)
    result = bank.recluster(k=3, seed=0, k_range=[2, 6])
    assert result.k == 4 and sorted(result.sizes) == [10, 10, 10, 10]
    assert max(result.silhouette, key=result.silhouette.get) == 4
    other = EmbeddingBank(ids, dim=8)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.assignments, bank.assignments) and torch.equal(other.z, bank.z)
    with pytest.raises(ValueError, match="different training datalist"):
        EmbeddingBank(ids[:5], dim=8).load_state_dict(bank.state_dict())


def test_bank_rejects_unknown_ids_bad_shapes_and_duplicates():
    bank = EmbeddingBank(["a", "b"], dim=4)
    with pytest.raises(KeyError, match="'zz'"):
        bank.update(["a", "zz"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        bank.update(["a"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="duplicate"):
        EmbeddingBank(["a", "a"])
    with pytest.raises(RuntimeError, match="no embeddings yet"):
        bank.recluster()


def _workflow(tmp: Path, datalist: Path, **override) -> ConfigWorkflow:
    return train_workflow(tmp, datalist, **{"epochs": 2, "batch_size": 4, "knn_monitor": False, **override})


def test_bank_mode_adds_no_encoder_pass_logs_diagnostics_and_resumes_exactly(tiny_cohort, tmp_path):
    wf = _workflow(tmp_path / "bank", tiny_cohort, **{"balance#mode": "bank"})
    wf.initialize()
    calls = []
    wf.trainer.network.encoder.register_forward_hook(lambda *a: calls.append(1))
    wf.run()
    wf.finalize()
    assert len(calls) == 2 * 3 * 2  # two views per step, 3 steps per epoch, 2 epochs: what plain training does
    assert bool(wf.trainer.balancing.bank.seen.all())
    metrics = wf.trainer.state.metrics
    for key in (
        "balance/bank_ari",
        "balance/bank_nmi",
        "balance/minority_share_bank_batch",
        "balance/bank_cluster_size_0",
    ):
        assert key in metrics, key
    ckpt = torch.load(tmp_path / "bank" / "models" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert "bank" in ckpt and torch.equal(ckpt["bank"]["assignments"], wf.trainer.balancing.bank.assignments)

    split = tmp_path / "split"
    first = _workflow(split, tiny_cohort, **{"balance#mode": "bank", "train#trainer#max_epochs": 1})
    first.initialize(), first.run(), first.finalize()
    second = _workflow(split, tiny_cohort, **{"balance#mode": "bank"}, resume=True)
    second.initialize(), second.run(), second.finalize()
    a = torch.load(tmp_path / "bank" / "models" / "model.pt", weights_only=True)
    b = torch.load(split / "models" / "model.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")
