"""Shared formatting of the evaluation report: the tables and captions that ``report.md`` and ``report.html`` both
show, built from the results object (``scripts.downstream.evaluation``); ``fmt(header, body)`` picks Markdown or HTML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from scripts.downstream.metrics import fraction_key

MAIN_METRICS = {
    "binary": [("sensitivity", "Sensitivity"), ("specificity", "Specificity")],
    "multiclass": [("accuracy", "Overall acc."), ("minority_accuracy", "Minority-class acc.")],
}
MORE_METRICS = [("balanced_accuracy", "Balanced acc."), ("auc", "AUC")]


def _fraction_label(f: float) -> str:
    return f"{100 * f:g}% labels"


def _cell_folds(agg: dict) -> str:
    """mean ± sd over folds (over seeds, marked *, when a baseline gave no fold assignment)."""
    part, mark = (agg["folds"], "") if agg.get("folds") else (agg["seeds"], "*")
    if part is None or part["mean"] is None:
        return "–"
    sd = f" ± {part['sd']:.3f}" if part["sd"] is not None else ""
    return f"{part['mean']:.3f}{sd}{mark}"


def _cell_seeds(agg: dict) -> str:
    part = agg["seeds"]
    if part is None or part["mean"] is None:
        return "–"
    return f"{part['mean']:.3f}" + (f" ± {part['sd']:.3f}" if part["sd"] is not None else "")


def _cell_ci(agg: dict) -> str:
    if agg.get("pooled") is None:
        return "–"
    ci = agg.get("ci95")
    return f"{agg['pooled']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def metric_table(results: dict, cell=_cell_folds, metrics: Sequence[tuple[str, str]] | None = None, fmt=None) -> str:
    """Markdown table (or ``fmt(header, body)``): rows = feature sets and baselines, columns = metric x fraction."""
    metrics = metrics or MAIN_METRICS[results["task"]] + MORE_METRICS
    fractions = results["label_fractions"]
    header = ["Method"] + [f"{label} ({_fraction_label(f)})" for f in fractions for key, label in metrics]
    body = []
    for name, row in results["rows"].items():
        summary = row["protocol"]["summary"]
        cells = []
        for f in fractions:
            for key, _ in metrics:
                agg = summary.get(fraction_key(f), {}).get(key)
                cells.append(cell(agg) if agg else "–")
        body.append([name, *cells])
    return (fmt or _md_table)(header, body)


def paper_table(results: dict, fmt=None) -> str:
    """Table 2 as printed in the paper: "Sensitivity/Specificity" (or "Overall/Minor-class accuracy") per fraction,
    means over folds (over seeds for rows without fold assignment)."""
    (k1, l1), (k2, l2) = MAIN_METRICS[results["task"]]
    fractions = results["label_fractions"]
    header = ["Method"] + [f"{l1}/{l2} ({_fraction_label(f)})" for f in fractions]
    body = []
    for name, row in results["rows"].items():
        cells = []
        for f in fractions:
            s = row["protocol"]["summary"].get(fraction_key(f), {})
            means = [_mean_of(s.get(k)) for k in (k1, k2)]
            cells.append("/".join("–" if m is None else f"{m:.3f}" for m in means))
        body.append([name, *cells])
    return (fmt or _md_table)(header, body)


def _signed(v: float) -> str:
    return f"{v:+.3f}"


def paired_table(results: dict, fmt=None) -> str | None:
    """Paired differences A - B (same cases, folds and seeds) per label fraction: one row per comparison and
    fraction, one column per metric, "difference [95% CI]"; None when the results have none."""
    diffs = results.get("paired_differences") or {}
    if not diffs:
        return None
    metrics = MAIN_METRICS[results["task"]] + MORE_METRICS
    header = ["Difference", "Labels"] + [label for _, label in metrics]
    body = []
    for name, d in diffs.items():
        for f in results["label_fractions"]:
            cells = []
            for key, _ in metrics:
                agg = d["summary"].get(fraction_key(f), {}).get(key)
                if not agg or agg.get("difference") is None:
                    cells.append("–")
                    continue
                ci = agg.get("ci95")
                cells.append(_signed(agg["difference"]) + (f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else ""))
            body.append([name, _fraction_label(f), *cells])
    return (fmt or _md_table)(header, body)


PAIRED_NOTE = (
    "Pooled out-of-fold metric of A minus that of B, both scored on the same cases, folds and seeds; 95% CI from "
    "the stratified bootstrap over cases (A and B scored on the same resampled cases). Reported as it is: a CI that "
    "contains 0 does not tell A from B."
)


COMPLEMENTARITY_NOTE = (
    "What each SSL table carries beyond radiomics, out-of-fold (every fit on training folds only; mean over the "
    "protocol's first three seeds of the fold split). Effective rank: RankMe of the table (a few = collapsed). R² from "
    "radiomics: the share of the standardised SSL features' variance a ridge regression from the radiomics predicts "
    "(1 = a linear function of radiomics). Probe AUC: logistic probe on the SSL table alone; residual: on the SSL "
    "features minus their ridge prediction from radiomics (0.5 = nothing beyond radiomics). The last columns are the "
    "paired differences of trad+ssl and its weighted variant minus trad at 100 % of the labels."
)


def complementarity_table(results: dict, fmt=None) -> str | None:
    """One row per SSL table of ``results["complementarity"]`` (the random-init control marked); None when absent."""
    comp = results.get("complementarity") or {}
    if not comp:
        return None
    entries = (results.get("verdict") or {}).get("entries", {})
    header = ["SSL table", "Effective rank", "R² from radiomics", "Probe AUC", "Residual probe AUC",
              "trad+ssl − trad", "weighted − trad"]  # fmt: skip
    body = []

    def num(v, f="{:.3f}"):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)

    def diff(d):
        if not d:
            return "–"
        ci = d.get("ci95")
        return _signed(d["difference"]) + (f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "")

    control_entry = next((e["control"] for e in entries.values() if e.get("control")), {})
    for name, c in comp.items():
        e = control_entry if c.get("control") else entries.get(name, {})
        label = f"{name} (control: untrained)" if c.get("control") else name
        body.append([label, num(c.get("effective_rank"), "{:.1f}"), num(c.get("r2_from_radiomics")),
                     num(c.get("probe_auc")), num(c.get("residual_probe_auc")),
                     diff(e.get("plain")), diff(e.get("weighted"))])  # fmt: skip
    return (fmt or _md_table)(header, body)


def _mean_of(agg: dict | None) -> float | None:
    if not agg:
        return None
    part = agg.get("folds") or agg.get("seeds")
    return part["mean"] if part else None


def _cluster_table(results: dict, table=None) -> str | None:
    body = []
    for name, row in results["rows"].items():
        ca, corr = row.get("cluster_agreement"), row.get("correlation")
        if ca is None and corr is None:
            continue
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        body.append(
            [
                name,
                str(row.get("n_features")),
                str(ca["k"]) if ca else "–",
                fmt(ca and ca["ari"]),
                fmt(ca and ca["nmi"]),
                str(corr["n_constant_dropped"]) if corr else "–",
                fmt(corr and corr["mean_abs"]),
                fmt(corr and corr["median_abs"]),
            ]
        )
    if not body:
        return None
    header = ["Feature set", "Features", "k", "ARI", "NMI", "Constant cols dropped", "Mean abs(r)", "Median abs(r)"]
    return (table or _md_table)(header, body)


def _display(results: dict, label) -> str:
    return results["label_names"].get(str(label), str(label))


def confusion_caption(results: dict) -> str:
    seeds = next(iter(results["rows"].values()))["protocol"]["settings"].get("seeds")
    n = f"the {len(seeds)} CV seeds" if seeds else "the CV seeds"
    return (
        f"Confusion matrices: counts summed over {n} (each case is predicted once per seed, out of fold); "
        "colour and the second number are row-normalised (recall per true class)."
    )


def explorer_tables(results: dict, run: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of one clustering: clusters x labels, clusters x centres, radiomic profile."""
    out = []
    for what, title in (("labels", "label"), ("centres", "centre")):
        ct = run.get(what)
        if not ct:
            continue
        cols = ct["columns"]
        names = [_display(results, c) if what == "labels" else c for c in cols]
        body = [
            [f"cluster {c}", *[str(row[v]) for v in cols], str(sum(row.values()))] for c, row in ct["counts"].items()
        ]
        out.append(
            (
                f"Clusters x {title}s (ARI {ct['ari']:.3f}, NMI {ct['nmi']:.3f})",
                ["Cluster", *names, "Cases"],
                body,
            )
        )
    if run.get("profile"):
        body = [
            [f"cluster {c}", r["feature"], f"{r['g']:+.2f}", f"{r['mean_in']:.4g}", f"{r['mean_out']:.4g}"]
            for c, rows in run["profile"].items()
            for r in rows
        ]
        out.append(
            (
                "Radiomic profile: features that differ most (Hedges' g, cluster vs the other cases)",
                ["Cluster", "Feature", "g", "Mean in cluster", "Mean elsewhere"],
                body,
            )
        )
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


def _json_safe(o):
    """NaN/Inf -> null so results.json is strict JSON."""
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return _json_safe(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
