"""What do an encoder's features encode? Cross-validated linear read-outs of ROI properties from the embeddings.

A pretrained encoder that reads out the phenotype at chance has still learned *something* (its views agree); this
script says what. For each encoder (state dicts as written by ``learning_curve.py --save-encoder`` or
``models/model.pt``) and for random-init controls, it embeds the cohort's ROIs (the bundle's preprocessing, eval
mode, exactly as ``inferring``) and reports:

* the phenotype read-outs (probe AUC, kNN) and the centre kNN (an acquisition confounder);
* R² of a ridge regression (5-fold, out-of-fold) from the standardised embeddings to label-free ROI properties:
  lesion volume, mean / spread / rim-minus-core contrast inside the mask, the ROI's mean, the head's share of
  the ROI and the fine-scale energy (noise and fine texture);
* how well each property alone separates the phenotype (AUC), so "encodes X" can be read as "should help" or not.

    python benchmarks/feature_content.py OUT/ref_default_step200_encoder.pt models/model.pt --random-init 0 1 \
        --out eval/feature_content
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_curve as lc  # noqa: E402

from scripts.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from scripts.pretrain.readout import knn_balanced_accuracy, readout, stratified_folds  # noqa: E402

PROPERTIES = ("lesion_volume", "lesion_mean", "lesion_std", "rim_minus_core", "roi_mean", "head_share", "fine_energy")


def roi_properties(x: torch.Tensor, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Label-free properties of each preprocessed ROI (channels averaged), the candidates for what views share."""
    from scipy import ndimage

    out = {k: [] for k in PROPERTIES}
    for i in range(x.shape[0]):
        v = x[i].mean(0).numpy().astype(np.float64)
        m = mask[i]
        inside = v[m] if m.any() else v.ravel()
        core = ndimage.binary_erosion(m, iterations=2)
        rim = m & ~core
        out["lesion_volume"].append(float(m.sum()))
        out["lesion_mean"].append(inside.mean())
        out["lesion_std"].append(inside.std())
        out["rim_minus_core"].append(v[rim].mean() - v[core].mean() if core.any() and rim.any() else 0.0)
        out["roi_mean"].append(v.mean())
        out["head_share"].append(float((v > 0.05 * max(v.max(), 1e-6)).mean()))
        out["fine_energy"].append(np.abs(v - ndimage.gaussian_filter(v, 1.0)).mean())
    return {k: np.asarray(vals) for k, vals in out.items()}


def cv_r2(z: np.ndarray, target: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold R² of a ridge regression (alpha chosen inside each training fold) from standardised ``z``."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    pred = cross_val_predict(model, z, target, cv=KFold(5, shuffle=True, random_state=seed))
    return float(1 - ((target - pred) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def property_auc(values: np.ndarray, y: np.ndarray) -> float:
    """AUC of one property alone for the phenotype, direction-free (max of AUC and 1 - AUC)."""
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, values)
    return float(max(auc, 1 - auc))


def load_encoder(path: Path | None, seed: int, in_channels: int):
    """An encoder-only state dict (its output BN read from the keys) in the harness's network, or that network as
    ``learning_curve.build`` initialises it for ``seed`` (the random-init control of that seed)."""
    state = None if path is None else torch.load(path, map_location="cpu", weights_only=True)
    out_bn = True if state is None else "bn8.running_mean" in state
    net, _ = lc.build(replace(lc.Recipe(), seed=seed, out_bn=out_bn), in_channels)
    if state is not None:
        try:
            net.encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise SystemExit(f"{path}: not an encoder state dict of the bundle's Encoder3D ({exc})") from exc
    return net.eval()


def content(net, data: dict, props: dict[str, np.ndarray]) -> dict:
    labelled = np.asarray([v is not None for v in data["y"]])
    y = data["y"][labelled].astype(int)
    z = lc.embed(net, data["x"], "output", channels_last=False)
    row = readout(z[labelled], y, stratified_folds(y))
    centres = np.asarray(data["centres"])
    if len(set(centres)) > 1:
        row["centre_knn_balanced_accuracy"] = knn_balanced_accuracy(z, centres)
    row.update({f"r2_{k}": cv_r2(z, v) for k, v in props.items()})
    return row


def markdown(rows: dict[str, dict], prop_auc: dict[str, float]) -> str:
    cols = ["probe_auc", "knn_balanced_accuracy", "centre_knn_balanced_accuracy"] + [f"r2_{p}" for p in PROPERTIES]
    names = ["probe AUC", "kNN", "centre kNN"] + [f"R² {p.replace('_', ' ')}" for p in PROPERTIES]
    lines = ["| encoder | " + " | ".join(names) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "–" for c in cols) + " |")
    lines.append(
        "| *property alone → phenotype AUC* | – | – | – | "
        + " | ".join(f"{prop_auc[p]:.2f}" for p in PROPERTIES)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("encoders", nargs="*", type=Path, help="encoder-only state dicts (.pt)")
    ap.add_argument("--random-init", nargs="*", type=int, default=[0], help="seeds of random-init controls")
    ap.add_argument("--configs", nargs="*", default=["configs/train.json", "configs/data/demo.json"])
    ap.add_argument("--override", nargs="*", default=[], help="config overrides id=json, as learning_curve.py")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="learning_curve.py's ROI cache")
    ap.add_argument("--out", type=Path, default=None, help="also write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    for path in args.encoders:
        if not path.is_file():
            raise SystemExit(f"{path}: no such encoder file")
    overrides = lc.parse_overrides(args.override)
    data = lc.cached_rois(args.configs, overrides, args.cache_dir)
    labelled = np.asarray([v is not None for v in data["y"]])
    if labelled.sum() < 10 or len(set(data["y"][labelled])) < 2:
        raise SystemExit("feature_content needs a labelled cohort with two classes (>= 10 labelled cases)")
    props = roi_properties(data["x"], data["mask"])
    y = data["y"][labelled].astype(int)
    prop_auc = {k: property_auc(v[labelled], y) for k, v in props.items()}
    rows = {}
    in_channels = data["x"].shape[1]
    for seed in args.random_init:
        rows[f"random init, seed {seed} (control)"] = content(load_encoder(None, seed, in_channels), data, props)
    for path in args.encoders:
        rows[path.name] = content(load_encoder(path, 0, in_channels), data, props)
    text = markdown(rows, prop_auc)
    print(text, end="")
    result = {"configs": args.configs, "overrides": overrides, "encoders": rows, "property_auc": prop_auc}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".md"), text)
        atomic_write_json(args.out.with_suffix(".json"), result)
    return result


if __name__ == "__main__":
    main()
