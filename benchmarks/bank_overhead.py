"""Cost of bank mode over plain 3DSiam: the target is <= 2% of a plain training step.

Bank mode adds, per step, one copy of the step's own embeddings into the memory bank (no extra forward pass) and,
per epoch, one k-means over the whole bank plus the sampler's ordering. Two measurements in the same run:

* ``ab``: the bundle's ``SimSiamTrainer`` built from ``configs/train.json`` in mode ``none`` and ``bank`` on the
  same in-memory batches (loader cost excluded), interleaved rounds, median step time after ``--warmup`` steps.
  On a shared CPU the A/B difference is dominated by noise of a few percent either way.
* ``parts``: the bank's own work timed directly for cohorts of N cases (``bank.update`` per step; ``recluster`` and
  one epoch of ``ClusterBalancedSampler`` ordering per epoch), amortised over an epoch of N / batch steps and
  divided by the plain step time measured above. This is the precise figure.

    python benchmarks/bank_overhead.py [--roi 32] [--batch 6] [--iters 6 --warmup 2 --rounds 2]
        [--cohorts 120 1908 10000] [--out benchmarks/results/bank_overhead.json]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io_utils import atomic_write_json  # noqa: E402
from scripts.pretrain.bank import ClusterBalancedSampler, EmbeddingBank  # noqa: E402


def trainer_for(mode: str, datalist: Path, work: Path, args):
    """The bundle's trainer for ``mode`` over a few in-memory batches, and a function that times its steps."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from scripts.pretrain.simsiam_trainer import SimSiamTrainer

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(work),
            "datalist": str(datalist),
            "cache_dir": str(work / "cache"),
            "roi_size": [args.roi] * 3,
            "batch_size": args.batch,
            "num_workers": 0,
            "knn_monitor": False,
            "device": "$torch.device('cpu')",
            "amp": False,
        }
    )
    parser["balance"]["mode"], parser["balance"]["warmup_epochs"] = mode, 0
    loader = parser.get_parsed_content("train#dataloader")
    batches = list(itertools.islice(loader, 2))
    steps = args.warmup + args.iters
    trainer = SimSiamTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batches[i % 2] for i in range(steps)],
        network=parser.get_parsed_content("network"),
        optimizer=parser.get_parsed_content("optimizer"),
        epoch_length=steps,
        balancing=parser.get_parsed_content("balancing"),
    )
    times: list[float] = []
    last = [0.0]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: last.__setitem__(0, time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - last[0]))

    def run() -> list[float]:
        times.clear()
        trainer.run()
        return times[args.warmup :]

    return run


def bank_parts(n: int, batch: int, repeats: int = 200) -> dict:
    """Seconds of the bank's per-step update and per-epoch re-clustering + ordering for a cohort of ``n`` cases."""
    ids = [f"case{i}" for i in range(n)]
    bank = EmbeddingBank(ids, dim=256)
    g = torch.Generator().manual_seed(0)
    bank.update(ids, torch.randn(n, 256, generator=g))
    z = torch.randn(batch, 256, generator=g)
    t = []
    for r in range(repeats):
        rows = ids[(r * batch) % (n - batch) :][:batch]
        t0 = time.perf_counter()
        bank.update(rows, z)
        t.append(time.perf_counter() - t0)
    recluster_times = []
    for seed in range(4):  # the first call pays one-off set-up costs; the median is the steady state
        t0 = time.perf_counter()
        bank.recluster(k=3, seed=seed)
        recluster_times.append(time.perf_counter() - t0)
    recluster = statistics.median(recluster_times)
    sampler = ClusterBalancedSampler(bank, batch_size=batch, seed=0)
    t0 = time.perf_counter()
    list(sampler)
    order = time.perf_counter() - t0
    steps = n // batch
    return {
        "cases": n,
        "steps_per_epoch": steps,
        "update_s": statistics.median(t),
        "recluster_s": recluster,
        "sampler_epoch_order_s": order,
        "amortised_per_step_s": statistics.median(t) + (recluster + order) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cohorts", type=int, nargs="+", default=[120, 1908, 10000])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bank_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from scripts.data.demo_cohort import CohortSpec, generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        datalist = generate_cohort(Path(tmp) / "cohort", CohortSpec(n_cases=24, shape=(48, 48, 48), seed=0))
        runs = {mode: trainer_for(mode, datalist, Path(tmp) / mode, args) for mode in ("none", "bank")}
        steps: dict[str, list[float]] = {"none": [], "bank": []}
        for _ in range(args.rounds):
            for mode, run in runs.items():
                steps[mode] += run()
    plain, bank = statistics.median(steps["none"]), statistics.median(steps["bank"])
    parts = [bank_parts(n, args.batch) for n in args.cohorts]
    for p in parts:
        p["overhead_pct_of_plain_step"] = 100.0 * p["amortised_per_step_s"] / plain
    result = {
        "roi": args.roi,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "ab": {
            "plain_step_median_s": plain,
            "bank_step_median_s": bank,
            "overhead_pct": 100.0 * (bank - plain) / plain,
            "steps_each": len(steps["none"]),
        },
        "parts": parts,
        "target_pct": 2.0,
    }
    print(f"A/B at {args.roi}^3, batch {args.batch}: plain {plain:.3f} s/step, bank {bank:.3f} s/step "
          f"({result['ab']['overhead_pct']:+.2f}%, noise-dominated)")  # fmt: skip
    for p in parts:
        print(f"N={p['cases']:>6}: update {1e6 * p['update_s']:.0f} us/step, recluster {1e3 * p['recluster_s']:.1f} ms"
              f" + order {1e3 * p['sampler_epoch_order_s']:.1f} ms per epoch -> {p['overhead_pct_of_plain_step']:.3f}%"
              " of a plain step")  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
