"""One table from several ``learning_curve.py`` results: setting -> read-outs at equal steps and at the end.

An ablation changes one thing at a time, each run in its own ``learning_curve.py`` JSON; this script lines them
up. For every run it reports the read-out at ``--step`` (equal steps; the last read-out at or before it) and the
final read-out with the training CPU seconds it took (a run started with ``--minutes --clock cpu`` ends at an
equal CPU budget, so its final row is the equal-seconds figure). The step-0 read-out of the first run is the
random-initialisation control; the first run's ``controls`` (first-order statistics, pyradiomics) are listed too.

Runs that differ only in their seed form one setting, summarised in a second table: the final read-outs as mean ±
sd over the seeds, how many seeds end above their own random initialisation (probe AUC of the same seed's step-0
read-out), and the probe-AUC difference to the reference setting (the first one) paired by seed, with a 95 %
t-interval. One seed of a setting is an anecdote; this table is what an ablation's claim should rest on.

    python benchmarks/ablation_table.py eval/lc/default.json eval/lc/batch16.json --step 200 --out eval/lc/table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

METRICS = ("knn_balanced_accuracy", "probe_auc", "probe_balanced_accuracy", "effective_rank")
SHORT = {"knn_balanced_accuracy": "kNN", "probe_auc": "probe AUC", "probe_balanced_accuracy": "probe bal. acc."}


def at_step(curve: list[dict], step: int) -> dict | None:
    """The last read-out at or before ``step`` (None when the run's first read-out after init came later)."""
    rows = [r for r in curve if 0 < r["step"] <= step]
    return rows[-1] if rows else None


def flat(recipe: dict, overrides: list | None) -> dict:
    """A run's settings as ``key -> value`` (``augmentation.scale``), with the config overrides it ran under."""
    out = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    if isinstance(overrides, dict):  # learning_curve.py's {config id: parsed JSON value}
        out.update({k: json.dumps(v, separators=(",", ":")) for k, v in overrides.items()})
    else:
        for item in overrides or []:
            key, _, value = str(item).partition("=")
            out[key] = value
    return out


def setting(settings: dict, base: dict) -> str:
    """What a run changes from the first run (the ablation's reference); "reference" for the first run itself."""

    def show(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    changed = [f"{k}={show(v)}" for k, v in settings.items() if base.get(k) != v]
    changed += [f"{k} unset" for k in base if k not in settings]
    return ", ".join(changed) or "reference"


def rows_of(path: Path, step: int) -> list[dict]:
    """One row per run of one ``learning_curve.py`` result file."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        runs = result["runs"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{path}: not a learning_curve.py result ({exc})") from exc
    out = []
    for name, run in runs.items():
        curve = run.get("curve") or []
        if not curve:
            raise SystemExit(f"{path}: run {name!r} has no read-outs")
        final = curve[-1]
        out.append(
            {
                "file": path.name,
                "run": name,
                "settings": {
                    **flat(run["recipe"], result.get("overrides")),
                    # the budget sets the cosine schedule's length, so it is part of the setting
                    "budget_steps": result.get("steps"),
                    "budget_minutes": result.get("minutes"),
                },
                "partial": bool(run.get("partial", False)),
                "at_step": at_step(curve, step),
                "final": final,
                "init": curve[0] if curve[0]["step"] == 0 else None,
                "controls": result.get("controls", {}),
            }
        )
    return out


def fmt(row: dict | None, metric: str) -> str:
    if row is None or metric not in row:
        return "–"
    return f"{row[metric]:.1f}" if metric == "effective_rank" else f"{row[metric]:.3f}"


def markdown(rows: list[dict], step: int) -> str:
    head = (
        f"| result: setting (changes from the first) | at step {step}: kNN / probe AUC / bal. acc. / rank "
        "| end: step, CPU s | end: kNN / probe AUC / bal. acc. / rank |"
    )
    lines = [head, "|---|---|---|---|"]
    first = rows[0]
    base = first["settings"]
    if first["init"] is not None:
        init = " / ".join(fmt(first["init"], m) for m in METRICS)
        lines.append(f"| random init (control) | {init} | 0, 0 | {init} |")
    for name, ctrl in first["controls"].items():
        if isinstance(ctrl, dict):
            vals = " / ".join(fmt(ctrl, m) for m in METRICS)
            lines.append(f"| {name} (control) | {vals} | – | {vals} |")
    for r in rows:
        eq = " / ".join(fmt(r["at_step"], m) for m in METRICS)
        end = " / ".join(fmt(r["final"], m) for m in METRICS)
        f = r["final"]
        stopped = " (stopped)" if r["partial"] else ""
        name = f"{r['file']}: {setting(r['settings'], base)}"
        lines.append(f"| {name}{stopped} | {eq} | {f['step']}, {f.get('train_cpu_seconds', 0):.0f} | {end} |")
    return "\n".join(lines) + "\n"


def by_setting(rows: list[dict]) -> list[dict]:
    """Group runs whose settings differ only in ``seed``; the first group is the reference.

    A seed that occurs twice in one setting (the same run given twice) is refused: it would count one run double.
    """

    def seed_of(run: dict):
        return run["settings"].get("seed")

    groups: list[dict] = []
    for r in rows:
        key = {k: v for k, v in r["settings"].items() if k != "seed"}
        group = next((g for g in groups if g["key"] == key), None)
        if group is None:
            group = {"key": key, "runs": []}
            groups.append(group)
        seed = seed_of(r)
        if any(seed_of(other) == seed for other in group["runs"]):
            raise SystemExit(f"{r['file']}: seed {seed} of this setting is already in the table (given twice?)")
        group["runs"].append(r)
    reference = {seed_of(run): run["final"] for run in groups[0]["runs"]} if groups else {}
    out = []
    for g in groups:
        seeds = [seed_of(run) for run in g["runs"]]
        summary = {
            "setting": setting(g["key"], groups[0]["key"]),
            "seeds": seeds,
            "files": [r["file"] for r in g["runs"]],
        }
        for m in METRICS:
            values = [run["final"][m] for run in g["runs"] if m in run["final"]]
            summary[m] = {"values": values, **mean_sd(values)}
        summary["above_own_init"] = sum(
            1 for run in g["runs"] if run["init"] is not None and run["final"]["probe_auc"] > run["init"]["probe_auc"]
        )
        summary["with_init"] = sum(1 for run in g["runs"] if run["init"] is not None)
        paired = [
            run["final"]["probe_auc"] - reference[seed_of(run)]["probe_auc"]
            for run in g["runs"]
            if seed_of(run) in reference
        ]
        summary["paired_probe_auc_vs_reference"] = {"values": paired, **mean_sd(paired), **t_interval(paired)}
        out.append(summary)
    return out


def mean_sd(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Two-sided t confidence interval of the mean (None for fewer than 2 values)."""
    if len(values) < 2:
        return {"ci_low": None, "ci_high": None}
    from scipy.stats import t

    stat = mean_sd(values)
    half = t.ppf(0.5 + level / 2, len(values) - 1) * stat["sd"] / math.sqrt(len(values))
    return {"ci_low": stat["mean"] - half, "ci_high": stat["mean"] + half}


def seeds_markdown(groups: list[dict]) -> str:
    def ms(stat: dict, digits: int = 3) -> str:
        if stat["mean"] is None:
            return "–"
        sd = f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else ""
        return f"{stat['mean']:.{digits}f}{sd}"

    lines = [
        "| setting (changes from the first) | seeds | kNN | probe AUC | probe bal. acc. | rank | AUC above own init "
        "| Δ probe AUC vs reference, paired (95 % CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        d = g["paired_probe_auc_vs_reference"]
        if g is groups[0] or d["mean"] is None:
            delta = "–"
        else:
            ci = f" ({d['ci_low']:+.3f} to {d['ci_high']:+.3f})" if d["ci_low"] is not None else ""
            delta = f"{d['mean']:+.3f}{ci}, n={len(d['values'])}"
        above = f"{g['above_own_init']} of {g['with_init']}" if g["with_init"] else "–"
        seeds = ", ".join(str(s) for s in g["seeds"])
        lines.append(
            f"| {g['setting']} | {seeds} | {ms(g['knn_balanced_accuracy'])} | {ms(g['probe_auc'])} "
            f"| {ms(g['probe_balanced_accuracy'])} | {ms(g['effective_rank'], 1)} | {above} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("results", nargs="+", type=Path, help="learning_curve.py JSON files (the first gives the controls)")
    ap.add_argument("--step", type=int, default=200, help="equal-steps column: the read-out at or before this step")
    ap.add_argument("--out", type=Path, default=None, help="also write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    rows = [row for path in args.results for row in rows_of(path, args.step)]
    groups = by_setting(rows)
    text = markdown(rows, args.step) + "\nOver seeds (final read-outs):\n\n" + seeds_markdown(groups)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".md"), text)
        atomic_write_json(args.out.with_suffix(".json"), {"step": args.step, "rows": rows, "settings": groups})
    return rows


if __name__ == "__main__":
    main()
