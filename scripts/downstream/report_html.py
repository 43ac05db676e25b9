"""``report.html``: the evaluation report as one self-contained file (tables, plots, cluster explorer, provenance).

Every image is embedded as a ``data:image/png;base64`` URI and the style sheet is inline, so the file opens offline,
can be mailed or attached to a ticket, and shows the same thing anywhere. All text is HTML-escaped. The content
mirrors ``report.md``: both are built from the same ``results`` dict with the tables of
``scripts.downstream.report_tables``.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from scripts.downstream import report_tables as rep

STYLE = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1360px;margin:0 auto;
padding:1.5em;color:#1b1f24;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}
th,td{border:1px solid #d0d7de;padding:.3em .55em;text-align:right}td{white-space:nowrap}
th{background:#f3f5f7;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}td.t,th.t{text-align:left}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:1em 1.5em;align-items:start}
figure{margin:0 0 1em}figure img{width:100%;height:auto}figure.wide img{width:auto;max-width:100%}
figcaption{font-size:.85em;color:#57606a}
.note{color:#57606a;font-size:.9em}.scroll{overflow-x:auto}
nav a{margin-right:1em}code{background:#f3f5f7;padding:0 .25em;word-break:break-all}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
pre{background:#f6f8fa;padding:.8em;font-size:.8em;overflow-x:auto}
"""


NUMBER = re.compile(r"^(–|[-+\u2212]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(\s*(±|\[|/).*|\*)?)$")


def _bold(text: str) -> str:
    """Markdown ``**bold**`` of an already escaped text as ``<strong>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A plain, escaped HTML table (the formatter that ``scripts.downstream.report_tables``' builders accept)."""
    text_cols = {j for j in range(len(header)) if j > 0 and body and not NUMBER.match(str(body[0][j]))}
    head = "".join(
        f'<th class="t">{esc(h)}</th>' if j in text_cols else f"<th>{esc(h)}</th>" for j, h in enumerate(header)
    )
    rows = "".join("<tr>" + "".join(_td(c, j) for j, c in enumerate(r)) + "</tr>" for r in body)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _td(cell, column: int) -> str:
    """Numbers right-aligned (they line up by digit), text left-aligned."""
    text = str(cell)
    numeric = column > 0 and bool(NUMBER.match(text))
    return f"<td>{esc(text)}</td>" if numeric or column == 0 else f'<td class="t">{esc(text)}</td>'


def data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: str | Path, caption: str, alt: str | None = None, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><img src="{data_uri(path)}" alt="{esc(alt or Path(path).stem)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _settings_text(results: dict) -> list[str]:
    first = next(iter(results["rows"].values()))["protocol"]["settings"]
    counts = ", ".join(f"{rep._display(results, c)} ({c}): {n}" for c, n in results["class_counts"].items())
    out = [f"Task: {results['task']}; {len(results['ids'])} labelled cases; classes {counts}."]
    if results["task"] == "binary":
        out.append(
            f"Positive label (sensitivity): {rep._display(results, results['positive_label'])}; "
            "specificity is the recall of the other class."
        )
    else:
        out.append(f"Minority class (minority-class accuracy): {rep._display(results, results['minority_label'])}.")
    if "n_folds" in first:
        out.append(
            f"Protocol: stratified {first['n_folds']}-fold CV, seeds {first['seeds']}, linear SVM "
            f"(class_weight={first['class_weight']}), C tuned by balanced accuracy on "
            f"{100 * first['val_fraction']:g}% of each training fold; scaler fitted on training rows only."
        )
    if results.get("excluded_unlabelled"):
        out.append(f"Excluded (no label in the datalist): {len(results['excluded_unlabelled'])} case(s).")
    for case_id, reason in sorted((results.get("excluded") or {}).items()):
        out.append(f"Excluded from every feature set: {case_id} ({reason}).")
    return out


def _plot_caption(results: dict, stem: str) -> str:
    if stem.startswith("confusion_"):
        return rep.confusion_caption(results)
    if stem.startswith("roc_"):
        return "ROC curves from every seed's pooled out-of-fold scores; AUC in the legend."
    if stem.startswith("embedding_"):
        return "First two principal components of the standardised features, by label and by k-means cluster."
    if stem == "correlation_density":
        return "Density of pairwise Pearson correlations between features (the paper's Fig. 2)."
    return stem


def _explorer_html(results: dict, name: str, ex: dict, plots: Mapping[str, Path]) -> list[str]:
    sil_body = [[str(k), f"{v:.3f}"] for k, v in ex["silhouette"].items()]
    parts = [
        f'<h3 id="explorer-{esc(rep._slug(name))}">{esc(name)}</h3>',
        "<p class='note'>k-means on the standardised features; k by the best silhouette "
        f"(k = {ex['best_k']}) and the paper's k = 3. Radiomic profile from the "
        f"{esc(ex.get('radiomics_set') or 'radiomics')} table.</p>",
        html_table(["k", "Silhouette"], sil_body),
    ]
    for run in ex["runs"]:
        why = "best silhouette" if run["k"] == ex["best_k"] else "the paper's k"
        sizes = ", ".join(f"cluster {c}: {n}" for c, n in run["sizes"].items())
        parts.append(f"<h4>k = {run['k']} ({esc(why)}); sizes {esc(sizes)}</h4>")
        for title, header, body in rep.explorer_tables(results, run):
            parts += [f"<p>{esc(title)}</p>", html_table(header, body)]
        stem = f"montage_{rep._slug(name)}_k{run['k']}"
        if stem in plots:
            parts.append(
                figure(
                    plots[stem],
                    "Each row is a cluster, its cases nearest to the centroid first: axial slice through the middle of "
                    "the lesion mask, cropped to the lesion; the title gives the case id and its label.",
                    wide=True,
                )
            )
    return parts


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """Nested settings as ``a#b`` keys (the bundle's config-id notation) with leaf values."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + "#") if isinstance(v, Mapping) and v else [(key, v)]
    return out


def render_html(results: dict, plots: Mapping[str, str | Path] | None = None) -> str:
    """The whole report as an HTML document; ``plots``: ``{stem: png path}`` as ``write_report`` made them."""
    plots = {k: Path(v) for k, v in (plots or {}).items()}
    prov = results.get("provenance") or {}
    explorer = results.get("cluster_explorer") or {}
    title = "Downstream evaluation"
    body = [f"<h1>{esc(title)}</h1>"]
    nav = [("verdict", "Verdict")] if results.get("verdict") else []
    nav += [("table2", "Table 2"), ("ci", "Uncertainty"), ("plots", "Plots")]
    if explorer:
        nav.append(("explorer", "Cluster explorer"))
    nav.append(("provenance", "Provenance"))
    body.append("<nav>" + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in nav) + "</nav>")
    body += [f"<p>{esc(line)}</p>" for line in _settings_text(results)]
    if results.get("verdict"):
        body.append('<section class="verdict"><h2 id="verdict">Verdict: do the SSL features add to radiomics?</h2>')
        body += [f"<p>{_bold(esc(p))}</p>" for p in results["verdict"]["text"].split("\n\n")]
        body.append("</section>")
    body += [
        '<h2 id="table2">Table 2 layout (mean over test folds)</h2>',
        rep.paper_table(results, fmt=html_table),
        '<h2 id="ci">Mean ± sd over test folds (all seeds × folds)</h2>',
        "<p class='note'>Rows marked * give no fold assignment: mean ± sd over seeds instead.</p>",
        rep.metric_table(results, rep._cell_folds, fmt=html_table),
    ]
    if results["task"] == "multiclass":
        per_class = [(f"recall_{c}", f"Recall {rep._display(results, c)}") for c in results["classes"]]
        body += [
            "<h2>Per-class recall (mean ± sd over folds)</h2>",
            rep.metric_table(results, rep._cell_folds, per_class, fmt=html_table),
        ]
    body += [
        "<h2>Mean ± sd over seeds (metric of each seed's pooled out-of-fold predictions)</h2>",
        rep.metric_table(results, rep._cell_seeds, fmt=html_table),
        "<h2>Pooled out-of-fold predictions, bootstrap 95% CI (stratified over cases)</h2>",
        rep.metric_table(results, rep._cell_ci, fmt=html_table),
    ]
    for anchor, title, note, table in (
        ("paired", "Paired differences (A - B on the same cases, folds and seeds)", rep.PAIRED_NOTE,
         rep.paired_table(results, fmt=html_table)),
        ("complementarity", "Complementarity: what the SSL features carry beyond radiomics", rep.COMPLEMENTARITY_NOTE,
         rep.complementarity_table(results, fmt=html_table)),
    ):  # fmt: skip
        if table:
            body += [f'<h2 id="{anchor}">{esc(title)}</h2>', f"<p class='note'>{esc(note)}</p>", table]
    cluster = rep._cluster_table(results, table=html_table)
    if cluster:
        body += ["<h2>Cluster agreement (k-means vs labels) and pairwise feature correlation (Fig. 2)</h2>", cluster]
    general = [s for s in plots if not s.startswith("montage_")]
    if general:
        body.append('<h2 id="plots">Plots</h2>')
        body.append(
            '<div class="figs">' + "".join(figure(plots[s], _plot_caption(results, s)) for s in general) + "</div>"
        )
    if explorer:
        body.append('<h2 id="explorer">Cluster explorer</h2>')
        for name, ex in explorer.items():
            body += _explorer_html(results, name, ex, plots)
    body.append('<h2 id="provenance">Provenance</h2>')
    items = [
        ("Bundle version", prov.get("bundle_version")),
        ("Datalist", prov.get("datalist")),
        ("Datalist SHA-256", prov.get("datalist_sha256")),
        ("Report written", prov.get("created")),
    ]
    body.append("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd><code>{esc(v)}</code></dd>" for k, v in items) + "</dl>")
    ck = prov.get("checkpoints") or {}
    if ck:
        body.append("<p>Checkpoints behind the SSL tables:</p>")
        body.append(
            html_table(["Table", "Checkpoint", "SHA-256"], [[t, c["checkpoint"], c["sha256"]] for t, c in ck.items()])
        )
    src = [[name, s["path"], s["sha256"]] for name, row in results["rows"].items() for s in row.get("sources", [])]
    if src:
        body += ["<p>Inputs of each row:</p>", html_table(["Row", "File", "SHA-256"], src)]
    settings = {
        "protocol": next(iter(results["rows"].values()))["protocol"]["settings"],
        **(prov.get("settings") or {}),
    }
    flat = _flatten(rep._json_safe(settings))
    body += ["<p>Settings:</p>", html_table(["Setting", "Value"], [[k, json.dumps(v, default=str)] for k, v in flat])]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
