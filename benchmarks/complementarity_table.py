"""Does a recipe's SSL add to radiomics? One table from ``learning_curve.py --svm`` results, over pretraining seeds.

Each input is one ``learning_curve.py --radiomics ... --svm`` JSON (one recipe, one or more seeds). For every recipe
it lists, at the last read-out and as mean ± sd over the seeds: the SVM AUC of the SSL features alone, the paired
trad+ssl − trad AUC difference (plain concatenation, the paper's row, and the weighted row whose SSL block weight is
tuned inside each training fold) with how many seeds have a 95 % CI above 0, the R² of the SSL features from
radiomics, the probe AUC of their residual after radiomics, and the effective rank. The step-0 read-outs are the
random-init control of the same seeds (the same network before any step). The last table pairs each recipe with the
first one by seed (mean difference and a 95 % t-interval over seeds), and with its own random init.

    python benchmarks/complementarity_table.py eval/lc/default.json eval/lc/default-cov.json --out eval/lc/table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_table import mean_sd, t_interval  # noqa: E402

from scripts.io_utils import atomic_write_json, atomic_write_text  # noqa: E402

FIELDS = ("ssl_auc", "d_plain", "d_weighted", "r2_from_radiomics", "residual_probe_auc", "effective_rank", "probe_auc")
LABELS = {
    "ssl_auc": "SSL alone (SVM AUC)",
    "d_plain": "trad+ssl − trad",
    "d_weighted": "weighted − trad",
    "r2_from_radiomics": "R² from radiomics",
    "residual_probe_auc": "residual probe AUC",
    "effective_rank": "effective rank",
    "probe_auc": "probe AUC",
}


def figures(row: dict) -> dict:
    """The complementarity figures of one read-out (with its SVM block)."""
    svm = row["svm"]
    d = svm["differences"]
    out = {
        "ssl_auc": svm["rows"]["ssl"]["1.0"],
        "trad_auc": svm["rows"]["trad"]["1.0"],
        "d_plain": d["trad+ssl - trad"]["1.0"]["difference"],
        "ci_plain": d["trad+ssl - trad"]["1.0"]["ci95"],
    }
    if "trad+ssl (weighted) - trad" in d:
        out["d_weighted"] = d["trad+ssl (weighted) - trad"]["1.0"]["difference"]
        out["ci_weighted"] = d["trad+ssl (weighted) - trad"]["1.0"]["ci95"]
    for key in ("r2_from_radiomics", "residual_probe_auc", "effective_rank", "probe_auc"):
        out[key] = row.get(key)
    return out


def runs_of(path: Path, rescore=None) -> tuple[str, dict[int, dict]]:
    """(recipe name, {seed: {"end": figures, "init": figures}}) of one harness JSON. ``rescore(encoder path)``, when
    given, recomputes the label-free and residual figures from the encoder the harness saved at that read-out
    (``--save-encoder``) with the current code."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for tag, run in doc["runs"].items():
        curve = [r for r in run["curve"] if "svm" in r]
        if len(curve) < 2:
            continue  # unfinished: no end point scored yet
        seed = int(run["recipe"]["seed"])
        out[seed] = {"init": figures(curve[0]), "end": figures(curve[-1]), "steps": curve[-1]["step"]}
        if rescore is not None:
            for which, row in (("init", curve[0]), ("end", curve[-1])):
                encoder = path.with_name(f"{path.stem}_{tag}_step{row['step']}_encoder.pt")
                if not encoder.is_file():
                    raise SystemExit(f"--rescore: {encoder} is missing (run learning_curve.py with --save-encoder)")
                out[seed][which].update(rescore(encoder))
    return path.stem, out


def rescorer(configs: list[str], radiomics: str, cache_dir: Path):
    """A function: saved encoder -> its R² from radiomics, residual probe AUC and effective rank, recomputed on the
    harness's cohort, split and probe C (0.1) with the current ``scripts.downstream.complementarity``."""
    import feature_content
    import learning_curve as lc
    import numpy as np

    from scripts.downstream.complementarity import r2_from_radiomics, residual_probe
    from scripts.feature_table import failed_cases
    from scripts.pretrain.readout import effective_rank, stratified_folds

    data = lc.without_cases(lc.cached_rois(configs, {}, cache_dir), set(failed_cases(radiomics)))
    trad = lc.radiomics_features(radiomics, data["ids"])
    labelled = np.asarray([v is not None for v in data["y"]])
    y = data["y"][labelled].astype(int)
    folds = stratified_folds(y)

    def rescore(encoder: Path) -> dict:
        net = feature_content.load_encoder(encoder, 0, data["x"].shape[1])
        z = lc.embed(net, data["x"], "output", channels_last=False)[labelled]
        return {
            "r2_from_radiomics": r2_from_radiomics(z, trad[labelled], folds),
            "residual_probe_auc": residual_probe(z, trad[labelled], y, folds)["probe_auc"],
            "effective_rank": effective_rank(z),
        }

    return rescore


def fmt(stats: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    sd, sign = stats.get("sd"), "+" if signed else ""
    return f"{stats['mean']:{sign}.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def above_zero(runs: dict, key: str, which: str = "end") -> str:
    cis = [r[which].get(key) for r in runs.values() if r[which].get(key)]
    return f"{sum(ci[0] > 0 for ci in cis)}/{len(cis)}" if cis else "–"


def markdown(recipes: dict[str, dict]) -> tuple[str, dict]:
    header = ["recipe (seeds)", *[LABELS[f] for f in FIELDS], "CI > 0 plain", "CI > 0 weighted"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    data: dict = {"recipes": {}, "paired": {}}
    control_runs = next(iter(recipes.values()))
    rows = [("random init (control)", control_runs, "init")] + [(n, r, "end") for n, r in recipes.items()]
    for name, runs, which in rows:
        stats = {f: mean_sd([r[which][f] for r in runs.values() if r[which].get(f) is not None]) for f in FIELDS}
        data["recipes"][name] = {"seeds": sorted(runs), "stats": stats,
                                 "per_seed": {s: r[which] for s, r in runs.items()}}  # fmt: skip
        cells = [fmt(stats[f], 1 if f == "effective_rank" else 3, f.startswith("d_")) for f in FIELDS]
        lines.append(f"| {name} ({len(runs)}) | " + " | ".join(cells)
                     + f" | {above_zero(runs, 'ci_plain', which)} | {above_zero(runs, 'ci_weighted', which)} |")  # fmt: skip
    ref_name, ref = next(iter(recipes.items()))
    paired = ["", f"Paired by seed against {ref_name} (mean difference, 95 % t-interval over seeds) and against the "
              "same seeds' random init:", "",
              "| recipe | vs | " + " | ".join(LABELS[f] for f in FIELDS[1:5]) + " |", "|---" * 6 + "|"]  # fmt: skip
    for name, runs in recipes.items():
        for other, label in ((ref, ref_name), (None, "its random init")):
            if other is ref and name == ref_name:
                continue
            cells = []
            for f in FIELDS[1:5]:
                diffs = [
                    r["end"][f] - (other[s]["end"][f] if other is not None else r["init"][f])
                    for s, r in runs.items()
                    if (other is None or s in other) and r["end"].get(f) is not None
                ]
                ti = {**mean_sd(diffs), **t_interval(diffs), "n": len(diffs)}
                data["paired"].setdefault(name, {}).setdefault(label, {})[f] = ti
                cells.append("–" if ti["mean"] is None else f"{ti['mean']:+.3f}" + (
                    f" [{ti['ci_low']:+.3f}, {ti['ci_high']:+.3f}]" if ti["ci_low"] is not None else ""))  # fmt: skip
            paired.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + paired) + "\n", data


def main(argv: list[str] | None = None) -> dict:
    from scripts.cli import parser

    ap = parser("complementarity_table.py", __doc__)
    ap.add_argument("results", nargs="+", type=Path, help="learning_curve.py --svm JSON files, one recipe each")
    ap.add_argument("--out", type=Path, default=None, help="also write <out>.md and <out>.json")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="recompute R², residual probe AUC and rank from the saved encoders with the current code (needs "
        "--radiomics, and --configs of the runs' cohort)",
    )
    ap.add_argument("--radiomics", default=None, help="the runs' radiomics table (with --rescore)")
    ap.add_argument("--configs", nargs="*", default=["configs/train.json", "configs/data/demo.json"])
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="learning_curve.py's ROI cache")
    args = ap.parse_args(argv)
    if args.rescore and not args.radiomics:
        ap.error("--rescore needs --radiomics")
    rescore = rescorer(args.configs, args.radiomics, args.cache_dir) if args.rescore else None
    recipes = {}
    for path in args.results:
        if not path.is_file():
            ap.error(f"{path}: no such file")
        name, runs = runs_of(path, rescore)
        if not runs:
            ap.error(f"{path}: no run with an SVM read-out at its start and end (run learning_curve.py with --svm)")
        recipes[name] = runs
    text, data = markdown(recipes)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out.with_suffix(".md"), text)
        atomic_write_json(args.out.with_suffix(".json"), data)
    return data


if __name__ == "__main__":
    main()
