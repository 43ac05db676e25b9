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

from scripts.evaluation import fraction_key
from scripts.report import MAIN_METRICS, MORE_METRICS

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
    """Median step time per mode over its seeds' epochs after the warm-up, and the overhead over ``plain``."""
    out = {}
    for mode, dirs in run_dirs.items():
        times = []
        for d in dirs:
            log = Path(d) / "training_log.json"
            if log.is_file():
                rows = json.loads(log.read_text())["epochs"]
                times += [
                    r["step_time_median_s"] for r in rows if r["epoch"] > warmup_epochs and r["step_time_median_s"]
                ]
        out[mode] = {"step_time_median_s": float(np.median(times)) if times else None, "epochs": len(times)}
    base = out.get("plain", {}).get("step_time_median_s")
    for v in out.values():
        v["overhead_pct"] = 100.0 * (v["step_time_median_s"] / base - 1) if base and v["step_time_median_s"] else None
    return out


def trajectories(run_dirs: dict[str, list[Path]], keys=("collapse_std", "knn_balanced_accuracy")) -> dict:
    """Per mode and seed, the per-epoch values of the monitors (to show whether they had flattened)."""
    out: dict = {}
    for mode, dirs in run_dirs.items():
        for d in dirs:
            log = Path(d) / "training_log.json"
            if log.is_file():
                rows = json.loads(log.read_text())["epochs"]
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
        md += "\n\n| mode | median step (s) | epochs timed | overhead vs plain |\n|---|---|---|---|\n"
        md += "\n".join(
            f"| {mode} | {t['step_time_median_s']:.3f} | {t['epochs']} | "
            + ("–" if t["overhead_pct"] is None else f"{t['overhead_pct']:+.1f}%")
            + " |"
            for mode, t in times.items()
            if t["step_time_median_s"] is not None
        )
    return md, out
