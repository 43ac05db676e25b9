"""Label-free imbalance handling (the paper's RE/SE module): k-means on a batch's embeddings, then either
re-weight samples by inverse cluster frequency (RE) or select a batch balanced between the two farthest clusters (SE).

Plain PyTorch, no Ignite and no config dicts. Everything runs on the device of the input tensors; on CPU the
arithmetic is done in float64 (cheap at these sizes, and it makes distances and ties reproducible), elsewhere in
float32. Randomness (k-means++ seeding, the SE fallback order) comes from a seeded CPU ``torch.Generator``, so a
seed gives the same result on any device up to floating-point ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BALANCE_MODES = ("none", "re", "se")


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    ``centroids`` has ``k_eff = min(k, number of distinct rows of x)`` rows; every cluster is non-empty and each
    centroid is the mean of its members. ``n_reseeds`` counts empty clusters re-seeded during Lloyd iterations.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    n_iter: int
    n_reseeds: int = 0


@dataclass(frozen=True)
class SESelection:
    """Outcome of :func:`se_select`: ``indices`` [m] into the batch (the first m/2 chosen near centroid
    ``pair[0]``, the smaller of the two clusters, the next m/2 near ``pair[1]``); ``fallback`` is True (and ``pair``
    None) when there were not two distinct clusters and the batch is a seeded random subset instead."""

    indices: torch.Tensor
    pair: tuple[int, int] | None
    fallback: bool


@dataclass(frozen=True)
class BalanceResult:
    """Outcome of :func:`balance_step`. ``weights[t]`` is the loss weight of sample ``indices[t]``.

    ``none``: all indices, weights 1. ``re``: all indices, RE weights. ``se``: the m selected indices, weights 1.
    ``cluster_sizes`` is empty for ``none`` (no clustering is run).
    """

    mode: str
    indices: torch.Tensor
    weights: torch.Tensor
    cluster_sizes: list[int] = field(default_factory=list)
    kmeans: KMeansResult | None = None
    selection: SESelection | None = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.device.type == "cpu" else torch.float32


def _check_embeddings(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got {shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {list(x.shape)}")
    finite_rows = torch.isfinite(x).all(dim=1)
    if not bool(finite_rows.all()):
        bad = (~finite_rows).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} has {len(bad)} of {x.shape[0]} rows with NaN/Inf values (rows {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}); the encoder output is not finite"
        )


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, K] squared Euclidean distances, computed from differences (not the expanded formula) so that distinct
    points never get distance 0 through cancellation."""
    return torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").square()


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: first centre uniform, each next one drawn with probability proportional to D(x)^2.

    Callers guarantee ``k <= number of distinct rows``, so the D^2 mass is positive at every draw and the k
    centres are distinct points.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [first]
    d2 = _sq_dists(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        probs = d2.to("cpu", torch.float64)
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        centres.append(nxt)
        d2 = torch.minimum(d2, _sq_dists(x, x[nxt : nxt + 1]).squeeze(1))
    return x[centres].clone()


def _reseed_empty(a: torch.Tensor, d2: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Give every empty cluster one point: the point farthest from its own assigned centroid (the one contributing
    most to the inertia), taken only from clusters that keep at least one member. Returns (assignments, n_reseeded).

    With ``k <= number of distinct points`` such a point always exists and lies at a positive distance from its
    old centroid, so the re-seeded cluster is genuinely new.
    """
    counts = torch.bincount(a, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return a, 0
    a = a.clone()
    own = d2.gather(1, a[:, None]).squeeze(1).clone()
    for j in empty:
        movable = counts[a] > 1
        cand = torch.where(movable, own, torch.full_like(own, -1.0))
        i = int(cand.argmax())
        counts[a[i]] -= 1
        counts[j] += 1
        a[i] = j
        own[i] = -1.0  # never move the same point twice
    return a, len(empty)


def _cluster_means(x: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, a, x)
    counts = torch.bincount(a, minlength=k).to(x.dtype).clamp_min(1)
    return sums / counts[:, None]


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """k-means (k-means++ seeding + Lloyd iterations) of the rows of ``x`` [N, D].

    Rules, chosen so that downstream code can simply use ``centroids.shape[0]``:

    * ``k_eff = min(k, number of distinct rows)`` clusters are fitted; asking for more clusters than there are
      distinct points (N < k, duplicates) never yields empty or duplicated clusters. All rows identical ->
      one cluster, everything assigned to 0, centroid = that row, inertia 0 (no NaN).
    * Lloyd stops after ``n_iter`` iterations, or once the largest centroid shift is <= ``tol`` times the data's
      RMS spread around its mean (scale-free, so it works for any embedding norm).
    * A cluster that empties during Lloyd is re-seeded with the point farthest from its own centroid (taken from a
      cluster that keeps members); ``n_reseeds`` counts these events. Returned clusters are never empty.
    * The returned centroids are the means of the returned assignments; ``inertia`` is the sum of squared
      distances of the points to their assigned centroid.
    * ``generator`` (a CPU ``torch.Generator``) overrides ``seed``; ``init`` [k, D] replaces k-means++ seeding with
      given initial centroids (used to test re-seeding; must have exactly ``k_eff`` rows).

    Raises ``ValueError`` for k < 1, a non-2-D or empty ``x``, or rows with NaN/Inf (the message gives the count).
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    _check_embeddings(x)
    out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    xc = x.detach().to(_compute_dtype(x))
    n = xc.shape[0]
    n_distinct = int(torch.unique(xc, dim=0).shape[0])
    k_eff = min(int(k), n_distinct)

    if k_eff == 1:
        centroid = xc.mean(dim=0, keepdim=True)
        if n_distinct == 1:
            centroid = xc[:1].clone()  # exact, avoids rounding of the mean of identical rows
        inertia = float(_sq_dists(xc, centroid).sum())
        assignments = torch.zeros(n, dtype=torch.long, device=x.device)
        return KMeansResult(centroid.to(out_dtype), assignments, inertia, 0)

    if init is not None:
        if init.dim() != 2 or init.shape != (k_eff, xc.shape[1]):
            raise ValueError(f"init must have shape [{k_eff}, {xc.shape[1]}] (k_eff x D), got {list(init.shape)}")
        c = init.detach().to(device=xc.device, dtype=xc.dtype).clone()
    else:
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        c = _kmeans_pp(xc, k_eff, generator)

    spread = float(xc.sub(xc.mean(dim=0)).square().sum(dim=1).mean().sqrt())
    threshold = tol * spread
    n_reseeds, iterations = 0, 0
    a = torch.zeros(n, dtype=torch.long, device=xc.device)
    while iterations < n_iter:
        iterations += 1
        d2 = _sq_dists(xc, c)
        a = d2.argmin(dim=1)
        a, reseeded = _reseed_empty(a, d2, k_eff)
        n_reseeds += reseeded
        new_c = _cluster_means(xc, a, k_eff)
        shift = float((new_c - c).norm(dim=1).max())
        c = new_c
        if shift <= threshold:
            break
    inertia = float((xc - c[a]).square().sum())
    return KMeansResult(c.to(out_dtype), a, inertia, iterations, n_reseeds)


def cluster_sizes(assignments: torch.Tensor, k: int) -> list[int]:
    """Members per cluster 0..k-1 (zeros included), for logging and checks; raises if a label is outside [0, k)."""
    a = assignments.flatten()
    if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k):
        raise ValueError(f"assignments must lie in [0, {k}), got range [{int(a.min())}, {int(a.max())}]")
    return torch.bincount(a.long(), minlength=k).tolist()


def re_weights(assignments: torch.Tensor) -> torch.Tensor:
    """RE: a sample of cluster j gets N / f_j (f_j = size of cluster j in this batch), rescaled so that the
    smallest weight is exactly 1 -- i.e. f_max / f_j. Rare clusters count more in the loss. Float32, [N]."""
    if assignments.dim() != 1 or assignments.numel() == 0:
        raise ValueError(f"assignments must be a non-empty 1-D tensor, got shape {list(assignments.shape)}")
    if assignments.is_floating_point() or assignments.is_complex():
        raise ValueError(f"assignments must hold integer cluster labels, got dtype {assignments.dtype}")
    _, inverse, counts = torch.unique(assignments, return_inverse=True, return_counts=True)
    f = counts[inverse].to(torch.float64)
    n = float(assignments.numel())
    w = n / f
    return (w / w.min()).to(torch.float32)


def _seeded_subset(n: int, m: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:m].to(device)


def se_select(
    x: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor, m: int, *, seed: int = 0
) -> SESelection:
    """SE: pick the two non-empty clusters whose centroids are farthest apart (Euclidean) and take the m/2 samples
    nearest to each centroid, as the paper's balanced new batch.

    Nearness is measured over ALL samples, not only cluster members (the paper's "nearest sample points centred on
    each centroid"), so a small cluster still contributes m/2 samples. The two centroids pick alternately, one
    sample at a time, each its nearest not-yet-taken sample, so shared neighbours are split instead of one centroid
    taking them all; the centroid of the smaller cluster picks first (ties: lower index). No sample appears twice.

    Fallback: with fewer than two non-empty clusters, or all centroids at the same point (collapsed embeddings),
    no pair exists; the result is then the first m of a permutation seeded by ``seed`` with ``fallback=True``.

    Raises ``ValueError`` if m is not a positive even number <= N, or shapes disagree.
    """
    _check_embeddings(x)
    n = x.shape[0]
    if int(m) != m or m < 2 or m % 2 or m > n:
        raise ValueError(f"m must be a positive even number <= N={n}, got {m!r}")
    m = int(m)
    if assignments.shape != (n,):
        raise ValueError(f"assignments must have shape [{n}], got {list(assignments.shape)}")
    if centroids.dim() != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must be [k, {x.shape[1]}], got {list(centroids.shape)}")
    k = centroids.shape[0]
    dtype = _compute_dtype(x)
    xc = x.detach().to(dtype)
    cc = centroids.detach().to(device=xc.device, dtype=dtype)
    sizes = torch.tensor(cluster_sizes(assignments.to("cpu"), k))
    live = (sizes > 0).nonzero().flatten()

    if live.numel() < 2:
        return SESelection(_seeded_subset(n, m, seed, x.device), None, True)
    cd = torch.cdist(cc[live], cc[live], compute_mode="donot_use_mm_for_euclid_dist").to("cpu")
    flat = int(torch.triu(cd, diagonal=1).flatten().argmax())
    r, s = divmod(flat, live.numel())
    if not bool(cd[r, s] > 0):
        return SESelection(_seeded_subset(n, m, seed, x.device), None, True)
    i, j = int(live[r]), int(live[s])
    if int(sizes[j]) < int(sizes[i]):
        i, j = j, i

    orders = _sq_dists(xc, cc[[i, j]]).argsort(dim=0, stable=True).T.to("cpu").tolist()
    taken: set[int] = set()
    picks: list[list[int]] = [[], []]
    pos = [0, 0]
    for step in range(m):
        side = step % 2
        while orders[side][pos[side]] in taken:
            pos[side] += 1
        idx = orders[side][pos[side]]
        taken.add(idx)
        picks[side].append(idx)
    indices = torch.tensor(picks[0] + picks[1], dtype=torch.long, device=x.device)
    return SESelection(indices, (i, j), False)


def balance_step(embeddings: torch.Tensor, mode: str, k: int = 3, m: int = 6, seed: int = 0) -> BalanceResult:
    """One RE/SE decision for a batch of N embeddings [N, D] (the training engine calls this every step).

    ``none``: every sample, weight 1, no clustering. ``re``: k-means then RE weights for every sample.
    ``se``: k-means then SE selection of m samples, weight 1 each. ``seed`` drives k-means++ and the SE fallback;
    vary it per step (e.g. base seed + iteration) so that steps do not share one initialisation.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"mode must be one of {BALANCE_MODES}, got {mode!r}")
    _check_embeddings(embeddings, "embeddings")
    n, device = embeddings.shape[0], embeddings.device
    if mode == "none":
        return BalanceResult(mode, torch.arange(n, device=device), torch.ones(n, device=device))
    if k > n:  # k-means would quietly fit n singleton clusters: RE weights all 1, SE pairing two single points
        raise ValueError(
            f"{mode.upper()} with k={k} clusters needs at least k embeddings, the batch has {n}: lower balance#k "
            "or raise balance#q (SE) / batch_size (RE)"
        )
    km = kmeans(embeddings, k, seed=seed)
    sizes = cluster_sizes(km.assignments, km.centroids.shape[0])
    if mode == "re":
        return BalanceResult(mode, torch.arange(n, device=device), re_weights(km.assignments), sizes, km)
    sel = se_select(embeddings, km.assignments, km.centroids, m, seed=seed)
    return BalanceResult(mode, sel.indices, torch.ones(m, device=device), sizes, km, sel)
