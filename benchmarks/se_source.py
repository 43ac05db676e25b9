"""SE with its candidates embedded every step (the paper) vs from stored embeddings (``balance#se_source bank``).

Trains the bundle's own ``configs/train.json`` (``monai.bundle.ConfigWorkflow``, its loader, trainer and handlers;
kNN monitor off) on the embedded default cohort at one ROI size for ``--epochs`` epochs of ``--steps`` steps, once
per mode: ``plain`` (3DSiam without balancing), ``se_forward`` and ``se_bank`` (``se_max_age`` 1: each case is
embedded again once an epoch). The first epoch is the warm-up (plain for every mode), the second fills the store, so
the figures come from the last epoch: the mean wall time of a step (batch fetch included) and the overhead against
``plain`` measured in the same run, the share of candidates embedded in the step (``balance/se_embedded_share``) and
the minority share of the trained batches against that of a random batch of the same candidates
(``balance/minority_share_se_batch`` / ``..._random_batch``: labels for the diagnostics only).

    python benchmarks/se_source.py [--roi 32] [--epochs 3] [--steps 20] [--threads 2] [--out PATH]

Modes run in ABBA order (plain, se_forward, se_bank, se_bank, se_forward, plain) when ``--repeats 2``, so a drifting
machine load favours none; prints a table and writes JSON (default ``benchmarks/results/se_source.json``).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "plain": {"balance#mode": "none"},
    "se_forward": {"balance#mode": "se", "balance#se_source": "forward"},
    "se_bank": {"balance#mode": "se", "balance#se_source": "bank"},
}
TARGET_PCT = 10.0  # issue 31: bank-fed SE within 10 % of a plain step


def run_mode(name: str, roi: int, epochs: int, steps: int, work: Path) -> dict:
    """One training of ``name``; the last epoch's mean step time and balance diagnostics."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    overrides = dict(
        bundle_root=str(work / name),
        cache_dir=str(work / "cache"),
        roi_size=[roi] * 3,
        epochs=epochs,
        steps_per_epoch=steps,
        knn_monitor=False,
        torchscript_path=None,
        num_workers=2,
        **MODES[name],
    )
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "data" / "demo.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **overrides,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    ends: dict[int, list[float]] = {}
    metrics: dict[int, dict] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: ends.setdefault(e.state.epoch, []).append(time.perf_counter())
    )
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: metrics.__setitem__(e.state.epoch, dict(e.state.metrics))
    )
    wf.run()
    wf.finalize()
    last = ends[epochs]
    gaps = [b - a for a, b in zip(last, last[1:])]  # step to step, batch fetch included
    keep = ("balance/se_embedded_share", "balance/minority_share_se_batch", "balance/minority_share_random_batch")
    return {"step_s": statistics.mean(gaps), "steps_timed": len(gaps),
            **{k.split("/")[1]: metrics[epochs][k] for k in keep if k in metrics[epochs]}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from scripts.cli import parser
    from scripts.io_utils import atomic_write_json

    ap = parser("se_source.py", __doc__)
    ap.add_argument("--roi", type=int, default=32, help="ROI side (default %(default)s)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per mode; the last one is timed (>= 3)")
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="1: each mode once; 2: ABBA order (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "se_source.json"), help="JSON file")
    args = ap.parse_args(argv)
    if args.epochs < 3 or args.steps < 3:
        ap.error("--epochs must be >= 3 (warm-up, fill, timed) and --steps >= 3")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    order = list(MODES) if args.repeats == 1 else list(MODES) + list(MODES)[::-1]
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(order):
            r = run_mode(name, args.roi, args.epochs, args.steps, Path(tmp) / f"{name}_{i}")
            runs[name].append(r)
            print(
                f"{name:10s} step {r['step_s']:.3f} s "
                + " ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "step_s")
            )
    plain = statistics.mean(r["step_s"] for r in runs["plain"])
    summary = {}
    for name, rs in runs.items():
        step = statistics.mean(r["step_s"] for r in rs)
        summary[name] = {"step_s": round(step, 4), "overhead_pct": round(100 * (step / plain - 1), 1)}
        for key in ("se_embedded_share", "minority_share_se_batch", "minority_share_random_batch"):
            if key in rs[0]:
                summary[name][key] = round(statistics.mean(r[key] for r in rs), 3)
    print("\nmode        step s   overhead vs plain   embedded share   minority share: SE batch / random batch")
    for name, s in summary.items():
        print(f"{name:10s}  {s['step_s']:.3f}   {s['overhead_pct']:+6.1f} %           "
              f"{s.get('se_embedded_share', float('nan')):.2f}             "
              f"{s.get('minority_share_se_batch', float('nan')):.3f} / {s.get('minority_share_random_batch', float('nan')):.3f}")  # fmt: skip
    result = {"benchmark": "se_source", "roi": args.roi, "epochs": args.epochs, "steps": args.steps,
              "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "target_pct": TARGET_PCT, "runs": runs, "summary": summary}  # fmt: skip
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
