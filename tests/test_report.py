"""scripts.downstream.evaluation.evaluate -> scripts.downstream.report: end to end on small tables written here, and the files the report leaves behind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from scripts.data.datalist import read_labels
from scripts.downstream.evaluation import evaluate
from scripts.downstream.protocol import ProtocolSettings
from scripts.feature_table import write_feature_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ProtocolSettings(seeds=(0,), C_grid=(0.01, 1.0), n_bootstrap=50)
SMALL = replace(FAST, n_folds=3, label_fractions=(1.0,))


def _cohort(
    tmp_path: Path, counts: dict[int, int], seed: int = 0
) -> tuple[Path, dict[str, Path], list[str], np.ndarray]:
    """A datalist (plus one unlabelled case) and trad/ssl tables in which the labels are learnable but noisy."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.concatenate([np.full(n, c) for c, n in counts.items()]))
    ids = [f"case{i:03d}" for i in range(y.size)]
    training = [{"id": i, "image": f"{i}.nii.gz", "label": int(c)} for i, c in zip(ids, y)]
    training.append({"id": "nolabel", "image": "nolabel.nii.gz"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": training}))
    all_ids = ids + ["nolabel"]
    onehot = (np.r_[y, y[0]][:, None] == np.array(sorted(counts))[None]).astype(float)
    trad = np.c_[onehot * 1.5, np.zeros(len(all_ids))] + rng.normal(size=(len(all_ids), len(counts) + 1))
    trad[:, -1] = 7.0  # a constant column: dropped by the correlation analysis, reported as such
    ssl = onehot @ rng.normal(size=(len(counts), 6)) + rng.normal(size=(len(all_ids), 6))
    tables = {"trad": tmp_path / "trad.csv", "ssl": tmp_path / "ssl.csv"}
    write_feature_table(tables["trad"], all_ids, [f"t{i}" for i in range(trad.shape[1])], trad, {"kind": "radiomics"})
    write_feature_table(tables["ssl"], all_ids, [f"s{i}" for i in range(6)], ssl, {"kind": "ssl"})
    return datalist, tables, ids, y


def _check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def _strict_json(path: Path) -> dict:
    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)


def test_binary_report_end_to_end(tmp_path):
    datalist, tables, ids, y = _cohort(tmp_path, {0: 12, 1: 36})
    rng = np.random.default_rng(1)
    supervised = [
        {
            "fraction": f,
            "seed": 0,
            "ids": ids,
            "y_pred": [int(v) if rng.random() < 0.8 else 1 - int(v) for v in y],
            "scores": rng.normal(size=len(ids)).tolist(),
        }
        for f in (1.0, 0.5)
    ]
    sup_path = tmp_path / "supervised_oof.json"
    sup_path.write_text(json.dumps(supervised))
    out = tmp_path / "eval"
    results = evaluate(
        {"trad": tables["trad"], "ssl": tables["ssl"], "trad+ssl": [tables["trad"], tables["ssl"]]},
        datalist,
        out,
        label_names={0: "LGG", 1: "HGG"},
        extra_rows={"supervised": sup_path},
        protocol=replace(FAST, positive_label="1"),
    )
    assert results["task"] == "binary" and results["positive_label"] == 1
    assert list(results["rows"]) == ["trad", "ssl", "trad+ssl", "trad+ssl (weighted)", "supervised"]
    weights = [w for run in results["rows"]["trad+ssl (weighted)"]["protocol"]["runs"] for w in run["best_weight"]]
    assert len(weights) == 2 * 5 and set(weights) <= {0.0, 0.125, 0.25, 0.5, 1.0}  # one per fold and fraction
    assert results["excluded_unlabelled"] == ["nolabel"] and len(results["ids"]) == 48
    assert results["rows"]["trad+ssl"]["n_features"] == 9
    assert results["rows"]["trad+ssl"]["cluster_agreement"] is None  # analyses run on single tables by default
    assert results["rows"]["trad"]["correlation"]["n_constant_dropped"] == 1
    assert results["rows"]["supervised"]["protocol"]["summary"]["1.0"]["sensitivity"]["folds"] is None

    saved = _strict_json(out / "results.json")
    assert saved["rows"]["ssl"]["protocol"]["summary"] == results["rows"]["ssl"]["protocol"]["summary"]
    assert len(saved["rows"]["trad"]["protocol"]["runs"]) == 2  # 1 seed x 2 fractions, with out-of-fold predictions

    md = (out / "report.md").read_text(encoding="utf-8")
    for header in (
        "Sensitivity (100% labels)",
        "Specificity (50% labels)",
        "Balanced acc. (100% labels)",
        "AUC (50% labels)",
        "ARI",
        "NMI",
    ):
        assert header in md, header
    for name in ("trad", "ssl", "trad+ssl", "supervised"):
        assert f"| {name} | " in md, name
    assert "Positive label (sensitivity): HGG" in md
    assert "| Sensitivity/Specificity (100% labels) | Sensitivity/Specificity (50% labels) |" in md  # paper layout
    sup_lines = [line for line in md.splitlines() if line.startswith("| supervised |")]
    assert any("*" in line for line in sup_lines)  # no fold assignment given: mean ± sd over seeds, marked
    # paired differences: each combined set against each of its parts, in results.json and both reports
    diffs = saved["paired_differences"]
    assert list(diffs) == [
        "trad+ssl - trad",
        "trad+ssl - ssl",
        "trad+ssl (weighted) - trad",
        "trad+ssl (weighted) - ssl",
    ]
    d = diffs["trad+ssl - trad"]["summary"]["1.0"]["auc"]
    pooled = {n: results["rows"][n]["protocol"]["summary"]["1.0"]["auc"]["pooled"] for n in ("trad+ssl", "trad")}
    assert d["difference"] == pytest.approx(pooled["trad+ssl"] - pooled["trad"])
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert "## Paired differences (A - B on the same cases, folds and seeds)" in md
    assert "| trad+ssl - trad | 100% labels | " in md and "| trad+ssl - ssl | 50% labels | " in md
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Paired differences" in html
    # the verdict heads both reports; the complementarity table names the SSL table (no control given here)
    assert md.index("## Verdict") < md.index("## Table 2 layout")
    assert "no random-init control was scored" in md and "Verdict" in html and "<strong>ssl</strong>" in html
    comp = saved["complementarity"]["ssl"]
    assert set(comp) >= {"effective_rank", "r2_from_radiomics", "probe_auc", "residual_probe_auc"}
    assert "| ssl | " in md.split("## Complementarity")[1]

    pngs = [
        "roc_100pct",
        "roc_50pct",
        "confusion_trad",
        "confusion_trad_ssl",
        "confusion_supervised",
        "embedding_trad",
        "embedding_ssl",
        "embedding_trad_ssl",
        "correlation_density",
    ]
    for stem in pngs:
        _check_png(out / f"{stem}.png")
        assert f"({stem}.png)" in md


def test_multiclass_report(tmp_path):
    datalist, tables, _, _ = _cohort(tmp_path, {1: 20, 2: 10, 3: 15}, seed=2)
    out = tmp_path / "eval"
    results = evaluate(
        {"ssl": tables["ssl"]}, datalist, out, label_names={"1": "I", "2": "II", "3": "III"}, protocol=FAST
    )
    assert results["task"] == "multiclass" and results["minority_label"] == 2
    md = (out / "report.md").read_text(encoding="utf-8")
    for header in ("Overall acc. (100% labels)", "Minority-class acc. (50% labels)", "Recall II (100% labels)"):
        assert header in md, header
    assert "Minority class (minority-class accuracy): II" in md
    assert not list(out.glob("roc_*.png"))
    for stem in ("confusion_ssl", "embedding_ssl", "correlation_density"):
        _check_png(out / f"{stem}.png")
    summary = _strict_json(out / "results.json")["rows"]["ssl"]["protocol"]["summary"]["1.0"]
    assert {"accuracy", "minority_accuracy", "balanced_accuracy", "auc", "recall_1", "recall_2", "recall_3"} <= set(
        summary
    )


def test_datalist_labels_and_join_errors(tmp_path):
    datalist, tables, ids, _ = _cohort(tmp_path, {0: 10, 1: 20})
    labels, unlabelled = read_labels(datalist)
    assert set(labels) == set(ids) and unlabelled == ["nolabel"]
    doc = json.loads(datalist.read_text(encoding="utf-8"))
    doc["testing"] = [{"id": ids[0], "label": 0}]
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"case id '{ids[0]}' appears more than once"):
        read_labels(dup, sections=("training", "testing"))
    doc = {"training": [d for d in doc["training"] if d["id"] != "case005"]}
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"1 cases that are not labelled cases: case005"):
        evaluate({"trad": tables["trad"]}, fewer, tmp_path / "eval", protocol=FAST)
    assert not (tmp_path / "eval" / "results.json").exists()


def test_radiomics_failures_are_left_out_of_every_set_and_reported(tmp_path):
    from scripts.downstream.radiomics import failures_path_for
    from scripts.feature_table import failed_cases, read_feature_table

    datalist, tables, ids, _ = _cohort(tmp_path, {0: 30, 1: 12}, seed=4)
    failed = ids[5]
    t_ids, cols, values, meta = read_feature_table(tables["trad"])
    keep = [k for k, i in enumerate(t_ids) if i != failed]
    write_feature_table(tables["trad"], [t_ids[k] for k in keep], cols, values[keep], meta)
    failures_path_for(tables["trad"]).write_text(f"id,file,reason\n{failed},{failed}.nii.gz,mask has 6 voxels (< 8)\n")
    with pytest.raises(ValueError, match="lacks 1 labelled cases"):  # without the exclusion: a clear join error
        evaluate({"trad": tables["trad"]}, datalist, tmp_path / "no", plots=False, protocol=FAST)
    exclude = failed_cases(tables["trad"])
    assert exclude == {failed: "radiomics failed: mask has 6 voxels (< 8)"}
    out = tmp_path / "eval"
    results = evaluate(
        {"trad": tables["trad"], "ssl": tables["ssl"]}, datalist, out, plots=False, exclude=exclude, protocol=FAST
    )
    assert failed not in results["ids"] and len(results["ids"]) == len(ids) - 1
    assert results["excluded"] == exclude
    assert f"`{failed}` (radiomics failed: mask has 6 voxels (< 8))" in (out / "report.md").read_text(encoding="utf-8")


def _strict_html(path: Path):
    """Parse with html5lib in strict mode (any HTML5 parse error raises) and return the element tree."""
    import html5lib

    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(path.read_text(encoding="utf-8"))


def _check_self_contained(tree) -> list:
    """Every <img> is an embedded PNG; no element points at the network or at a local file."""
    import base64

    imgs = tree.findall(".//img")
    for img in imgs:
        src = img.get("src", "")
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
        assert img.get("alt")
    for el in tree.iter():
        for attr in ("src", "href"):
            value = el.get(attr)
            if value is not None:
                assert value.startswith(("data:", "#")), f"<{el.tag} {attr}={value[:80]}> is not self-contained"
    assert not tree.findall(".//script") and not tree.findall(".//link")
    return imgs


def test_html_report_is_valid_self_contained_and_has_every_section(tiny_cohort, tmp_path):
    """The real tiny cohort (NIfTI images): tables, captions, cluster explorer with montage, provenance."""
    from scripts.data.datalist import load_datalist
    from scripts.io_utils import sha256_file

    items = load_datalist(tiny_cohort, "training")
    ids = [it["id"] for it in items]
    y = np.array([it["label"] for it in items])
    rng = np.random.default_rng(0)
    ssl = np.c_[y[:, None] * 2.0 + rng.normal(size=(len(ids), 4)), rng.normal(size=(len(ids), 4))]
    rad = np.c_[y * 3.0 + rng.normal(size=len(ids)), rng.normal(size=(len(ids), 2))]
    tables = {"trad": tmp_path / "radiomics_features.csv", "ssl (rubik)": tmp_path / "ssl_rubik.csv"}
    write_feature_table(tables["trad"], ids, ["original_shape_X", "noise_a", "noise_b"], rad, {"kind": "radiomics"})
    write_feature_table(
        tables["ssl (rubik)"],
        ids,
        [f"ssl_{i:03d}" for i in range(8)],
        ssl,
        {"kind": "ssl_embeddings", "checkpoint": "/m/model.pt", "checkpoint_sha256": "ab" * 32},
    )
    out = tmp_path / "eval"
    results = evaluate(tables, tiny_cohort, out, explorer_k_range=(2, 4), protocol=SMALL)
    ex = results["cluster_explorer"]
    assert list(ex) == ["ssl (rubik)"]  # the radiomics table is the profile, not a clustered set
    assert [r["k"] for r in ex["ssl (rubik)"]["runs"]][1:] in ([3], [])
    run = ex["ssl (rubik)"]["runs"][0]
    assert run["centres"] is not None and run["profile"] and run["labels"]["columns"] == ["0", "1"]
    prov = results["provenance"]
    assert prov["datalist_sha256"] == sha256_file(tiny_cohort) and prov["bundle_version"]

    tree = _strict_html(out / "report.html")
    imgs = _check_self_contained(tree)
    text = "".join(tree.itertext())
    assert f"montage_ssl_rubik_k{run['k']}" in [i.get("alt") for i in imgs]
    assert len(imgs) == len(list(out.glob("*.png")))  # every plot is in the page
    for needle in (
        "Table 2 layout",
        "Sensitivity/Specificity (100% labels)",
        "bootstrap 95% CI",
        "Cluster explorer",
        "Clusters x labels",
        "Clusters x centres",
        "Hedges' g",
        "counts summed over the 1 CV seeds",
        prov["datalist_sha256"],
        "ab" * 32,
    ):
        assert needle in text, needle
    table2 = tree.find(".//table")
    assert [th.text for th in table2.findall(".//th")][0] == "Method"
    assert [tr.find("td").text for tr in table2.findall(".//tbody/tr")] == ["trad", "ssl (rubik)"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Cluster explorer: ssl (rubik)" in md and "counts summed over the 1 CV seeds" in md


def test_a_report_rewritten_into_its_folder_leaves_no_file_of_the_earlier_one(tiny_cohort, tmp_path):
    """Issue 29: a rerun into an existing report folder left the plots of rows that are gone beside the new report.
    The report lists its files (report_files.json) and removes the earlier report's that it did not rewrite."""
    from scripts.data.datalist import load_datalist

    items = load_datalist(tiny_cohort, "training")
    ids, y = [it["id"] for it in items], np.array([it["label"] for it in items], dtype=float)
    rng = np.random.default_rng(0)
    out = tmp_path / "report"
    for name in ("ssl (rubik)", "ssl (plain)"):
        table = tmp_path / f"{name[5:-1]}.csv"
        write_feature_table(table, ids, ["a", "b", "c"], y[:, None] + rng.normal(size=(len(ids), 3)))
        evaluate({name: table}, tiny_cohort, out, explorer=False, protocol=SMALL)
        if name == "ssl (rubik)":
            earlier = sorted(p.name for p in out.iterdir())
            assert any("rubik" in n for n in earlier)
            (out / "notes.txt").write_text("mine", encoding="utf-8")  # not the report's: never removed
    files = sorted(p.name for p in out.iterdir())
    assert not [n for n in files if "rubik" in n] and [n for n in files if "plain" in n], files
    assert "notes.txt" in files and json.loads((out / "report_files.json").read_text()) == sorted(
        set(files) - {"notes.txt", "report_files.json"}
    )
