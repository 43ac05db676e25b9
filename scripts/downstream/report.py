"""Evaluation report: ``results.json`` (every figure), ``report.md`` (Table-2-style tables) and PNG plots.

Renders a results object (``scripts.downstream.evaluation.evaluate_cohort`` computes it; its layout is documented
there) and runs nothing: :func:`write_report` writes ``results.json``, ``report.md``, ``report.html``
(``scripts.downstream.report_html``) and the plots. ``plots_data`` (optional, not written to JSON):
``{feature set name: X}`` with rows in ``ids`` order, for the 2D embedding maps. Plots are drawn with matplotlib's
object API (``Figure`` + Agg canvas), so no global backend is switched and nothing depends on a display. A report
written into a folder that holds an earlier one removes the earlier files it does not rewrite (``report_files.json``
lists them), so no plot of an earlier run sits beside this run's report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scripts.downstream.metrics import fraction_key
from scripts.downstream.report_html import render_html
from scripts.downstream.report_tables import (
    COMPLEMENTARITY_NOTE,
    PAIRED_NOTE,
    _cell_ci,
    _cell_folds,
    _cell_seeds,
    _cluster_table,
    _display,
    _fraction_label,
    _json_safe,
    _md_table,
    _slug,
    complementarity_table,
    confusion_caption,
    explorer_tables,
    metric_table,
    paired_table,
    paper_table,
)
from scripts.downstream.representation import standardise_columns
from scripts.io_utils import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


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
    if results.get("verdict"):
        lines += ["", "## Verdict: do the SSL features add to radiomics?", "", results["verdict"]["text"]]
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
    paired = paired_table(results)
    if paired:
        lines += ["## Paired differences (A - B on the same cases, folds and seeds)", "", PAIRED_NOTE, "", paired, ""]
    comp = complementarity_table(results)
    if comp:
        lines += ["## Complementarity: what the SSL features carry beyond radiomics", "", COMPLEMENTARITY_NOTE, "",
                  comp, ""]  # fmt: skip
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
    files = {"results": out / "results.json", "report": out / "report.md", "html": out / "report.html", **written}
    remove_earlier_files(out, files.values())
    return files


MANIFEST = "report_files.json"


def remove_earlier_files(out: Path, written: Iterable[Path]) -> list[str]:
    """Remove the files an earlier report in ``out`` wrote and this one did not (a plot of a row that is gone, a
    montage of another k), so the folder holds one run's report; then record this run's files in
    ``report_files.json``. Only files a report listed there are removed, never anything else in the folder."""
    names = sorted({Path(p).name for p in written})
    manifest = out / MANIFEST
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else []
    except ValueError:
        earlier = []
    stale = sorted({str(n) for n in earlier if isinstance(n, str)} - set(names) - {MANIFEST})
    for name in stale:
        if "/" not in name and name not in ("", ".", ".."):
            (out / name).unlink(missing_ok=True)
    if stale:
        logger.info("report: removed %d file(s) of an earlier report in %s: %s", len(stale), out, ", ".join(stale))
    atomic_write_json(manifest, names)
    return stale
