"""Time ``scripts.pretrain.balance.kmeans`` (k=3) on batches of 256-d embeddings, the RE/SE module's main cost.

The paper reports +20% training time for RE/SE and attributes it mostly to k-means; this shows what one k-means
call costs at the batch size the method uses (N = k*q = 30) and at 10x / 100x that.

    python benchmarks/kmeans_time.py [--sizes 30 300 3000] [--repeats 20] [--device cpu] [--out PATH]

Prints a table and writes JSON (default ``benchmarks/results/kmeans_time.json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


DATA_KINDS = ("clustered", "unclustered")


def _embeddings(n: int, dim: int, k: int, kind: str, seed: int, device: str) -> torch.Tensor:
    """``clustered``: imbalanced mixture of k Gaussians (sizes ~ 3:1:...), like embeddings of an imbalanced cohort;
    ``unclustered``: one isotropic Gaussian (early training / no structure), where Lloyd needs the most iterations."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g) * (2.0 if kind == "clustered" else 0.0)
    probs = torch.tensor([3.0] + [1.0] * (k - 1))
    labels = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    return (means[labels] + torch.randn(n, dim, generator=g)).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_kmeans(n: int, dim: int, k: int, kind: str, repeats: int, warmup: int, device: str) -> dict:
    """Median/min wall time of one kmeans call; each repeat uses a fresh seed (data fixed per N)."""
    from scripts.pretrain.balance import kmeans

    x = _embeddings(n, dim, k, kind, seed=n, device=device)
    for s in range(warmup):
        kmeans(x, k, seed=s)
    _sync(device)
    times, iters = [], []
    for s in range(repeats):
        t0 = time.perf_counter()
        res = kmeans(x, k, seed=s)
        _sync(device)
        times.append(time.perf_counter() - t0)
        iters.append(res.n_iter)
    return {
        "data": kind,
        "n": n,
        "dim": dim,
        "k": k,
        "repeats": repeats,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "mean_lloyd_iterations": statistics.mean(iters),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 300, 3000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kmeans_time.json")
    args = parser.parse_args(argv)

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.io_utils import atomic_write_json

    rows = [
        time_kmeans(n, args.dim, args.k, kind, args.repeats, args.warmup, args.device)
        for kind in DATA_KINDS
        for n in args.sizes
    ]
    print(f"kmeans k={args.k}, D={args.dim}, device={args.device}, torch threads={torch.get_num_threads()}")
    print(f"{'data':>12} {'N':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'Lloyd it':>9}")
    for r in rows:
        print(
            f"{r['data']:>12} {r['n']:>6} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['max_ms']:>8.2f} "
            f"{r['mean_lloyd_iterations']:>9.1f}"
        )
    report = {
        "benchmark": "kmeans_time",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
