"""Evaluation report: ``results.json`` (every figure), ``report.md`` (Table-2-style tables) and PNG plots.

:func:`evaluate` is what the bundle's ``evaluating`` workflow calls: it reads labels from a datalist, joins the feature
tables (``scripts.downstream.evaluation.load_and_join``), runs the protocol on every feature set, adds optional baseline rows
(e.g. the supervised baseline's out-of-fold predictions) and writes the report with :func:`write_report`.

The ``results`` dict (also the content of ``results.json``) is plain JSON::

    {
      "task": "binary" | "multiclass",
      "ids": [case id, ...],  "y": [label, ...],          # row order of every per-case list below
      "classes": [...], "label_names": {"0": "LGG", ...},  # display names, keyed by str(label)
      "positive_label": ..., "minority_label": ...,  "class_counts": {str(label): n},
      "label_fractions": [1.0, 0.5],
      "excluded_unlabelled": [ids present in tables but unlabelled in the datalist],
      "rows": {                                          # table rows, in order
        name: {
          "kind": "features" | "baseline",
          "sources": [{"path", "sha256"}],  "n_features": int | None,
          "protocol": ProtocolResult.to_dict():          # scripts.downstream.evaluation
              {"task", "classes", "positive_label", "minority_label", "settings",
               "summary": {fraction key ("1.0"): {metric: {"folds": {"mean","sd","n"} | None,
                                                           "seeds": {"mean","sd","n"},
                                                           "pooled": float, "ci95": [lo, hi] | None}}},
               "runs": [{"seed", "fraction", "best_C", "n_not_converged", "fold", "y_pred", "scores"}]},
          "cluster_agreement": {"ari", "nmi", "k", "clusters": [...]} | None,
          "correlation": scripts.downstream.evaluation.correlation_summary(...) | None,
        }
      }
    }

``plots_data`` (optional, not written to JSON): ``{feature set name: X}`` with rows in ``ids`` order, for the 2D
embedding maps. Plots are drawn with matplotlib's object API (``Figure`` + Agg canvas), so no global backend is
switched and nothing depends on a display.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scripts.downstream.evaluation import (
    DEFAULT_C_GRID,
    check_label_map,
    cluster_agreement,
    correlation_summary,
    fraction_key,
    load_and_join,
    run_protocol,
    standardise_columns,
    summarise_predictions,
)
from scripts.io_utils import atomic_path, atomic_write_json, atomic_write_text, meta_path, sha256_file

logger = logging.getLogger(__name__)

MAIN_METRICS = {
    "binary": [("sensitivity", "Sensitivity"), ("specificity", "Specificity")],
    "multiclass": [("accuracy", "Overall acc."), ("minority_accuracy", "Minority-class acc.")],
}
MORE_METRICS = [("balanced_accuracy", "Balanced acc."), ("auc", "AUC")]


# ------------------------------------------------------------------------------------------------------------ labels
def read_datalist_labels(
    path: str | os.PathLike, sections: Sequence[str] = ("training",)
) -> tuple[dict[str, object], list[str]]:
    """(``{id: label}`` of labelled cases, ids of cases without a label) from a MONAI datalist's sections.

    Ids default to ``<section>_<index:04d>`` as in ``scripts.data.datalist.load_datalist``. A case id seen twice is an
    error rather than one label silently winning.
    """
    from scripts.data.datalist import check_labels, normalise_label, read_datalist_doc, section_items

    path = Path(path)
    doc = read_datalist_doc(path)  # a clear error for a missing file, bad JSON, a list, a section that is no list
    labels: dict[str, object] = {}
    unlabelled: list[str] = []
    seen: set[str] = set()
    for section in sections:  # an absent section is empty
        for item in section_items(doc, path, section, None, strict=False):
            case_id = item["id"]
            if case_id in seen:
                raise ValueError(f"datalist {path}: case id {case_id!r} appears more than once")
            seen.add(case_id)
            if "label" not in item:
                unlabelled.append(case_id)
            else:
                labels[case_id] = item["label"]
    problems = check_labels([{"id": i, "label": v} for i, v in labels.items()], f"sections {list(sections)}")
    if problems:
        raise ValueError(f"datalist {path}: " + "; ".join(f"case {p.case_id!r}: {p.problem}" for p in problems))
    labels = {i: normalise_label(v) for i, v in labels.items()}
    if not labels:
        raise ValueError(
            f"datalist {path}: no labelled cases in sections {list(sections)} (present: "
            f"{', '.join(f'{s} ({len(doc[s])} cases)' for s in doc if isinstance(doc.get(s), list)) or 'none'})"
        )
    return labels, unlabelled


def radiomics_failures(table_path: str | os.PathLike) -> dict[str, str]:
    """``{id: reason}`` from the failure report next to a radiomics table (empty when there is none): the cases
    the evaluation must leave out of every feature set, with the reason shown in the report."""
    from scripts.downstream.radiomics import failures_path_for

    path = failures_path_for(table_path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["id"]: f"radiomics failed: {row['reason']}" for row in csv.DictReader(fh)}


def _load_records(spec: str | os.PathLike | Sequence[Mapping], name: str) -> list[Mapping]:
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"predictions of extra row {name!r} not found: {path}")
        spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, list) or not all(isinstance(r, Mapping) for r in spec):
        raise ValueError(f"extra row {name!r}: expected a list of prediction records")
    return list(spec)


# ---------------------------------------------------------------------------------------------------------- evaluate
def evaluate(
    tables: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    labels_source: str | os.PathLike | Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    label_names: Mapping | None = None,
    positive_label=None,
    sections: Sequence[str] = ("training",),
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    label_fractions: Sequence[float] = (1.0, 0.5),
    C_grid: Sequence[float] | None = None,
    class_weight: str | dict | None = "balanced",
    val_fraction: float = 0.2,
    n_bootstrap: int = 1000,
    extra_rows: Mapping[str, str | os.PathLike | Sequence[Mapping]] | None = None,
    analysis_sets: Sequence[str] | None = None,
    cluster_seed: int = 0,
    plots: bool = True,
    exclude: Mapping[str, str] | None = None,
    explorer: bool = True,
    explorer_k_range: Sequence[int] = (2, 8),
    centre_key: str = "centre",
    settings: Mapping | None = None,
) -> dict:
    """Run the downstream protocol on every feature set and write the report; returns the results dict.

    ``labels_source``: a MONAI datalist JSON (labels read from ``sections``) or an ``{id: label}`` mapping.
    ``extra_rows``: ``{name: records or path to a JSON list of records}``, records as in
    ``scripts.downstream.evaluation.summarise_predictions`` (e.g. the supervised baseline). ``analysis_sets``: feature sets that
    get cluster agreement and the correlation density; default every set built from a single table.
    ``exclude``: ``{id: reason}`` of cases to leave out of every feature set (e.g. :func:`radiomics_failures`), so
    all rows are scored on the same cases; they are listed with their reasons in ``results.json`` and the report.
    ``explorer``: run the cluster explorer (``scripts.downstream.clusters``) on every single-table feature set that is not the
    radiomics table (the SSL embeddings), k by silhouette in ``explorer_k_range`` and k = 3; the radiomics table
    (provenance kind ``radiomics``) gives the per-cluster profile, the datalist's ``centre_key`` the centres and its
    images the montage. ``settings``: extra settings recorded in the report's provenance.
    """
    if isinstance(labels_source, Mapping):
        labels, unlabelled = dict(labels_source), []
    else:
        labels, unlabelled = read_datalist_labels(labels_source, sections)
    if label_names:  # a label outside the profile's map would silently become an extra class
        check_label_map(labels, label_names)
    exclude = {str(k): str(v) for k, v in (exclude or {}).items()}
    if exclude:
        logger.warning("leaving %d case(s) out of every feature set: %s", len(exclude), exclude)
        labels = {k: v for k, v in labels.items() if str(k) not in exclude}
        unlabelled = list(unlabelled) + sorted(exclude)
    fs = load_and_join(tables, labels, unlabelled=unlabelled)
    classes, counts = np.unique(fs.y, return_counts=True)
    names = {str(c): str(c) for c in classes} | {str(k): str(v) for k, v in (label_names or {}).items()}
    if analysis_sets is None:
        analysis_sets = [n for n, spec in tables.items() if isinstance(spec, (str, os.PathLike)) or len(spec) == 1]
    unknown = set(analysis_sets) - set(fs.X)
    if unknown:
        raise ValueError(f"analysis_sets names unknown feature sets {sorted(unknown)}; known: {sorted(fs.X)}")

    rows: dict[str, dict] = {}
    task = minority = positive = None
    for name, X in fs.X.items():
        logger.info("evaluating feature set %r (%d cases x %d features)", name, *X.shape)
        result = run_protocol(
            X,
            fs.y,
            n_folds=n_folds,
            seeds=seeds,
            label_fractions=label_fractions,
            C_grid=DEFAULT_C_GRID if C_grid is None else C_grid,
            class_weight=class_weight,
            val_fraction=val_fraction,
            positive_label=positive_label,
            n_bootstrap=n_bootstrap,
        )
        task, positive, minority = result.task, result.positive_label, result.minority_label
        spec = tables[name]
        paths = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        rows[name] = {
            "kind": "features",
            "sources": [{"path": str(p), "sha256": sha256_file(p)} for p in paths],
            "n_features": int(X.shape[1]),
            "protocol": result.to_dict(),
            "cluster_agreement": cluster_agreement(X, fs.y, seed=cluster_seed) if name in analysis_sets else None,
            "correlation": correlation_summary(X) if name in analysis_sets else None,
        }
    for name, spec in (extra_rows or {}).items():
        if name in rows:
            raise ValueError(f"extra row {name!r} has the same name as a feature set")
        result = summarise_predictions(
            fs.ids, fs.y, _load_records(spec, name), positive_label=positive_label, name=name, n_bootstrap=n_bootstrap
        )
        rows[name] = {
            "kind": "baseline",
            "sources": [{"path": str(spec), "sha256": sha256_file(spec)}]
            if isinstance(spec, (str, os.PathLike))
            else [],
            "n_features": None,
            "protocol": result.to_dict(),
            "cluster_agreement": None,
            "correlation": None,
        }

    kinds = {
        n: _table_kind(spec) for n, spec in tables.items() if isinstance(spec, (str, os.PathLike)) or len(spec) == 1
    }
    items = {} if isinstance(labels_source, Mapping) else _datalist_items(labels_source, sections)
    if explorer:
        explorer_results = _explore(fs, kinds, items, explorer_k_range, centre_key, cluster_seed)
    else:
        explorer_results = {}

    results = {
        "task": task,
        "ids": fs.ids,
        "y": fs.y.tolist(),
        "classes": classes.tolist(),
        "label_names": names,
        "positive_label": _py(positive),
        "minority_label": _py(minority),
        "class_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        "label_fractions": [float(f) for f in label_fractions],
        "excluded_unlabelled": sorted(set(fs.excluded_unlabelled) - set(exclude)),
        "excluded": exclude,
        "rows": rows,
        "cluster_explorer": explorer_results,
        "provenance": _provenance(tables, labels_source, settings, cluster_seed),
    }
    write_report(results, out_dir, plots_data=fs.X if plots else None, plots=plots, case_items=items)
    return results


def _table_kind(spec) -> str | None:
    """The ``kind`` in a single table's provenance sidecar (``radiomics``, ``ssl_embeddings``...); None otherwise."""
    mp = meta_path(spec if isinstance(spec, (str, os.PathLike)) else spec[0])
    if not mp.is_file():
        return None
    return json.loads(mp.read_text(encoding="utf-8")).get("kind")


def _datalist_items(path, sections: Sequence[str]) -> dict[str, dict]:
    """``{id: item}`` (absolute paths) for the montage and the centres; empty when the datalist cannot be resolved
    (labels come from it anyway, so a failure here would only lose the illustration)."""
    from scripts.downstream.clusters import datalist_items

    try:
        return datalist_items(path, sections)
    except (OSError, ValueError, KeyError) as e:
        logger.warning("cluster explorer: cannot read the datalist items of %s (%s); no centres, no montage", path, e)
        return {}


def _explore(fs, kinds: Mapping, items: Mapping, k_range, centre_key: str, seed: int) -> dict:
    """Cluster explorer of every single-table feature set but the radiomics one (provenance kind ``radiomics``,
    or the set named ``trad`` when no sidecar says so): the SSL embeddings."""
    from scripts.downstream.clusters import cluster_explorer

    radiomics = next((n for n, k in kinds.items() if k == "radiomics"), "trad" if "trad" in kinds else None)
    targets = [n for n in kinds if n in fs.X and n != radiomics]
    centres = None
    if items and all(centre_key in items.get(i, {}) for i in fs.ids):
        centres = [str(items[i][centre_key]) for i in fs.ids]
    out = {}
    for name in targets:
        logger.info("cluster explorer: %s", name)
        out[name] = cluster_explorer(
            fs.X[name],
            fs.ids,
            fs.y.tolist(),
            centres=centres,
            radiomics=fs.X[radiomics] if radiomics else None,
            radiomics_columns=fs.columns[radiomics] if radiomics else (),
            k_range=k_range,
            seed=seed,
        )
        out[name]["radiomics_set"] = radiomics
    return out


def _bundle_version() -> str:
    """``version`` of the running bundle's ``configs/metadata.json`` (as ``scripts.pretrain.embed.bundle_version``, without
    importing torch/MONAI into the evaluation)."""
    meta = Path(__file__).resolve().parents[2] / "configs" / "metadata.json"
    return json.loads(meta.read_text(encoding="utf-8"))["version"] if meta.is_file() else "unknown"


def _provenance(tables: Mapping, labels_source, settings: Mapping | None, cluster_seed: int) -> dict:
    """What produced this report: bundle version, the datalist and its hash, checkpoints of the SSL tables."""
    checkpoints = {}
    for spec in tables.values():
        for path in [spec] if isinstance(spec, (str, os.PathLike)) else list(spec):
            mp = meta_path(path)
            meta = json.loads(mp.read_text(encoding="utf-8")) if mp.is_file() else {}
            if meta.get("checkpoint_sha256"):
                checkpoints[str(path)] = {"checkpoint": meta.get("checkpoint"), "sha256": meta["checkpoint_sha256"]}
    datalist = None if isinstance(labels_source, Mapping) else str(Path(labels_source).resolve())
    return {
        "bundle_version": _bundle_version(),
        "datalist": datalist,
        "datalist_sha256": sha256_file(datalist) if datalist else None,
        "checkpoints": checkpoints,
        "cluster_seed": int(cluster_seed),
        "settings": dict(settings or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


# ------------------------------------------------------------------------------------------------------------ tables
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


def render_markdown(results: dict, plot_files: Sequence[str] = ()) -> str:
    task = results["task"]
    first = next(iter(results["rows"].values()))["protocol"]["settings"]
    counts = ", ".join(f"{_display(results, c)} ({c}): {n}" for c, n in results["class_counts"].items())
    lines = ["# Downstream evaluation", "", f"Task: {task}; {len(results['ids'])} labelled cases; classes {counts}."]
    if task == "binary":
        lines.append(
            f"Positive label (sensitivity): {_display(results, results['positive_label'])}; "
            "specificity is the recall of the other class."
        )
    else:
        lines.append(f"Minority class (minority-class accuracy): {_display(results, results['minority_label'])}.")
    if "n_folds" in first:
        lines.append(
            f"Protocol: stratified {first['n_folds']}-fold CV, seeds {first['seeds']}, linear SVM "
            f"(class_weight={first['class_weight']}), C in {[float(f'{c:.3g}') for c in first['C_grid']]} "
            f"tuned by balanced accuracy on {100 * first['val_fraction']:g}% of each training fold; "
            "scaler fitted on training rows only."
        )
    if results.get("excluded_unlabelled"):
        lines.append(f"Excluded (no label in the datalist): {len(results['excluded_unlabelled'])} case(s).")
    for case_id, reason in sorted((results.get("excluded") or {}).items()):
        lines.append(f"Excluded from every feature set: `{case_id}` ({reason}).")
    lines += [
        "",
        "## Table 2 layout (mean over test folds)",
        "",
        paper_table(results),
        "",
        "## Mean ± sd over test folds (all seeds × folds)",
        "",
        "Rows marked * give no fold assignment: mean ± sd over seeds instead.",
        "",
        metric_table(results, _cell_folds),
        "",
    ]
    if task == "multiclass":
        per_class = [(f"recall_{c}", f"Recall {_display(results, c)}") for c in results["classes"]]
        lines += ["## Per-class recall (mean ± sd over folds)", "", metric_table(results, _cell_folds, per_class), ""]
    lines += [
        "## Mean ± sd over seeds (metric of each seed's pooled out-of-fold predictions)",
        "",
        metric_table(results, _cell_seeds),
        "",
        "## Pooled out-of-fold predictions, bootstrap 95% CI (stratified over cases)",
        "",
        metric_table(results, _cell_ci),
        "",
    ]
    cluster = _cluster_table(results)
    if cluster:
        lines += ["## Cluster agreement (k-means vs labels) and pairwise feature correlation (Fig. 2)", "", cluster, ""]
    for name, ex in (results.get("cluster_explorer") or {}).items():
        lines += explorer_markdown(results, name, ex)
    if plot_files:
        lines += ["## Plots", ""]
        for p in plot_files:
            lines.append(f"![{Path(p).stem}]({Path(p).name})")
            if Path(p).stem.startswith("confusion_"):
                lines.append(f"*{confusion_caption(results)}*")
        lines.append("")
    return "\n".join(lines)


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


def explorer_markdown(results: dict, name: str, ex: dict) -> list[str]:
    sil = ", ".join(f"k={k}: {v:.3f}" for k, v in ex["silhouette"].items())
    lines = [f"## Cluster explorer: {name}", "", f"Silhouette by k (k-means, standardised features): {sil}.", ""]
    for run in ex["runs"]:
        why = "best silhouette" if run["k"] == ex["best_k"] else "the paper's k"
        lines += [f"### k = {run['k']} ({why})", ""]
        for title, header, body in explorer_tables(results, run):
            lines += [f"{title}:", "", _md_table(header, body), ""]
        central = "; ".join(f"cluster {c}: {', '.join(ids)}" for c, ids in run["central_ids"].items())
        lines += [f"Most central cases: {central}.", ""]
    return lines


# ------------------------------------------------------------------------------------------------------------- plots
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _roc_points(is_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="stable")
    s, p = score[order], is_pos[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tpr = np.r_[0.0, np.cumsum(p)[last_of_tie] / max(p.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(~p)[last_of_tie] / max((~p).sum(), 1)]
    return fpr, tpr


def _runs_of(row: dict, fraction: float) -> list[dict]:
    return [r for r in row["protocol"]["runs"] if math.isclose(r["fraction"], fraction)]


def plot_roc(results: dict, out_dir: Path) -> list[Path]:
    """One ROC figure per label fraction, one curve per row (all seeds' out-of-fold scores pooled)."""
    y = np.asarray(results["y"])
    pos = np.asarray([str(v) == str(results["positive_label"]) for v in y])
    paths = []
    for f in results["label_fractions"]:
        fig = Figure(figsize=(5, 5), layout="constrained")
        ax = fig.subplots()
        for name, row in results["rows"].items():
            runs = [r for r in _runs_of(row, f) if r["scores"] is not None]
            if not runs:
                continue
            fpr, tpr = _roc_points(np.tile(pos, len(runs)), np.concatenate([np.asarray(r["scores"]) for r in runs]))
            auc = row["protocol"]["summary"][fraction_key(f)]["auc"]["pooled"]
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(
            xlabel="1 - specificity",
            ylabel="sensitivity",
            xlim=(0, 1),
            ylim=(0, 1.01),
            title=f"ROC, positive = {_display(results, results['positive_label'])}, {_fraction_label(f)}",
        )
        ax.legend(loc="lower right", fontsize=8)
        paths.append(_save(fig, out_dir / f"roc_{100 * f:g}pct.png"))
    return paths


def plot_confusion(results: dict, name: str, row: dict, out_dir: Path) -> Path:
    """Confusion matrices (counts summed over seeds, colour = row-normalised) per label fraction."""
    classes = [str(c) for c in results["classes"]]
    y = [str(v) for v in results["y"]]
    fractions = results["label_fractions"]
    fig = Figure(figsize=(4.2 * len(fractions), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(fractions)))
    for ax, f in zip(axes, fractions):
        cm = np.zeros((len(classes), len(classes)), dtype=int)
        for r in _runs_of(row, f):
            for t, p in zip(y, r["y_pred"]):
                cm[classes.index(t), classes.index(str(p))] += 1
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]}\n{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
        ticks = [_display(results, c) for c in results["classes"]]
        ax.set_xticks(range(len(classes)), ticks, rotation=30)
        ax.set_yticks(range(len(classes)), ticks)
        ax.set(xlabel="predicted", ylabel="true", title=f"{name}, {_fraction_label(f)}")
    return _save(fig, out_dir / f"confusion_{_slug(name)}.png")


def pca_2d(X: np.ndarray) -> np.ndarray:
    """First two principal components of the standardised features (constant columns dropped)."""
    Z, _ = standardise_columns(X)
    if Z.shape[1] == 0:
        return np.zeros((Z.shape[0], 2))
    u, s, _ = np.linalg.svd(Z, full_matrices=False)
    pcs = u[:, :2] * s[:2]
    return np.pad(pcs, ((0, 0), (0, 2 - pcs.shape[1])))


def plot_embedding(results: dict, name: str, X: np.ndarray, out_dir: Path) -> Path:
    """PCA map of one feature set coloured by label and, when available, by its k-means cluster."""
    xy = pca_2d(X)
    y = [str(v) for v in results["y"]]
    ca = results["rows"].get(name, {}).get("cluster_agreement")
    panels = [("label", y)] + ([("k-means cluster", [str(c) for c in ca["clusters"]])] if ca else [])
    fig = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, colour_by) in zip(axes, panels):
        for value in sorted(set(colour_by)):
            m = np.asarray([c == value for c in colour_by])
            label = _display(results, value) if title == "label" else f"cluster {value}"
            ax.scatter(xy[m, 0], xy[m, 1], s=12, alpha=0.8, label=f"{label} ({int(m.sum())})")
        ax.set(xlabel="PC 1", ylabel="PC 2", title=f"{name}: by {title}")
        ax.legend(fontsize=7)
    if ca:
        fig.suptitle(f"ARI {ca['ari']:.3f}, NMI {ca['nmi']:.3f}", fontsize=9)
    return _save(fig, out_dir / f"embedding_{_slug(name)}.png")


def plot_correlation_density(results: dict, out_dir: Path) -> Path | None:
    """Fig.-2-style density of pairwise feature correlations, one curve per analysed feature set."""
    rows = {
        n: r["correlation"] for n, r in results["rows"].items() if r.get("correlation") and r["correlation"]["n_pairs"]
    }
    if not rows:
        return None
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, corr in rows.items():
        edges, counts = np.asarray(corr["hist_edges"]), np.asarray(corr["hist_counts"], dtype=float)
        density = counts / (counts.sum() * np.diff(edges))
        ax.plot((edges[:-1] + edges[1:]) / 2, density, label=f"{name} (mean |r| {corr['mean_abs']:.2f})")
    ax.set(
        xlabel="Pearson correlation between features",
        ylabel="density",
        xlim=(-1, 1),
        title="Pairwise feature correlations",
    )
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "correlation_density.png")


def plot_montage(results: dict, name: str, run: dict, slices: Mapping[str, np.ndarray], out_dir: Path) -> Path:
    """Mid-slices of each cluster's most central cases: one row per cluster, nearest to the centroid first."""
    label_of = dict(zip(results["ids"], results["y"]))
    central = run["central_ids"]
    n_cols = max(1, max(len(v) for v in central.values()))
    fig = Figure(figsize=(1.9 * n_cols + 0.6, 2.0 * len(central)), layout="constrained")
    axes = np.asarray(fig.subplots(len(central), n_cols, squeeze=False))
    for r, (c, ids) in enumerate(central.items()):
        for j in range(n_cols):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(ids) and ids[j] in slices:
                ax.imshow(np.asarray(slices[ids[j]]).T, cmap="gray", origin="lower")
            if j < len(ids):
                ax.set_title(f"{ids[j]}\n{_display(results, label_of.get(ids[j]))}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"cluster {c} ({run['sizes'][c]})", fontsize=8)
    fig.suptitle(f"{name}, k = {run['k']}: most central cases per cluster (axial mid-slice of the lesion)", fontsize=9)
    return _save(fig, out_dir / f"montage_{_slug(name)}_k{run['k']}.png")


# ------------------------------------------------------------------------------------------------------ write_report
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


def write_report(
    results: dict,
    out_dir: str | os.PathLike,
    *,
    plots_data: Mapping[str, np.ndarray] | None = None,
    plots: bool = True,
    case_items: Mapping[str, Mapping] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``report.html`` (self-contained) and the PNG plots into ``out_dir``;
    returns ``{what: path}``. ``case_items`` (``{id: datalist item}``) give the cluster montages their images."""
    from scripts.downstream.report_html import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if plots:
        if results["task"] == "binary":
            for p in plot_roc(results, out):
                written[p.stem] = p
        for name, row in results["rows"].items():
            p = plot_confusion(results, name, row, out)
            written[p.stem] = p
        for name, X in (plots_data or {}).items():
            if np.asarray(X).shape[0] != len(results["ids"]):
                raise ValueError(
                    f"plots_data[{name!r}] has {np.asarray(X).shape[0]} rows, results have {len(results['ids'])} cases"
                )
            p = plot_embedding(results, name, X, out)
            written[p.stem] = p
        p = plot_correlation_density(results, out)
        if p:
            written[p.stem] = p
        if case_items:
            from scripts.downstream.clusters import montage_slices

            for name, ex in (results.get("cluster_explorer") or {}).items():
                for run in ex["runs"]:
                    ids = [i for v in run["central_ids"].values() for i in v]
                    slices = montage_slices(case_items, ids)
                    if slices:
                        p = plot_montage(results, name, run, slices, out)
                        written[p.stem] = p
    atomic_write_json(out / "results.json", _json_safe(results))
    atomic_write_text(out / "report.md", render_markdown(results, [str(p) for p in written.values()]))
    atomic_write_text(out / "report.html", render_html(results, written))
    return {"results": out / "results.json", "report": out / "report.md", "html": out / "report.html", **written}
