"""Training-step cost of plain 3DSiam vs RE vs SE at the same trained batch size m, and k-means cost vs N.

The paper reports +20% training time for RE/SE; our targets are RE <= 5% and SE <= 10% over plain. Every mode runs
the bundle's own ``SimSiamTrainer`` built from ``configs/train.json`` (balancing active from the first step:
``warmup_epochs=0``) on a synthetic cohort written by ``scripts/data/demo_cohort.py``:

* ``plain``       -- loader yields m augmented view pairs; no clustering.
* ``re_views``    -- as plain, plus k-means on the step's own z (no extra forward pass) and loss weights.
* ``re_original`` -- as re_views, but embeds the m un-augmented volumes with an extra no-grad forward pass.
* ``se``          -- loader yields k*q un-augmented candidates; the step embeds them (no-grad forward), runs
  k-means + selection, and only then augments the m chosen volumes on the main process (``view_transform``).

Two regimes: ``compute`` feeds a few loader batches already held in memory (loader cost ~0, so the augmentation
plain/RE do in loader workers is free while SE's in-step augmentation is not); ``end_to_end`` uses the bundle's
DataLoader (PersistentDataset cache warmed first, ``--workers`` processes, 2 by default like the bundle).
A step's time is the wall time between two ``ITERATION_COMPLETED`` events (batch fetch included); the median over
the iterations after ``--warmup`` is reported. The pieces inside RE/SE steps are timed in the same iterations by
wrapping the very callables the trainer calls (``embed_originals``, ``balance_step``, ``view_transform``).
k-means (``scripts.pretrain.balance.kmeans``, 256-d, via ``benchmarks/kmeans_time.py``'s helper) is timed for N = 30, 300,
3000, on CPU also with one intra-op thread.

    python benchmarks/balance_overhead.py [--rois 32 64] [--m 6 --k 3 --q 10] [--iters 3 --warmup 1]
        [--device cpu|cuda] [--workers 2] [--out PATH] [--quick]

Prints a table and writes JSON (default ``benchmarks/results/balance_overhead.json``). On a shared machine,
compare the modes only within one run (the overheads), not the absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# mode name -> (balance#mode, balance#re_embeddings)
MODES = {
    "plain": ("none", "views"),
    "re_views": ("re", "views"),
    "re_original": ("re", "original"),
    "se": ("se", "views"),
}
REGIMES = ("compute", "end_to_end")
TARGET_PCT = {"re_views": 5.0, "re_original": 5.0, "se": 10.0}
PAPER_PCT = 20.0
PIECES = ("embed", "balance_step", "augment")  # extra forward pass, k-means + weights/selection, SE's in-step views
IN_MEMORY_BATCHES = 2  # distinct batches cycled through in the compute regime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------------- bundle parts


def bundle_parser(datalist: Path, work: Path, roi: int, mode: str, args: argparse.Namespace):
    """``configs/train.json`` with the benchmark's overrides: the same objects ``monai.bundle run training`` builds.

    Each mode gets its own PersistentDataset cache folder so that the modes' cache warm-ups stay separate (the
    bundle keys cached volumes on the preprocessing too, so a shared folder would also be correct)."""
    from monai.bundle import ConfigParser

    balance_mode, re_embeddings = MODES[mode]
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update(
        {
            "bundle_root": str(work),
            "datalist": str(datalist),
            "cache_dir": str(work / "cache" / f"roi{roi}_{mode}"),
            "roi_size": [roi] * 3,
            "batch_size": args.m,
            "num_workers": args.workers,
            "seed": args.seed,
            "knn_monitor": False,
            "device": f"$torch.device({str(args.device)!r})",
            "amp": args.device.type == "cuda",  # the bundle's rule: AMP whenever it trains on CUDA
            # one id per setting: a whole "balance" dict would drop the settings it does not name
            "balance#mode": balance_mode,
            "balance#k": args.k,
            "balance#q": args.q,
            "balance#m": args.m,
            "balance#warmup_epochs": 0,
            "balance#re_embeddings": re_embeddings,
        }
    )
    return parser


class ModeParts:
    """One mode's network, optimiser, loader and trainer settings, parsed once per ROI and shared by both regimes
    (so the second regime starts from a warmed-up network; each regime still discards ``--warmup`` iterations)."""

    def __init__(self, parser, mode: str) -> None:
        self.mode = mode
        self.device = parser.get_parsed_content("device")
        self.amp = bool(parser.get_parsed_content("amp"))
        self.network = parser.get_parsed_content("network")
        self.optimizer = parser.get_parsed_content("optimizer")
        self.balancing = parser.get_parsed_content("balancing")
        self.view_transform = parser.get_parsed_content("train#trainer#view_transform")
        self.dataset = parser.get_parsed_content("train#dataset")
        self.loader = parser.get_parsed_content("train#dataloader")

    def warm_cache(self) -> None:
        """Fill the PersistentDataset cache (the deterministic part) so end-to-end steps see a warm epoch, not the
        first one that reads and crops every NIfTI file."""
        for item in self.dataset.data:
            self.dataset._cachecheck(item)

    def in_memory_batches(self, n: int) -> list:
        """The first ``n`` batches the bundle's loader would yield (same dataset, batch size and collation), made
        in this process so that no loader worker is still running when the timing starts."""
        loader = type(self.loader)(self.dataset, batch_size=self.loader.batch_size, drop_last=True, num_workers=0)
        return list(itertools.islice(loader, n))

    def trainer(self, data, epoch_length: int):
        from scripts.pretrain.simsiam_trainer import SimSiamTrainer

        return SimSiamTrainer(
            device=self.device,
            max_epochs=1,
            train_data_loader=data,
            network=self.network,
            optimizer=self.optimizer,
            epoch_length=epoch_length,
            amp=self.amp,
            balancing=self.balancing,
            view_transform=self.view_transform,
        )


# ---------------------------------------------------------------------------------------------------------- timing


class StepClock:
    """Per-iteration wall times from Ignite events: ``step`` (completed -> completed, fetch included), ``fetch``
    (GET_BATCH_STARTED -> COMPLETED) and the named pieces accumulated by :meth:`timed` wrappers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[dict] = []
        self._last = self._fetch0 = 0.0
        self._fetch = 0.0
        self._pieces: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._fetch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._fetch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._last = time.perf_counter()

    def _fetch_started(self, engine) -> None:
        self._fetch0 = time.perf_counter()

    def _fetch_completed(self, engine) -> None:
        self._fetch = time.perf_counter() - self._fetch0

    def _completed(self, engine) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.rows.append({"step": now - self._last, "fetch": self._fetch, **self._pieces})
        self._last, self._fetch, self._pieces = now, 0.0, {}

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` unchanged, its wall time (device synchronised) added to this iteration's ``name`` piece."""

        def wrapper(*a, **kw):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync(self.device)
            self._pieces[name] = self._pieces.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper


@contextlib.contextmanager
def instrumented(trainer, clock: StepClock) -> Iterator[None]:
    """Time the RE/SE pieces where the trainer calls them: the extra no-grad forward, ``balance_step`` (k-means +
    RE weights / SE selection) and SE's per-volume ``view_transform``. The wrappers only add perf_counter calls."""
    import scripts.pretrain.strategies as strategies_module

    trainer.embed_originals = clock.timed("embed", trainer.embed_originals)
    if trainer.view_transform is not None:
        trainer.view_transform = clock.timed("augment", trainer.view_transform)
    original = strategies_module.balance_step
    strategies_module.balance_step = clock.timed("balance_step", original)
    try:
        yield
    finally:
        strategies_module.balance_step = original


def run_mode(parts: ModeParts, regime: str, args: argparse.Namespace) -> dict:
    """Run ``warmup + iters`` trained steps of one mode in one regime; median figures over the last ``iters``."""
    total = args.warmup + args.iters
    if regime == "compute":
        batches = parts.in_memory_batches(IN_MEMORY_BATCHES)
        if not batches:
            raise ValueError(f"mode {parts.mode}: the loader yielded no batch (cohort smaller than one batch?)")
        data = [batches[i % len(batches)] for i in range(total)]
    else:
        data = parts.loader
    trainer = parts.trainer(data, epoch_length=total)
    clock = StepClock(torch.device(parts.device))
    clock.attach(trainer)
    with instrumented(trainer, clock):
        trainer.run()
    # Ignite keeps the unfinished loader iterator: its workers would go on augmenting prefetched batches during the
    # next measurement. The engine sits in reference cycles, so collect it now (joins the worker processes).
    del trainer
    gc.collect()
    if multiprocessing.active_children():
        print(f"  warning: {len(multiprocessing.active_children())} loader worker(s) still alive", flush=True)
    rows = clock.rows[args.warmup :]
    steps = [r["step"] for r in rows]
    out = {
        "mode": parts.mode,
        "regime": regime,
        "iterations": len(rows),
        "loader_batch": parts.loader.batch_size,
        "loader_batches_per_pass": len(parts.loader),
        "step_s": _median(steps),
        "step_s_mean": statistics.mean(steps) if steps else None,
        "step_s_min": min(steps) if steps else None,
        "step_s_max": max(steps) if steps else None,
        "step_s_all": steps,
        "fetch_s": _median([r["fetch"] for r in rows]),
    }
    for piece in PIECES:
        out[f"{piece}_s"] = _median([r[piece] for r in rows if piece in r])
    extra = sum(out[f"{p}_s"] or 0.0 for p in PIECES)
    out["train_s"] = out["step_s"] - out["fetch_s"] - extra if steps else None  # forward/backward/optimiser + glue
    return out


def add_overheads(rows: list[dict]) -> None:
    """Overhead of each mode vs plain at the same ROI and regime (median step times of the same run)."""
    plain = {(r["roi"], r["regime"]): r["step_s"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        base = plain.get((r["roi"], r["regime"]))
        r["overhead_pct"] = 100.0 * (r["step_s"] / base - 1.0) if base else None
        target = TARGET_PCT.get(r["mode"])
        r["target_pct"] = target
        r["meets_target"] = None if target is None or r["overhead_pct"] is None else r["overhead_pct"] <= target
        if r["mode"] == "se" and base:
            r["overhead_pct_by_piece"] = {p: 100.0 * r[f"{p}_s"] / base for p in PIECES if r.get(f"{p}_s") is not None}
            r["overhead_pct_by_piece"]["rest"] = r["overhead_pct"] - sum(r["overhead_pct_by_piece"].values())
            r["dominant_piece"] = max(PIECES, key=lambda p: r["overhead_pct_by_piece"].get(p, float("-inf")))


# ---------------------------------------------------------------------------------------------------------- k-means


def kmeans_rows(args: argparse.Namespace) -> list[dict]:
    """``scripts.pretrain.balance.kmeans`` timed by ``benchmarks/kmeans_time.py``'s helper, same data generator."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kmeans_time import DATA_KINDS, time_kmeans

    device, default = str(args.device), torch.get_num_threads()
    # on CPU also with one intra-op thread: on a busy machine (or beside loader workers) the many tiny parallel ops
    # of Lloyd's iterations can stall at OpenMP barriers, and one thread avoids that
    thread_options = [default] + ([1] if args.device.type == "cpu" and default > 1 else [])
    rows = []
    try:
        for threads in thread_options:
            torch.set_num_threads(threads)
            for kind in DATA_KINDS:
                for n in args.sizes:
                    row = time_kmeans(n, 256, args.k, kind, args.kmeans_repeats, 3, device)
                    rows.append({**row, "threads": threads})
    finally:
        torch.set_num_threads(default)
    return rows


# ----------------------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], kmeans: list[dict], plain_ms: dict) -> None:
    head = f"{'ROI':>4} {'regime':>10} {'mode':>12} {'step s':>8} {'min s':>7} {'fetch s':>8} {'overhead':>9} "
    print(head + f"{'embed s':>8} {'kmeans+sel s':>12} {'augment s':>9} {'target':>7}")
    for r in rows:
        target = "" if r["meets_target"] is None else ("ok" if r["meets_target"] else "MISSED")
        print(
            f"{r['roi']:>4} {r['regime']:>10} {r['mode']:>12} {_fmt(r['step_s'], '.3f'):>8} "
            f"{_fmt(r['step_s_min'], '.3f'):>7} {_fmt(r['fetch_s'], '.3f'):>8} "
            f"{_fmt(r['overhead_pct'], '+.1f') + '%':>9} {_fmt(r['embed_s'], '.3f'):>8} "
            f"{_fmt(r['balance_step_s'], '.4f'):>12} {_fmt(r['augment_s'], '.3f'):>9} {target:>7}"
        )
    for r in rows:
        if "overhead_pct_by_piece" in r:
            split = " ".join(f"{p} {v:+.1f}%" for p, v in r["overhead_pct_by_piece"].items())
            print(
                f"SE roi {r['roi']} {r['regime']}: {r['overhead_pct']:+.1f}% = {split} (largest: {r['dominant_piece']})"
            )
    print(f"\nk-means k={kmeans[0]['k'] if kmeans else '-'}, D=256 (one call; % of a plain compute-bound step)")
    header = f"{'threads':>7} {'data':>12} {'N':>6} {'median ms':>10} {'Lloyd it':>9} "
    print(header + " ".join(f"{'% ' + k:>10}" for k in plain_ms))
    for r in kmeans:
        pct = " ".join(f"{100 * r['median_ms'] / ms:>9.3f}%" for ms in plain_ms.values())
        print(
            f"{r['threads']:>7} {r['data']:>12} {r['n']:>6} {r['median_ms']:>10.2f} "
            f"{r['mean_lloyd_iterations']:>9.1f} {pct}"
        )


def _platform(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rois", type=int, nargs="+", default=None, help="default 32 64 (+96 on CUDA)")
    parser.add_argument("--m", type=int, default=6, help="trained batch size (SE keeps m of k*q)")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--q", type=int, default=10)
    parser.add_argument("--iters", type=int, default=None, help="timed steps per mode and regime (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (per mode and regime)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--workers", type=int, default=2, help="loader processes in the end_to_end regime")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cohort size (default 120, quick 36)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 300, 3000], help="k-means N")
    parser.add_argument("--kmeans-repeats", type=int, default=None, help="default 20 (quick 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "balance_overhead.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: ROI 32, 2 timed steps, 36 cases")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.rois is None:
        args.rois = [32] if args.quick else [32, 64] + ([96] if args.device.type == "cuda" else [])
    args.iters = args.iters or (2 if args.quick else 3)
    args.cases = args.cases or (36 if args.quick else 120)
    args.kmeans_repeats = args.kmeans_repeats or (5 if args.quick else 20)
    args.modes = list(dict.fromkeys(["plain", *args.modes]))  # overheads are relative to plain
    if args.cases < args.k * args.q:
        raise SystemExit(f"--cases {args.cases} is smaller than SE's candidate batch k*q={args.k * args.q}")

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from monai.utils import set_determinism

    from scripts.data.demo_cohort import CohortSpec, generate_cohort
    from scripts.io_utils import atomic_write_json

    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notices, not ours
    started, load_before = time.perf_counter(), os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="balance_overhead_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        datalist = generate_cohort(work / "cohort", CohortSpec(n_cases=args.cases, seed=args.seed))
        print(
            f"cohort: {args.cases} cases in {time.perf_counter() - t0:.1f} s; device {args.device}, "
            f"torch threads {torch.get_num_threads()}, m={args.m} k={args.k} q={args.q}",
            flush=True,
        )
        for roi in args.rois:
            set_determinism(seed=args.seed)
            parts = {mode: ModeParts(bundle_parser(datalist, work, roi, mode, args), mode) for mode in args.modes}
            for p in parts.values():
                p.warm_cache()
            for regime in args.regimes:
                for mode, p in parts.items():
                    t0 = time.perf_counter()
                    row = {"roi": roi, **run_mode(p, regime, args)}
                    rows.append(row)
                    print(
                        f"  roi {roi} {regime:>10} {mode:>12}: {row['step_s']:.3f} s/step "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    add_overheads(rows)
    kmeans = kmeans_rows(args)
    plain_ms = {f"roi{r['roi']}": 1e3 * r["step_s"] for r in rows if r["mode"] == "plain" and r["regime"] == "compute"}
    print()
    print_table(rows, kmeans, plain_ms)
    report = {
        "benchmark": "balance_overhead",
        "command": "python benchmarks/balance_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **_platform(args.device),
        "amp": args.device.type == "cuda",
        "settings": {
            "rois": args.rois,
            "m": args.m,
            "k": args.k,
            "q": args.q,
            "iters": args.iters,
            "warmup": args.warmup,
            "workers_end_to_end": args.workers,
            "cohort_cases": args.cases,
            "quick": args.quick,
        },
        "targets_pct": TARGET_PCT,
        "paper_pct": PAPER_PCT,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "steps": rows,
        "kmeans": kmeans,
        "kmeans_pct_of_plain_step": {
            key: {f"{r['data']}_n{r['n']}_threads{r['threads']}": 100.0 * r["median_ms"] / ms for r in kmeans}
            for key, ms in plain_ms.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
