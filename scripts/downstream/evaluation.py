"""Downstream evaluation of a cohort: feature tables joined with the datalist's labels, the protocol run on every
feature set, baselines, paired differences and representation analyses gathered into one results object.

:func:`evaluate` is what the bundle's ``evaluating`` workflow calls: :func:`evaluate_cohort` computes the results
(``scripts.downstream.protocol`` runs the folds, ``scripts.downstream.metrics`` scores them) and
``scripts.downstream.report.write_report`` renders them; the report itself runs nothing.

The results dict (also the content of ``results.json``) is plain JSON::

    {
      "task": "binary" | "multiclass",
      "ids": [case id, ...],  "y": [label, ...],          # row order of every per-case list below
      "classes": [...], "label_names": {"0": "LGG", ...},  # display names, keyed by str(label)
      "positive_label": ..., "minority_label": ...,  "class_counts": {str(label): n},
      "label_fractions": [1.0, 0.5],
      "excluded_unlabelled": [ids present in tables but unlabelled in the datalist],
      "excluded": {id: reason},                          # e.g. radiomics failures, left out of every row
      "rows": {                                          # table rows, in order
        name: {
          "kind": "features" | "baseline",
          "sources": [{"path", "sha256"}],  "n_features": int | None,
          "protocol": ProtocolResult.to_dict():          # scripts.downstream.protocol
              {"task", "classes", "positive_label", "minority_label", "settings",
               "summary": {fraction key ("1.0"): {metric: {"folds": {"mean","sd","n"} | None,
                                                           "seeds": {"mean","sd","n"},
                                                           "pooled": float, "ci95": [lo, hi] | None}}},
               "runs": [{"seed", "fraction", "best_C", "n_not_converged", "fold", "y_pred", "scores"}]},
          "cluster_agreement": {"ari", "nmi", "k", "clusters": [...]} | None,
          "correlation": scripts.downstream.representation.correlation_summary(...) | None,
        }
      },
      "paired_differences": {                            # e.g. "trad+ssl - trad": does SSL add to radiomics?
        "A - B": {"a": A, "b": B, "n_bootstrap": int,
                  "summary": {fraction key: {metric: {"difference": float, "ci95": [lo, hi] | None}}}}
      },
      "cluster_explorer": {...}, "provenance": {...}
    }
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scripts.data.datalist import read_cases
from scripts.downstream.complementarity import complementarity, verdict, weighted_name
from scripts.downstream.feature_sets import FeatureSets, check_label_map, load_and_join
from scripts.downstream.metrics import paired_difference
from scripts.downstream.protocol import (
    BlockWeights,
    ProtocolResult,
    ProtocolSettings,
    run_protocol,
    summarise_predictions,
)
from scripts.downstream.representation import cluster_agreement, correlation_summary
from scripts.feature_table import read_provenance, table_kind
from scripts.io_utils import py_scalar, sha256_file

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- evaluate
TableSpec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class Evaluation:
    """What :func:`evaluate_cohort` computed: the JSON-ready ``results``, each feature matrix (rows in
    ``results["ids"]`` order, for the embedding maps) and the datalist items (for the cluster montages)."""

    results: dict
    features: dict[str, np.ndarray] = field(default_factory=dict)
    case_items: dict[str, dict] = field(default_factory=dict)


def _paths(spec: TableSpec) -> list:
    return [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)


def _labels(
    labels_source, sections: Sequence[str], label_names: Mapping | None, exclude: Mapping | None
) -> tuple[dict, list[str], dict[str, str], dict[str, dict]]:
    """(labels of the cases to score, ids known to be unlabelled or excluded, ``{excluded id: reason}``,
    ``{id: datalist item}`` for the cluster explorer's centres and montage), from one read of the datalist."""
    if isinstance(labels_source, Mapping):
        labels, unlabelled, items = dict(labels_source), [], {}
    else:
        items, labels, unlabelled = read_cases(labels_source, sections)
    if label_names:  # a label outside the profile's map would silently become an extra class
        check_label_map(labels, label_names)
    exclude = {str(k): str(v) for k, v in (exclude or {}).items()}
    if exclude:
        logger.warning("leaving %d case(s) out of every feature set: %s", len(exclude), exclude)
        labels = {k: v for k, v in labels.items() if str(k) not in exclude}
        unlabelled = list(unlabelled) + sorted(exclude)
    return labels, unlabelled, exclude, items


def _load_records(spec: str | os.PathLike | Sequence[Mapping], name: str) -> list[Mapping]:
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"predictions of extra row {name!r} not found: {path}")
        spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, list) or not all(isinstance(r, Mapping) for r in spec):
        raise ValueError(f"extra row {name!r}: expected a list of prediction records")
    return list(spec)


def _row(kind: str, sources: list, n_features, result: ProtocolResult, X=None, analyse=False, seed=0) -> dict:
    return {
        "kind": kind,
        "sources": [{"path": str(p), "sha256": sha256_file(p)} for p in sources],
        "n_features": n_features,
        "protocol": result.to_dict(),
        "cluster_agreement": cluster_agreement(X, result.y, seed=seed) if analyse else None,
        "correlation": correlation_summary(X) if analyse else None,
    }


def default_pairs(tables: Mapping[str, TableSpec]) -> list[tuple[str, str]]:
    """(A, B) pairs for paired differences: every feature set built from several tables against each single-table
    set that is one of its parts (``trad+ssl`` - ``trad``: what the SSL features add to pyradiomics)."""
    single = {n: str(Path(_paths(s)[0]).resolve()) for n, s in tables.items() if len(_paths(s)) == 1}
    pairs = []
    for name, spec in tables.items():
        parts = [str(Path(p).resolve()) for p in _paths(spec)]
        if len(parts) > 1:
            pairs += [(name, other) for other, path in single.items() if path in parts]
    return pairs


def _paired(results: Mapping[str, ProtocolResult], pairs, n_bootstrap: int) -> dict:
    out = {}
    for a, b in pairs:
        if a not in results or b not in results:
            raise ValueError(f"paired difference {a!r} - {b!r}: both must be rows; rows: {sorted(results)}")
        ra, rb = results[a], results[b]
        summary = paired_difference(
            ra.runs,
            rb.runs,
            ra.y,
            ra.classes,
            ra.positive_label,
            ra.minority_label,
            n_bootstrap=n_bootstrap,
            seed=int(ra.settings.get("bootstrap_seed", 0)),
        )
        out[f"{a} - {b}"] = {"a": a, "b": b, "n_bootstrap": n_bootstrap, "summary": summary}
    return out


def evaluate_cohort(
    tables: Mapping[str, TableSpec],
    labels_source: str | os.PathLike | Mapping[str, object],
    *,
    protocol: ProtocolSettings | None = None,
    label_names: Mapping | None = None,
    sections: Sequence[str] = ("training",),
    extra_rows: Mapping[str, str | os.PathLike | Sequence[Mapping]] | None = None,
    analysis_sets: Sequence[str] | None = None,
    cluster_seed: int = 0,
    exclude: Mapping[str, str] | None = None,
    explorer: bool = True,
    explorer_k_range: Sequence[int] = (2, 8),
    centre_key: str = "centre",
    settings: Mapping | None = None,
    paired: Iterable[Sequence[str]] | None = None,
    weighted_sets: Sequence[str] | str | None = "auto",
    control_set: str | None = "auto",
) -> Evaluation:
    """Run the downstream protocol on every feature set (arguments as in :func:`evaluate`); writes nothing."""
    labels, unlabelled, exclude, items = _labels(labels_source, sections, label_names, exclude)
    kinds = {n: table_kind(_paths(spec)[0]) for n, spec in tables.items() if len(_paths(spec)) == 1}
    radiomics = _radiomics_set(kinds)
    control = _control_set(kinds, radiomics, control_set)
    tables = with_control_combination(tables, radiomics, control)
    fs = load_and_join(tables, labels, unlabelled=unlabelled)
    classes, counts = np.unique(fs.y, return_counts=True)
    names = {str(c): str(c) for c in classes} | {str(k): str(v) for k, v in (label_names or {}).items()}
    if analysis_sets is None:
        analysis_sets = [n for n, spec in tables.items() if len(_paths(spec)) == 1]
    unknown = set(analysis_sets) - set(fs.X)
    if unknown:
        raise ValueError(f"analysis_sets names unknown feature sets {sorted(unknown)}; known: {sorted(fs.X)}")
    protocol = protocol if protocol is not None else ProtocolSettings()
    svm = protocol.svm_kwargs()

    rows: dict[str, dict] = {}
    scored: dict[str, ProtocolResult] = {}
    blocks = _weighted_blocks(tables, fs, weighted_sets, protocol.block_weights)
    for name, X in fs.X.items():
        logger.info("evaluating feature set %r (%d cases x %d features)", name, *X.shape)
        result = run_protocol(X, fs.y, **svm)
        scored[name] = result
        analyse = name in analysis_sets
        rows[name] = _row("features", _paths(tables[name]), int(X.shape[1]), result, X, analyse, cluster_seed)
        if name in blocks:
            weighted = weighted_name(name)
            logger.info("evaluating %r: the SSL block's weight tuned with C (grid %s)", weighted, blocks[name].grid)
            result = run_protocol(X, fs.y, block=blocks[name], **svm)
            scored[weighted] = result
            rows[weighted] = _row("features", _paths(tables[name]), int(X.shape[1]), result)
    for name, spec in (extra_rows or {}).items():
        if name in rows:
            raise ValueError(f"extra row {name!r} has the same name as a feature set")
        records = _load_records(spec, name)
        result = summarise_predictions(
            fs.ids, fs.y, records, positive_label=protocol.positive_label, name=name, n_bootstrap=protocol.n_bootstrap
        )
        scored[name] = result
        rows[name] = _row("baseline", [spec] if isinstance(spec, (str, os.PathLike)) else [], None, result)
    pairs = default_pairs(tables) if paired is None else [tuple(p) for p in paired]
    pairs += [(weighted_name(a), b) for a, b in pairs if a in blocks and weighted_name(a) in scored]
    pairs += control_pairs(tables, radiomics, control, scored)

    first = next(iter(scored.values()))
    paired_results = _paired(scored, pairs, protocol.n_bootstrap)
    results = {
        "task": first.task,
        "ids": fs.ids,
        "y": fs.y.tolist(),
        "classes": classes.tolist(),
        "label_names": names,
        "positive_label": py_scalar(first.positive_label),
        "minority_label": py_scalar(first.minority_label),
        "class_counts": {str(c): int(n) for c, n in zip(classes, counts)},
        "label_fractions": list(protocol.label_fractions),
        "excluded_unlabelled": sorted(set(fs.excluded_unlabelled) - set(exclude)),
        "excluded": exclude,
        "rows": rows,
        "paired_differences": paired_results,
        "complementarity": _complementarity(fs, kinds, radiomics, control, protocol.n_folds, protocol.seeds),
        "cluster_explorer": _explore(fs, kinds, items, explorer_k_range, centre_key, cluster_seed) if explorer else {},
        "provenance": _provenance(tables, labels_source, settings, cluster_seed),
    }
    results["verdict"] = verdict(results)
    return Evaluation(results, fs.X, items)


def _weighted_blocks(tables, fs: FeatureSets, weighted_sets, grid) -> dict[str, BlockWeights]:
    """{multi-table set: the columns of its tables after the first} for the sets that get a weighted row: ``auto``
    (every multi-table set, e.g. trad+ssl), a list of names, or none. The widths are the loader's (``fs.widths``)."""
    multi = [n for n, spec in tables.items() if len(_paths(spec)) > 1]
    if weighted_sets in (None, "none", False) or not grid:
        return {}
    names = multi if weighted_sets == "auto" else list(weighted_sets)
    unknown = set(names) - set(multi)
    if unknown:
        raise ValueError(f"weighted_sets names {sorted(unknown)}, which are not multi-table feature sets {multi}")
    blocks = {}
    for name in names:
        n_first = fs.widths[name][0]
        blocks[name] = BlockWeights(tuple(range(n_first, fs.X[name].shape[1])), tuple(float(w) for w in grid))
    return blocks


def with_control_combination(tables: Mapping[str, TableSpec], radiomics: str | None, control: str | None) -> dict:
    """``tables`` plus ``<radiomics>+<control>`` (radiomics with the random-init encoder's features) when both exist
    and it is not there yet: the same measure of "adds to radiomics" for an untrained network, beside the SSL rows."""
    tables = dict(tables)
    name = f"{radiomics}+{control}"
    if radiomics and control and name not in tables:
        tables[name] = [*_paths(tables[radiomics]), *_paths(tables[control])]
    return tables


def control_pairs(tables: Mapping[str, TableSpec], radiomics: str | None, control: str | None, scored) -> list:
    """``(<radiomics>+<ssl>, <radiomics>+<control>)`` for every SSL table (plain and weighted rows): does the
    pretrained encoder add more to radiomics than the untrained one, on the same cases, folds and seeds?"""
    if not (radiomics and control):
        return []
    base = f"{radiomics}+{control}"
    out = []
    for name in tables:
        if name.startswith(f"{radiomics}+") and name != base and len(_paths(tables[name])) == 2:
            for a, b in ((name, base), (weighted_name(name), weighted_name(base))):
                if a in scored and b in scored:
                    out.append((a, b))
    return out


def _radiomics_set(kinds: Mapping[str, str | None]) -> str | None:
    """The single-table set of radiomics (provenance kind ``radiomics``, or the set named ``trad``)."""
    return next((n for n, k in kinds.items() if k == "radiomics"), "trad" if "trad" in kinds else None)


def _control_set(kinds: Mapping[str, str | None], radiomics: str | None, control_set: str | None) -> str | None:
    """The random-init encoder's set: given by name, or ``auto``: the single-table set named ``... random init ...``."""
    if control_set in (None, "none"):
        return None
    if control_set != "auto":
        if control_set not in kinds:
            raise ValueError(f"control_set {control_set!r} is not a single-table feature set: {sorted(kinds)}")
        return control_set
    return next((n for n in kinds if n != radiomics and "random init" in n), None)


def _complementarity(fs: FeatureSets, kinds, radiomics: str | None, control: str | None, n_folds, seeds) -> dict:
    """``scripts.downstream.complementarity`` of every single-table SSL set (and the control) against radiomics."""
    if radiomics is None:
        return {}
    out = {}
    for name in kinds:
        if name == radiomics or name not in fs.X:
            continue
        logger.info("complementarity of %r with %r", name, radiomics)
        out[name] = complementarity(fs.X[name], fs.X[radiomics], fs.y, n_folds=n_folds, seeds=list(seeds)[:3])
        out[name]["radiomics_set"] = radiomics
        out[name]["control"] = name == control
    return out


def evaluate(
    tables: Mapping[str, TableSpec],
    labels_source: str | os.PathLike | Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    plots: bool = True,
    control_table: str | os.PathLike | None = None,
    **kwargs,
) -> dict:
    """Run the downstream protocol on every feature set and write the report into ``out_dir``; returns the results.

    ``labels_source``: a MONAI datalist JSON (labels read from ``sections``) or an ``{id: label}`` mapping.
    ``protocol``: the ``scripts.downstream.protocol.ProtocolSettings`` of every row (folds, seeds, label fractions,
    C grid, class weights, hold-out, bootstrap, positive label, the weighted rows' grid); default its defaults.
    ``extra_rows``: ``{name: records or path to a JSON list of records}``, records as in
    ``scripts.downstream.protocol.summarise_predictions`` (e.g. the supervised baseline). ``analysis_sets``: feature
    sets that get cluster agreement and the correlation density; default every set built from a single table.
    ``exclude``: ``{id: reason}`` of cases to leave out of every feature set (e.g.
    ``scripts.feature_table.failed_cases``), so all rows are scored on the same cases; they are listed with their
    reasons in ``results.json`` and the report. ``paired``: ``[(A, B), ...]`` rows whose paired difference A - B
    (same cases, folds and seeds; bootstrap CI over cases) is reported; default :func:`default_pairs`.
    ``explorer``: run the cluster explorer (``scripts.downstream.clusters``) on every single-table feature set that
    is not the radiomics table (the SSL embeddings), k by silhouette in ``explorer_k_range`` and k = 3; the
    radiomics table (provenance kind ``radiomics``) gives the per-cluster profile, the datalist's ``centre_key`` the
    centres and its images the montage. ``settings``: extra settings recorded in the report's provenance.
    ``weighted_sets``: multi-table sets that also get a row with their SSL block's weight tuned inside each
    training fold (``BlockWeights``; ``auto``: every one, ``none``: off), over the protocol's ``block_weights``. ``control_table``: the
    embeddings of the random-init encoder (``models/checkpoints/model_init.pt``), scored as ``ssl (random init)``
    when the file exists; ``control_set`` names the control row otherwise (``auto``: a set named ``... random init``).
    The complementarity of every SSL table with radiomics and the verdict (``scripts.downstream.complementarity``)
    head the report.
    """
    from scripts.downstream.report import write_report

    tables = with_control(tables, control_table)
    ev = evaluate_cohort(tables, labels_source, **kwargs)
    write_report(ev.results, out_dir, plots_data=ev.features if plots else None, plots=plots, case_items=ev.case_items)
    return ev.results


CONTROL_ROW = "ssl (random init)"


def with_control(tables: Mapping[str, TableSpec], control_table) -> dict[str, TableSpec]:
    """``tables`` plus the random-init control's embeddings as ``ssl (random init)`` when that file exists (a
    missing control is logged, and the verdict says no control was scored)."""
    tables = dict(tables)
    if control_table is None or CONTROL_ROW in tables:
        return tables
    if Path(control_table).is_file():
        tables[CONTROL_ROW] = str(control_table)
    else:
        logger.warning(
            "no random-init control table at %s: embed models/checkpoints/model_init.pt into it (README) so the "
            "report can say whether pretraining beat an untrained network",
            control_table,
        )
    return tables


def _explore(fs: FeatureSets, kinds: Mapping, items: Mapping, k_range, centre_key: str, seed: int) -> dict:
    """Cluster explorer of every single-table feature set but the radiomics one (provenance kind ``radiomics``,
    or the set named ``trad`` when no sidecar says so): the SSL embeddings."""
    from scripts.downstream.clusters import cluster_explorer

    radiomics = _radiomics_set(kinds)
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
        for path in _paths(spec):
            meta = read_provenance(path)
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
