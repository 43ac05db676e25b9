"""RE/SE module core (scripts/pretrain/balance.py): k-means, RE weights, SE selection, degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from scripts.pretrain.balance import balance_step, cluster_sizes, kmeans, re_weights, se_select


def _blobs(sizes: list[int], dim: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs (unit variance) whose means sit ``sep`` apart along distinct axes; rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, n in enumerate(sizes):
        mean = torch.zeros(dim)
        mean[label % dim] = sep * label
        xs.append(torch.randn(n, dim, generator=g) + mean)
        ys.append(torch.full((n,), label))
    perm = torch.randperm(sum(sizes), generator=g)
    return torch.cat(xs)[perm], torch.cat(ys)[perm]


# ---------------------------------------------------------------- RE


def test_re_weights_match_inverse_frequency_rescaled():
    a = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    w = re_weights(a)
    # N / f_j = 7/4, 7/2, 7/1; divided by the minimum 7/4 -> 1, 2, 4
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0]
    assert w.dtype == torch.float32
    raw = torch.tensor([7 / 4] * 4 + [7 / 2] * 2 + [7.0])
    assert torch.allclose(w, raw / raw.min())


def test_re_weights_arbitrary_labels_and_single_cluster():
    w = re_weights(torch.tensor([5, 9, 5, 5, 9, 9, 9, 1]))  # sizes: 5 -> 3, 9 -> 4, 1 -> 1
    assert torch.allclose(w, torch.tensor([4 / 3, 1, 4 / 3, 4 / 3, 1, 1, 1, 4]))
    assert re_weights(torch.zeros(6, dtype=torch.long)).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="integer"):
        re_weights(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        re_weights(torch.zeros(2, 3, dtype=torch.long))


def test_cluster_sizes():
    assert cluster_sizes(torch.tensor([0, 0, 2]), 4) == [2, 0, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cluster_sizes(torch.tensor([0, 2]), 2)


# ---------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_blobs():
    x, y = _blobs([20, 12, 8], dim=16, sep=12.0, seed=3)
    res = kmeans(x, 3, seed=0)
    assert res.centroids.shape == (3, 16) and res.centroids.dtype == torch.float32
    assert res.assignments.dtype == torch.long and res.assignments.shape == (40,)
    assert adjusted_rand_score(y.numpy(), res.assignments.numpy()) == 1.0
    assert sorted(cluster_sizes(res.assignments, 3)) == [8, 12, 20]
    for j in range(3):  # centroids are the member means
        assert torch.allclose(res.centroids[j], x[res.assignments == j].mean(0), atol=1e-5)
    expected = float(((x - res.centroids[res.assignments]) ** 2).sum())
    assert res.inertia == pytest.approx(expected, rel=1e-5)
    assert 1 <= res.n_iter <= 50


def test_kmeans_deterministic_under_seed_and_varies_across_seeds():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, generator=g)  # uniform square: no true clusters, many local optima
    a = kmeans(x, 3, seed=7)
    b = kmeans(x, 3, seed=7)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    c = kmeans(x, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.assignments, c.assignments)
    partitions = [kmeans(x, 3, seed=s).assignments.numpy() for s in range(10)]
    aris = [adjusted_rand_score(partitions[0], p) for p in partitions[1:]]
    assert min(aris) < 0.99


def test_kmeans_fewer_points_than_clusters():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    res = kmeans(x, 3)
    assert res.centroids.shape == (2, 2)
    assert sorted(res.assignments.tolist()) == [0, 1]
    assert res.inertia == 0.0


def test_kmeans_k_above_distinct_points_with_duplicates():
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    res = kmeans(x, 5)
    assert res.centroids.shape == (2, 2)  # k_eff = number of distinct rows
    assert cluster_sizes(res.assignments, 2) in ([3, 1], [1, 3])
    assert torch.isfinite(res.centroids).all()


def test_kmeans_identical_points_one_cluster_no_nan():
    x = torch.full((10, 8), 0.1)
    res = kmeans(x, 3)
    assert res.centroids.shape == (1, 8)
    assert torch.equal(res.centroids, x[:1])
    assert res.assignments.tolist() == [0] * 10
    assert res.inertia == 0.0


def test_kmeans_rejects_bad_input():
    x = torch.randn(10, 4)
    x[2, 1] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(ValueError, match="2 of 10 rows"):
        kmeans(x, 3)
    with pytest.raises(ValueError, match="positive integer"):
        kmeans(torch.randn(5, 2), 0)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="at least one row"):
        kmeans(torch.zeros(0, 4), 2)
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(torch.randn(5, 2), 2, init=torch.zeros(3, 2))


def test_kmeans_reseeds_empty_cluster_at_farthest_point():
    # 1-D points: blob A {0,1,2}, blob B {10,11,12} plus an outlier 20. The third initial centroid (1000) attracts
    # nothing; it must be re-seeded at the point farthest from its own centroid, the outlier.
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 20.0])[:, None]
    init = torch.tensor([[1.0], [13.25], [1000.0]])
    res = kmeans(x, 3, init=init)
    assert res.n_reseeds == 1
    assert res.assignments.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert res.centroids.flatten().tolist() == [1.0, 11.0, 20.0]
    assert res.inertia == pytest.approx(4.0)


# ---------------------------------------------------------------- SE


def test_se_selection_balances_imbalanced_blobs():
    m, n_seeds = 6, 50
    se_balance, se_minor, rand_minor = [], [], []
    for seed in range(n_seeds):
        x, y = _blobs([22, 8], dim=16, sep=6.0, seed=100 + seed)  # 2.75:1, means 6 sd apart
        res = balance_step(x, "se", k=3, m=m, seed=seed)
        assert not res.selection.fallback
        idx = res.indices
        assert idx.shape == (m,) and len(set(idx.tolist())) == m
        minor = int((y[idx] == 1).sum())
        se_balance.append(min(minor, m - minor) / (m // 2))
        se_minor.append(minor / m)
        rand = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:m]
        rand_minor.append(float((y[rand] == 1).float().mean()))
    assert sum(se_balance) / n_seeds >= 0.9
    assert sum(se_minor) / n_seeds == pytest.approx(0.5, abs=0.05)
    assert 0.15 < sum(rand_minor) / n_seeds < 0.4  # random batches stay ~27% minority


def test_se_alternating_picks_split_shared_neighbours():
    x = torch.tensor([0.0, 0.45, 0.55, 1.0, 3.0, -3.0])[:, None]
    assignments = torch.tensor([0, 0, 0, 0, 1, 1])  # cluster 1 is the smaller: its centroid picks first
    centroids = torch.tensor([[0.0], [1.0]])
    sel = se_select(x, assignments, centroids, 6)
    assert sel.pair == (1, 0) and not sel.fallback
    # picks alternate: c1 -> 1.0, c0 -> 0.0, c1 -> 0.55, c0 -> 0.45, c1 -> 3.0, c0 -> -3.0
    assert sel.indices.tolist() == [3, 2, 4, 0, 1, 5]


def test_se_uses_farthest_non_empty_pair():
    x = torch.tensor([0.0, 0.1, 1.0, 1.1, 10.0, 10.1])[:, None]
    assignments = torch.tensor([0, 0, 1, 1, 2, 2])
    centroids = torch.tensor([[0.05], [1.05], [10.05], [-500.0]])  # cluster 3 is empty: never chosen
    sel = se_select(x, assignments, centroids, 2)
    assert sel.pair == (0, 2)
    assert sorted(sel.indices.tolist()) == [0, 4]


def test_se_rejects_bad_m():
    x = torch.randn(8, 4)
    res = kmeans(x, 3)
    for bad in (3, 0, 10, -2):
        with pytest.raises(ValueError, match="even number"):
            se_select(x, res.assignments, res.centroids, bad)


def test_se_collapsed_embeddings_fall_back_to_seeded_random_subset():
    x = torch.ones(30, 16) * 0.5
    a = balance_step(x, "se", k=3, m=6, seed=4)
    b = balance_step(x, "se", k=3, m=6, seed=4)
    assert a.selection.fallback and a.selection.pair is None
    assert a.indices.shape == (6,) and len(set(a.indices.tolist())) == 6
    assert torch.equal(a.indices, b.indices)
    assert a.weights.tolist() == [1.0] * 6
    assert a.cluster_sizes == [30]


# ---------------------------------------------------------------- balance_step


def test_balance_step_modes():
    x, _ = _blobs([20, 10], dim=8, sep=10.0, seed=1)
    none = balance_step(x, "none")
    assert none.indices.tolist() == list(range(30)) and none.weights.tolist() == [1.0] * 30
    assert none.cluster_sizes == [] and none.kmeans is None
    re = balance_step(x, "re", k=3, seed=2)
    assert re.indices.tolist() == list(range(30))
    assert torch.equal(re.weights, re_weights(re.kmeans.assignments))
    assert sum(re.cluster_sizes) == 30 and len(re.cluster_sizes) == 3
    assert float(re.weights.min()) == 1.0
    se = balance_step(x, "se", k=3, m=6, seed=2)
    assert se.indices.shape == (6,) and se.weights.tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="mode"):
        balance_step(x, "reweight")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 30 rows"):
        balance_step(bad, "re")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_input_device_cuda():
    x, y = _blobs([20, 12, 8], dim=16, sep=12.0, seed=3)
    cpu = kmeans(x, 3, seed=0)
    gpu = kmeans(x.cuda(), 3, seed=0)
    assert gpu.centroids.is_cuda and gpu.assignments.is_cuda
    assert adjusted_rand_score(cpu.assignments.numpy(), gpu.assignments.cpu().numpy()) == 1.0
    for mode in ("none", "re", "se"):
        res = balance_step(x.cuda(), mode, k=3, m=6, seed=0)
        assert res.indices.is_cuda and res.weights.is_cuda
