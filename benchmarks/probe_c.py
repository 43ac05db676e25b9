"""How much a read-out's figure depends on the linear probe's C: saved encoders re-scored over a grid of C.

The bundle's monitor and ``learning_curve.py`` score frozen embeddings with a logistic probe of fixed C (0.1),
chosen for the 120-case default cohort. This script re-embeds the cohort with encoder state dicts saved by
``learning_curve.py --save-encoder`` (or ``models/model.pt``) and scores each, and the first-order control, with
every C of ``--probe-c`` on the same fixed stratified split, ``auto`` being C chosen per training fold by an inner
cross-validation (``scripts.pretrain.readout.tuned_probe_c``). Prints a table and writes JSON.

    SIAM3D_DATALIST=DIR/datalist.json python benchmarks/probe_c.py \\
        --configs configs/train.json configs/data/vesselmnist.json \\
        --encoders run_default_step0_encoder.pt run_default_step300_encoder.pt --out probe_c.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curve as lc  # noqa: E402  (puts the bundle root on sys.path)
from feature_content import load_encoder  # noqa: E402

from scripts.io_utils import atomic_write_json  # noqa: E402
from scripts.pretrain.readout import (  # noqa: E402
    PROBE_C_GRID,
    effective_rank,
    knn_balanced_accuracy,
    probe_scores,
    stratified_folds,
)


def score_all(z: np.ndarray, y: np.ndarray, folds, cs: list) -> dict:
    """Probe AUC / balanced accuracy for each C; kNN and the effective rank, which do not depend on C, once."""
    probes = {str(c): probe_scores(z, y, folds, c) for c in cs}
    return {
        "knn_balanced_accuracy": knn_balanced_accuracy(z, y),
        "effective_rank": effective_rank(z),
        "probe_auc": {c: r["probe_auc"] for c, r in probes.items()},
        "probe_balanced_accuracy": {c: r["probe_balanced_accuracy"] for c, r in probes.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--configs", nargs="+", default=["configs/train.json", "configs/data/demo.json"])
    ap.add_argument("--encoders", nargs="+", default=None, help="encoder state dicts (.pt); required")
    ap.add_argument(
        "--probe-c", nargs="+", type=lc.probe_c_arg, default=[*PROBE_C_GRID, "auto"], help="C values, or auto"
    )
    ap.add_argument("--override", nargs="*", default=[], help="config overrides id=json, as learning_curve.py")
    ap.add_argument("--cache-dir", default=str(lc.ROOT / ".cache"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON to write; required")
    args = ap.parse_args(argv)  # unknown options are refused first, then the missing ones
    if not args.encoders or not args.out:
        ap.error("--encoders and --out are required")
    missing = [p for p in args.encoders if not os.path.isfile(p)]
    if missing:
        ap.error(f"--encoders: no such file: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = lc.cached_rois(args.configs, lc.parse_overrides(args.override), Path(args.cache_dir))
    labelled = np.asarray([v is not None for v in data["y"]])
    y = data["y"][labelled].astype(int)
    folds = stratified_folds(y)
    first_order = lc.first_order_features(data["x"], data["mask"])[labelled]
    result = {"configs": args.configs, "probe_c": args.probe_c, "cases": int(labelled.sum())}
    result["first_order"] = score_all(first_order, y, folds, args.probe_c)
    result["encoders"] = {}
    for path in args.encoders:
        t0 = time.perf_counter()
        net = load_encoder(Path(path), seed=0, in_channels=data["x"].shape[1])
        z = lc.embed(net, data["x"], "output", channels_last=False)[labelled]
        result["encoders"][os.path.basename(path)] = score_all(z, y, folds, args.probe_c)
        print(f"{os.path.basename(path)}: embedded and scored in {time.perf_counter() - t0:.0f} s", flush=True)
    atomic_write_json(args.out, result)
    print("features".ljust(48) + "".join(f"C={c}".rjust(10) for c in args.probe_c))
    for name, row in [("first_order", result["first_order"]), *result["encoders"].items()]:
        print(name[:47].ljust(48) + "".join(f"{row['probe_auc'][str(c)]:10.3f}" for c in args.probe_c))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
