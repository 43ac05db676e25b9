"""Do the SSL features carry anything that pyradiomics does not? Out-of-fold measures per SSL table.

The paper's claim is that the learned features *add* to the 107 pyradiomics features (Table 2's trad+ssl row). A
pretrained encoder can beat chance alone and still add nothing, because it encodes what radiomics already measures
(lesion size, mean intensity). Three measures say which, per SSL table; every fit sees training folds only:

* ``effective_rank`` — RankMe of the SSL table (``scripts.pretrain.readout``): how many directions it spreads over;
  a few means dimensional collapse.
* ``r2_from_radiomics`` — the share of the standardised SSL features' variance that a ridge regression from the
  standardised radiomics predicts out-of-fold (1: the SSL table is a linear function of radiomics; 0: none of it).
* ``residual_probe_auc`` — what SSL carries *beyond* radiomics: the SSL features minus their ridge prediction from
  radiomics, read out by the monitor's linear probe (``readout.fit_probe``), out-of-fold. A residual that reads out
  at chance adds nothing that a linear model of radiomics lacks.

Beside the same figures of a random-init encoder of the same architecture (the control row) they say whether
pretraining moved the features toward radiomics or away from it. Plain NumPy / scikit-learn; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scripts.pretrain.readout import PROBE_C, effective_rank, fit_probe, probe_scores

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
Folds = Sequence[tuple[np.ndarray, np.ndarray]]


def folds_for(n: int, y: np.ndarray | None, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds when every class has ``n_folds`` cases, plain shuffled K-fold otherwise (or unlabelled)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if y is not None and np.unique(y, return_counts=True)[1].min() >= n_folds:
        return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n), y))
    return list(KFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(n)))


CLIP_SD = 5.0  # standardised values beyond this many training-fold SDs are clipped (see RadiomicsRidge)


class RadiomicsRidge:
    """Ridge regression from standardised radiomics to every standardised SSL feature (alpha by generalised CV),
    both scalers fitted on the rows given to ``fit``: the part of the SSL features that radiomics explains.

    Standardised values are clipped to ±``CLIP_SD``: radiomics have heavy tails (a shape feature of one odd lesion
    can sit 30 training-fold SDs out) and a nearly constant SSL feature has a tiny SD, so a handful of test rows
    otherwise dominated the pooled squared errors (VesselMNIST3D: an out-of-fold R² of -120 for a random network)."""

    def fit(self, trad: np.ndarray, ssl: np.ndarray) -> RadiomicsRidge:
        from sklearn.linear_model import RidgeCV
        from sklearn.preprocessing import StandardScaler

        self.trad_scaler, self.ssl_scaler = StandardScaler().fit(trad), StandardScaler().fit(ssl)
        self.model = RidgeCV(alphas=RIDGE_ALPHAS).fit(self._trad(trad), self.standardised(ssl))
        return self

    def _trad(self, trad: np.ndarray) -> np.ndarray:
        return np.clip(self.trad_scaler.transform(trad), -CLIP_SD, CLIP_SD)

    def standardised(self, ssl: np.ndarray) -> np.ndarray:
        return np.clip(self.ssl_scaler.transform(ssl), -CLIP_SD, CLIP_SD)

    def residual(self, trad: np.ndarray, ssl: np.ndarray) -> np.ndarray:
        """SSL minus its prediction from radiomics, in standardised SSL units."""
        return self.standardised(ssl) - self.model.predict(self._trad(trad))


def _checked(ssl, trad) -> tuple[np.ndarray, np.ndarray]:
    """Both tables as float arrays of the same cases; SSL columns without variance dropped (nothing to explain)."""
    ssl, trad = np.asarray(ssl, dtype=np.float64), np.asarray(trad, dtype=np.float64)
    if ssl.ndim != 2 or trad.ndim != 2 or ssl.shape[0] != trad.shape[0]:
        raise ValueError(f"SSL {ssl.shape} and radiomics {trad.shape} must be [cases, features] tables of one cohort")
    if not (np.isfinite(ssl).all() and np.isfinite(trad).all()):
        raise ValueError("the SSL and radiomics tables must hold finite values only")
    return ssl[:, np.ptp(ssl, axis=0) > 0], trad


def r2_from_radiomics(ssl: np.ndarray, trad: np.ndarray, folds: Folds) -> float:
    """Out-of-fold share of the standardised SSL variance that radiomics predicts linearly: 1 - (pooled squared
    residual) / (pooled squared deviation from the training fold's mean), every SSL feature weighing the same."""
    ssl, trad = _checked(ssl, trad)
    if ssl.shape[1] == 0:
        return float("nan")
    sse = sst = 0.0
    for train, test in folds:
        ridge = RadiomicsRidge().fit(trad[train], ssl[train])
        sse += float((ridge.residual(trad[test], ssl[test]) ** 2).sum())
        sst += float((ridge.standardised(ssl[test]) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def residual_probe(
    ssl: np.ndarray, trad: np.ndarray, y: np.ndarray, folds: Folds, probe_c: float | str = PROBE_C
) -> dict[str, float]:
    """Probe AUC (binary) and balanced accuracy of the SSL residual after radiomics: per training fold, the ridge and
    then the probe are fitted on its rows; the test fold's residuals are scored; predictions pooled."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    ssl, trad = _checked(ssl, trad)
    y = np.asarray(y)
    classes = np.unique(y)
    pred, score = np.empty(len(y), dtype=y.dtype), np.zeros(len(y))
    for train, test in folds:
        ridge = RadiomicsRidge().fit(trad[train], ssl[train])
        probe = fit_probe(ridge.residual(trad[train], ssl[train]), y[train], probe_c)
        r_test = ridge.residual(trad[test], ssl[test])
        pred[test] = probe.predict(r_test)
        if len(classes) == 2:
            score[test] = probe.decision_function(r_test)
    out = {"probe_balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    out["probe_auc"] = float(roc_auc_score(y == classes[1], score)) if len(classes) == 2 else float("nan")
    return out


def complementarity(
    ssl: np.ndarray,
    trad: np.ndarray,
    y: np.ndarray | None = None,
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    probe_c: float | str = PROBE_C,
) -> dict[str, float]:
    """Every measure of one SSL table against the radiomics table (rows: the same cases in the same order), averaged
    over the fold splits of ``seeds``. With labels of two or more classes, also the probe of the SSL table alone and
    of its residual after radiomics, on the same folds."""
    ssl, trad = _checked(ssl, trad)
    labelled = y is not None and len(np.unique(y)) >= 2
    y = np.asarray(y) if labelled else None
    splits = [folds_for(len(ssl), y, n_folds, s) for s in seeds]
    out = {
        "effective_rank": effective_rank(ssl),
        "r2_from_radiomics": float(np.mean([r2_from_radiomics(ssl, trad, f) for f in splits])),
        "n_cases": int(len(ssl)),
        "seeds": [int(s) for s in seeds],
    }
    if not labelled:
        return out
    alone = [probe_scores(ssl, y, f, probe_c) for f in splits]
    resid = [residual_probe(ssl, trad, y, f, probe_c) for f in splits]
    for name, runs in (("probe", alone), ("residual_probe", resid)):
        for metric in ("auc", "balanced_accuracy"):
            out[f"{name}_{metric}"] = float(np.mean([r[f"probe_{metric}"] for r in runs]))
    return out


# ------------------------------------------------------------------------------------------------- paired SVM gain
def paired_gain(
    ssl: np.ndarray,
    trad: np.ndarray,
    y: np.ndarray,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    label_fractions: Sequence[float] = (1.0, 0.5),
    n_bootstrap: int = 1000,
    weighted: bool = True,
    **protocol,
) -> dict:
    """The downstream protocol (``scripts.downstream.protocol.run_protocol``: linear SVM, stratified 5-fold x
    ``seeds``) on trad, ssl, trad+ssl and, with ``weighted``, trad+ssl with the SSL block's weight tuned; the pooled
    AUC (binary) or balanced accuracy of each and the paired differences against trad with their bootstrap 95 % CI,
    per label fraction. Arrays in, no files: what the evaluating workflow computes from tables, for a harness that
    holds embeddings in memory (``benchmarks/learning_curve.py --svm``)."""
    from scripts.downstream.metrics import paired_difference
    from scripts.downstream.protocol import BlockWeights, run_protocol

    ssl, trad = np.asarray(ssl, dtype=np.float64), np.asarray(trad, dtype=np.float64)
    both = np.concatenate([trad, ssl], axis=1)
    common = dict(seeds=seeds, label_fractions=label_fractions, n_bootstrap=n_bootstrap, **protocol)
    rows = {"trad": run_protocol(trad, y, **common), "ssl": run_protocol(ssl, y, **common)}
    rows["trad+ssl"] = run_protocol(both, y, **common)
    if weighted:
        block = BlockWeights(tuple(range(trad.shape[1], both.shape[1])))
        rows["trad+ssl (weighted)"] = run_protocol(both, y, block=block, **common)
    first = rows["trad"]
    key = "auc" if first.task == "binary" else "balanced_accuracy"
    out: dict = {"metric": key, "rows": {}, "differences": {}}
    for name, r in rows.items():
        out["rows"][name] = {f: m[key]["pooled"] for f, m in r.summary.items()}
    for name in [n for n in rows if n.startswith("trad+ssl")]:
        diff = paired_difference(rows[name].runs, first.runs, first.y, first.classes, first.positive_label,
                                 first.minority_label, n_bootstrap=n_bootstrap, seed=0)  # fmt: skip
        out["differences"][f"{name} - trad"] = {f: m[key] for f, m in diff.items()}
    if weighted:
        out["weights"] = [w for r in rows["trad+ssl (weighted)"].runs for w in r.best_weight]
    return out


# ------------------------------------------------------------------------------------------------------------ verdict
def weighted_name(name: str) -> str:
    """The row name of ``name`` with its SSL block's weight tuned: ``trad+ssl (weighted)``,
    ``trad+ssl (plain, weighted)``."""
    return f"{name[:-1]}, weighted)" if name.endswith(")") else f"{name} (weighted)"


def _metric(results: dict) -> tuple[str, str]:
    """(key, words) of the headline metric: AUC for a binary task, balanced accuracy for a multi-class one."""
    return ("auc", "AUC") if results.get("task") == "binary" else ("balanced_accuracy", "balanced accuracy")


def _pooled(results: dict, row: str, key: str, fraction: str) -> float | None:
    agg = results["rows"].get(row, {}).get("protocol", {}).get("summary", {}).get(fraction, {}).get(key)
    return agg.get("pooled") if agg else None


def _diff(results: dict, a: str, b: str, key: str, fraction: str) -> tuple[float, list | None] | None:
    entry = results.get("paired_differences", {}).get(f"{a} - {b}")
    cell = entry["summary"].get(fraction, {}).get(key) if entry else None
    return (cell["difference"], cell["ci95"]) if cell and cell.get("difference") is not None else None


def _judge(diff: tuple[float, list | None] | None) -> str:
    """adds | hurts | unclear | unknown, from the paired difference and its 95 % CI."""
    if diff is None:
        return "unknown"
    ci = diff[1]
    if ci is None:
        return "unclear"
    return "adds" if ci[0] > 0 else "hurts" if ci[1] < 0 else "unclear"


def _judged(diff: tuple[float, list | None] | None) -> dict | None:
    return {"difference": diff[0], "ci95": diff[1], "judgement": _judge(diff)} if diff else None


def verdict(results: dict) -> dict:
    """Does SSL add to radiomics here? One entry per SSL table (the random-init control apart) with the paired
    trad+ssl - trad difference (plain and weighted) and the comparison with the random-init control, at 100 % of the
    labels; ``text`` says it in words for the top of the report."""
    key, words = _metric(results)
    fractions = [str(float(f)) for f in results.get("label_fractions", [1.0])]
    fraction = "1.0" if "1.0" in fractions else (fractions[0] if fractions else "1.0")
    comp = results.get("complementarity", {})
    radiomics = next((c["radiomics_set"] for c in comp.values()), "trad" if "trad" in results["rows"] else None)
    control = next((n for n, c in comp.items() if c.get("control")), None)
    entries = {}
    for name, c in comp.items():
        if name == control:
            continue
        combined = f"{radiomics}+{name}"
        plain = _diff(results, combined, radiomics, key, fraction)
        weighted = _diff(results, weighted_name(combined), radiomics, key, fraction)
        entry = {
            "combined_row": combined,
            "plain": _judged(plain),
            "weighted": _judged(weighted),
            "ssl_alone": _pooled(results, name, key, fraction),
            "radiomics_alone": _pooled(results, radiomics, key, fraction),
            "r2_from_radiomics": c.get("r2_from_radiomics"),
            "residual_probe_auc": c.get("residual_probe_auc"),
            "effective_rank": c.get("effective_rank"),
        }
        if control:
            cc = comp[control]
            base = f"{radiomics}+{control}"
            entry["control"] = {
                "row": control,
                "ssl_alone": _pooled(results, control, key, fraction),
                "r2_from_radiomics": cc.get("r2_from_radiomics"),
                "residual_probe_auc": cc.get("residual_probe_auc"),
                "effective_rank": cc.get("effective_rank"),
                "plain": _judged(_diff(results, base, radiomics, key, fraction)),
                "weighted": _judged(_diff(results, weighted_name(base), radiomics, key, fraction)),
            }
            entry["vs_control"] = {
                "plain": _judged(_diff(results, combined, base, key, fraction)),
                "weighted": _judged(_diff(results, weighted_name(combined), weighted_name(base), key, fraction)),
            }
        entries[name] = entry
    return {"metric": key, "fraction": fraction, "radiomics_set": radiomics, "control": control,
            "entries": entries, "text": verdict_text(entries, words, fraction, control)}  # fmt: skip


def _fmt_diff(d: dict) -> str:
    ci = d["ci95"]
    return f"{d['difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no CI)")


def verdict_text(entries: dict, words: str, fraction: str, control: str | None) -> str:
    """The verdict in words a clinician-researcher reads first (markdown, one paragraph per SSL table)."""
    share = f"{float(fraction) * 100:.0f} %"
    if not entries:
        return (
            "No verdict: the report has no SSL table scored against a radiomics table (it needs a `trad` row and at "
            "least one SSL row)."
        )
    say = {
        "adds": "**adds** to radiomics (the 95 % CI is above 0)",
        "hurts": "**hurts** (the 95 % CI is below 0): the SSL features dilute the radiomics",
        "unclear": "**no evidence that it adds** (the 95 % CI includes 0)",
        "unknown": "not measured",
    }
    paragraphs = []
    for name, e in entries.items():
        parts = [f"**{name}** ({words}, {share} of the training labels)."]
        if e["plain"]:
            parts.append(
                f"Adding these SSL features to the radiomics features changes {words} by {_fmt_diff(e['plain'])} "
                f"(paired over the same cases and folds): {say[e['plain']['judgement']]}."
            )
        if e["weighted"]:
            parts.append(
                f"With the SSL block's weight tuned inside each training fold (0 = radiomics alone): "
                f"{_fmt_diff(e['weighted'])}, {say[e['weighted']['judgement']].replace('**', '')}."
            )
        ctl = e.get("control")
        if ctl and ctl.get("plain"):
            parts.append(
                f"By the same measure an untrained encoder of the same architecture changes it by "
                f"{_fmt_diff(ctl['plain'])}"
                + (f" (weighted {_fmt_diff(ctl['weighted'])})" if ctl.get("weighted") else "")
                + "."
            )
            vs = e.get("vs_control", {}).get("plain")
            if vs:
                lead = {
                    "adds": "Pretraining adds more than a random network does",
                    "hurts": "Pretraining adds less than a random network does",
                }.get(vs["judgement"], "No evidence that pretraining adds more than a random network does")
                weighted = e["vs_control"].get("weighted")
                parts.append(
                    f"{lead}: trad+ssl − trad+random {_fmt_diff(vs)}"
                    + (f" (weighted {_fmt_diff(weighted)})." if weighted else ".")
                )
        if ctl and e["ssl_alone"] is not None and ctl["ssl_alone"] is not None:
            beat = "beats" if e["ssl_alone"] > ctl["ssl_alone"] else "does not beat"
            parts.append(
                f"On their own they reach {e['ssl_alone']:.3f} against {ctl['ssl_alone']:.3f} for an untrained "
                f"encoder of the same architecture: pretraining {beat} a random network."
            )
            if e.get("residual_probe_auc") is not None and ctl.get("residual_probe_auc") is not None:
                parts.append(
                    f"What they carry beyond a linear model of radiomics reads out at probe AUC "
                    f"{e['residual_probe_auc']:.3f} (random network {ctl['residual_probe_auc']:.3f}; 0.5 is nothing)."
                )
        elif e["ssl_alone"] is not None:
            parts.append(
                f"On their own they reach {e['ssl_alone']:.3f}; no random-init control was scored in this report, so "
                "whether pretraining beat an untrained network is not known."
            )
        if e.get("r2_from_radiomics") is not None:
            parts.append(
                f"{100 * e['r2_from_radiomics']:.0f} % of their variance is a linear function of the radiomics "
                f"features" + (f" ({100 * ctl['r2_from_radiomics']:.0f} % for the untrained encoder)." if ctl else ".")
            )
        paragraphs.append(" ".join(parts))
    return "\n\n".join(paragraphs)
