""" "Does balancing help?": one table over pretraining seeds from the evaluation's ``results.json``.

The pipeline run with ``--pretrain_seeds`` evaluates one SSL table per (mode, seed), named ``ssl (<mode>, seed
<s>)`` and ``trad+ssl (<mode>, seed <s>)``. Here each row's fold-mean metric is averaged over the pretraining seeds
(mean ± sd over seeds; the CV's own seeds and folds are already inside each fold mean), and each mode's median
step time (from its ``training_log.json``, epochs after the warm-up) is compared with plain's.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from scripts.downstream.metrics import fraction_key
from scripts.downstream.report_tables import MAIN_METRICS, MORE_METRICS

ROW = re.compile(r"^(?P<set>.+) \((?P<mode>[^,()]+), seed (?P<seed>\d+)\)$")


def seed_rows(results: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """{(feature set, mode): {seed: row}} for rows named ``<set> (<mode>, seed <s>)``; other rows (trad, the
    supervised baseline) come back as {(name, ""): {0: row}}."""
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for name, row in results["rows"].items():
        m = ROW.match(name)
        if m:
            out[(m["set"], m["mode"])][int(m["seed"])] = row
        else:
            out[(name, "")][0] = row
    return dict(out)


def _fold_mean(row: dict, fraction: float, metric: str) -> float | None:
    agg = row["protocol"]["summary"].get(fraction_key(fraction), {}).get(metric)
    if not agg:
        return None
    return (agg.get("folds") or agg.get("seeds") or {}).get("mean")


def step_times(run_dirs: dict[str, list[Path]], warmup_epochs: int = 1) -> dict[str, dict]:
    """Median step time per mode over its seeds' epochs after the warm-up, and the overhead over ``plain``.

    Runs made at different machine loads are not comparable: each mode's median 1-minute load average is kept
    and ``comparable`` is False when it differs from plain's by more than 1.
    """
    out = {}
    for mode, dirs in run_dirs.items():
        times, loads = [], []
        for d in dirs:
            log = Path(d) / "training_log.json"
            if log.is_file():
                rows = [r for r in json.loads(log.read_text(encoding="utf-8"))["epochs"] if r["epoch"] > warmup_epochs]
                times += [r["step_time_median_s"] for r in rows if r["step_time_median_s"]]
                loads += [r["load_average_1min"] for r in rows if r.get("load_average_1min") is not None]
        out[mode] = {
            "step_time_median_s": float(np.median(times)) if times else None,
            "epochs": len(times),
            "load_average_median": float(np.median(loads)) if loads else None,
        }
    base = out.get("plain", {})
    for v in out.values():
        ok = base.get("step_time_median_s") and v["step_time_median_s"]
        v["overhead_pct"] = 100.0 * (v["step_time_median_s"] / base["step_time_median_s"] - 1) if ok else None
        la, lb = v["load_average_median"], base.get("load_average_median")
        v["comparable"] = None if la is None or lb is None else abs(la - lb) <= 1.0
    return out


def trajectories(run_dirs: dict[str, list[Path]], keys=("collapse_std", "knn_balanced_accuracy")) -> dict:
    """Per mode and seed, the per-epoch values of the monitors (to show whether they had flattened)."""
    out: dict = {}
    for mode, dirs in run_dirs.items():
        for d in dirs:
            log = Path(d) / "training_log.json"
            if log.is_file():
                rows = json.loads(log.read_text(encoding="utf-8"))["epochs"]
                out.setdefault(mode, {})[Path(d).name] = {k: [r.get(k) for r in rows] for k in keys}
    return out


def balancing_table(results: dict, run_dirs: dict[str, list[Path]] | None = None) -> tuple[str, dict]:
    """Markdown (feature sets x label fractions x metrics, mean ± sd over pretraining seeds) and its JSON."""
    metrics = MAIN_METRICS[results["task"]] + MORE_METRICS
    fractions = results["label_fractions"]
    header = ["Features", "mode", "seeds"] + [
        f"{label} ({int(round(100 * f))}%)" for f in fractions for _, label in metrics
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    data = []
    for (feature_set, mode), by_seed in seed_rows(results).items():
        cells, entry = [], {"features": feature_set, "mode": mode or None, "seeds": sorted(by_seed), "metrics": {}}
        for f in fractions:
            for key, _ in metrics:
                vals = [v for v in (_fold_mean(r, f, key) for r in by_seed.values()) if v is not None]
                mean, sd = (
                    (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
                    if vals
                    else (None, None)
                )
                entry["metrics"][f"{key}@{fraction_key(f)}"] = {"mean": mean, "sd": sd, "values": vals}
                cells.append("–" if mean is None else (f"{mean:.3f} ± {sd:.3f}" if len(vals) > 1 else f"{mean:.3f}"))
        data.append(entry)
        lines.append("| " + " | ".join([feature_set, mode or "–", str(len(by_seed)), *cells]) + " |")
    md = "\n".join(lines)
    out = {"rows": data}
    if run_dirs:
        times = step_times(run_dirs)
        out["step_times"], out["monitors"] = times, trajectories(run_dirs)
        md += "\n\n| mode | median step (s) | epochs timed | machine load (1 min) | overhead vs plain |\n"
        md += "|---|---|---|---|---|\n"
        for mode, t in times.items():
            if t["step_time_median_s"] is None:
                continue
            load = "–" if t["load_average_median"] is None else f"{t['load_average_median']:.1f}"
            overhead = "–" if t["overhead_pct"] is None else f"{t['overhead_pct']:+.1f}%"
            if t["comparable"] is False:
                overhead += " (not comparable: different machine load)"
            md += f"| {mode} | {t['step_time_median_s']:.3f} | {t['epochs']} | {load} | {overhead} |\n"
        md += "\nStep times come from runs made one after another; `benchmarks/bank_overhead.py` and "
        md += "`benchmarks/balance_overhead.py` measure overheads within one run.\n"
    return md, out
