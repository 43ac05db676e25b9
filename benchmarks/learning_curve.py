"""Learning curves of 3DSiam pretraining against controls measured in the same run.

Pretrains the bundle's encoder (``scripts.pretrain.networks``) with the bundle's loss and augmentation chain for a budget
of steps, and every ``--eval-every`` steps scores the frozen features on the cohort's labelled cases (labels for
the read-out only): leave-one-out cosine kNN balanced accuracy, an out-of-fold linear-probe AUC / balanced
accuracy on a fixed stratified 5-fold split, and the label-free effective rank (RankMe) and collapse std.
Controls in the same run and on the same split:

* ``random_init``: the encoder as initialised, before any step (same seed);
* ``first_order``: 10 first-order statistics of the ROI inside the mask + the ROI pooled to 4^3 (a trivial
  intensity baseline);
* ``radiomics``: the 107 pyradiomics features of the bundle's radiomics stage (``--radiomics`` CSV, optional).

The preprocessing is the bundle's own (``deterministic_transforms`` of the given configs), done once into memory.
Recipes are named sets of overrides (``RECIPES``) so that an ablation changes one thing at a time; ``--set``
adds ad-hoc ones (``--set lr=0.05 optimizer=sgd``). Writes ``<out>/<name>.json`` and a PNG of metric vs steps
and vs wall seconds; ``--tensorboard DIR`` writes the same curves as TensorBoard scalars.

    python benchmarks/learning_curve.py --recipe default --steps 200 --eval-every 25
    python benchmarks/learning_curve.py --recipe paper --recipe default --steps 200 --out benchmarks/results/lc
    python benchmarks/learning_curve.py --recipe default --device cuda --minutes 4 --steps 4000 --eval-every 250
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io_utils import atomic_path, atomic_write_json  # noqa: E402
from scripts.pretrain.readout import PROBE_C, check_probe_c, knn_balanced_accuracy, readout, stratified_folds  # noqa: E402

PAPER_AUG = {
    "rotate_deg": 20.0,
    "scale": 0.3,
    "shift_fraction": 0.05,
    "gamma": [0.7, 1.5],
    "prob_gamma": 0.8,
    "prob_sharpen": 0.3,
    "prob_blur": 0.3,
    "prob_noise": 0.5,
    "noise_std": 5.0,
    "sharpen_alpha": [10.0, 30.0],
    "prob_flip": 0.0,
    "prob_rot90": 0.0,
    "crop_min": 1.0,
    "device": False,  # augmentation#device: this harness makes the views with the MONAI chain (view_transforms)
}


@dataclass
class Recipe:
    """Everything that defines one pretraining run; the defaults are the paper's values (Adam 1e-2, batch 6)."""

    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    fix_pred_lr: bool = False  # SimSiam: the predictor keeps the base lr while the encoder's decays
    batch: int = 6
    schedule: str = "cosine"  # cosine | constant
    out_bn: bool = False  # SimSiam's affine-free BN on the encoder output
    pred_hidden: int = 64
    augmentation: dict = field(default_factory=lambda: dict(PAPER_AUG))
    readout_layer: str = "output"  # output (fc8, the paper's) | backbone (pooled conv6)
    channels_last: bool = False
    bf16: bool = False
    seed: int = 0
    # label-free terms added to the SimSiam loss (scripts.pretrain.regularizers; configs/train.json "regularizer")
    covariance: float = 0.0
    variance: float = 0.0
    radiomics: float = 0.0


RECIPES: dict[str, dict] = {
    "paper": {},
    "no_gamma": {"augmentation": {"prob_gamma": 0.0}},
    "no_sharpen": {"augmentation": {"prob_sharpen": 0.0}},
    "no_blur": {"augmentation": {"prob_blur": 0.0}},
    "no_noise": {"augmentation": {"prob_noise": 0.0}},
    "spatial_only": {"augmentation": {"prob_gamma": 0.0, "prob_sharpen": 0.0, "prob_blur": 0.0, "prob_noise": 0.0}},
    "sgd": {"optimizer": "sgd", "lr": 0.05 * 6 / 256 * 10, "fix_pred_lr": True},
    "adam_1e-3": {"lr": 1e-3},
    "out_bn": {"out_bn": True},
    "batch16": {"batch": 16},
    "backbone": {"readout_layer": "backbone"},
    "mild_sharpen": {"augmentation": {"sharpen_alpha": [1.0, 3.0]}},
    "symmetries": {"augmentation": {"prob_flip": 0.5, "prob_rot90": 0.5}},
    "no_intensity": {"augmentation": {"prob_gamma": 0.0, "prob_sharpen": 0.0, "prob_blur": 0.0}},
    "small_scale": {"augmentation": {"scale": 0.1}},
    # the bundle's default recipe (configs/train.json); "paper" is configs/presets/paper.json
    "default": {
        "lr": 1e-3,
        "out_bn": True,
        "augmentation": {
            "prob_gamma": 0.0,
            "prob_sharpen": 0.0,
            "prob_blur": 0.0,
            "sharpen_alpha": [1.0, 3.0],
            "scale": 0.1,
            "prob_flip": 0.5,
            "prob_rot90": 0.5,
            "crop_min": 0.7,  # 0.7.0; the harness's "default" runs before 0.7.0 had 1.0
        },
    },
    # complementarity candidates (issue 28), layered on a base recipe: "default+cov", "default+orth"
    "cov": {"covariance": 0.01},
    "cov_strong": {"covariance": 0.04},
    "orth": {"radiomics": 1.0},
    "orth_strong": {"radiomics": 4.0},
    # layered on "default": configs/presets/vesselmnist.json, the recipe for binary vessel shapes (0.8.0)
    "vessel": {"lr": 3e-4, "augmentation": {"scale": 0.3, "rotate_deg": 180, "crop_min": 1.0}},
}


def make_recipe(names: list[str], sets: list[str]) -> Recipe:
    """Apply the named recipes in order, then ``key=value`` overrides (``augmentation.prob_gamma=0``)."""
    r = Recipe()
    for name in names:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        r = _apply(r, RECIPES[name])
    for item in sets:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        parsed = (
            json.loads(value) if value not in ("adam", "sgd", "cosine", "constant", "output", "backbone") else value
        )
        if key.startswith("augmentation."):
            r = _apply(r, {"augmentation": {key.split(".", 1)[1]: parsed}})
        elif key in Recipe.__dataclass_fields__:
            r = replace(r, **{key: parsed})
        else:
            raise SystemExit(f"--set: unknown recipe key {key!r}")
    return r


def _apply(r: Recipe, over: dict) -> Recipe:
    over = copy.deepcopy(over)
    if "augmentation" in over:
        unknown = set(over["augmentation"]) - set(PAPER_AUG)
        if unknown:
            raise SystemExit(f"unknown augmentation keys {sorted(unknown)}")
        over["augmentation"] = {**r.augmentation, **over["augmentation"]}
    return replace(r, **over)


def parse_overrides(items: list[str]) -> dict:
    """``id=json`` config overrides (``roi_size=[40,40,40]``) as a dict; a malformed one is refused by name."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError("expected id=json")
            overrides[key] = json.loads(value)
        except ValueError as exc:
            raise SystemExit(f"--override {item!r}: {exc}") from exc
    return overrides


def bundle_config(configs: list[str], overrides: dict):
    """The bundle's configs, layered, with ``bundle_root`` and the ``--override`` values set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in configs])
    parser["bundle_root"] = str(ROOT)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def load_rois(parser, items: list[dict]) -> dict:
    """Run the bundle's deterministic preprocessing on every case: X [N, C, D, H, W], labels, ids, centres."""
    from monai.transforms import Compose

    transform = Compose(parser.get_parsed_content("deterministic_transforms"))
    xs, ys, ids, centres, masks = [], [], [], [], []
    for item in items:
        d = transform(dict(item))
        xs.append(torch.as_tensor(np.asarray(d["image"], dtype=np.float32)))
        masks.append(np.asarray(d["mask"])[0] > 0)
        ys.append(item.get("label"))
        ids.append(str(item["id"]))
        centres.append(str(item.get("centre", "")))
    return {"x": torch.stack(xs), "mask": np.stack(masks), "y": np.asarray(ys), "ids": ids, "centres": centres}


def roi_cache_key(configs: list[str], overrides: dict, datalist: str, items: list[dict]) -> str:
    """What the preprocessed ROIs depend on: the configs (names and bytes: an edited config is a new key) and
    overrides, the datalist they resolve to (its path and bytes, so ``SIAM3D_DATALIST`` or an edited datalist is a
    new key) and every listed file's size and mtime (a rewritten volume is a new key), so the cache never serves
    another cohort's or another preprocessing's ROIs."""
    from scripts.io_utils import sha256_file

    files = []
    for item in items:
        for key in ("image", "mask"):
            value = item.get(key)
            for path in value if isinstance(value, (list, tuple)) else [value] if value else []:
                st = os.stat(path)
                files.append([str(path), st.st_size, st.st_mtime_ns])
    config_bytes = [sha256_file(str(ROOT / c)) for c in configs]
    key = json.dumps([configs, config_bytes, overrides, datalist, sha256_file(datalist), files], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_rois(configs: list[str], overrides: dict, cache_dir: Path) -> dict:
    """``load_rois`` once per cohort and preprocessing: later runs read ``<cache_dir>/learning_curve_rois_<key>.npz``."""
    from scripts.data.datalist import load_datalist

    parser = bundle_config(configs, overrides)
    datalist = os.path.realpath(parser.get_parsed_content("datalist"))
    items = load_datalist(datalist, "training", None)
    cache = cache_dir / f"learning_curve_rois_{roi_cache_key(configs, overrides, datalist, items)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        data["x"] = torch.from_numpy(data["x"])
        data["ids"], data["centres"] = list(data["ids"]), list(data["centres"])
        data["y"] = np.asarray([None if v < 0 else int(v) for v in data["y"]], dtype=object)
        return data
    data = load_rois(parser, items)
    y = np.asarray([-1 if v is None else int(v) for v in data["y"]])
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(
                f,
                x=data["x"].numpy(),
                mask=data["mask"],
                y=y,
                ids=np.asarray(data["ids"]),
                centres=np.asarray(data["centres"]),
            )
    return data


def first_order_features(x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """A trivial intensity baseline: first-order statistics inside the mask and the ROI average-pooled to 4^3."""
    rows = []
    pooled = torch.nn.functional.adaptive_avg_pool3d(x.mean(1, keepdim=True), 4).flatten(1).numpy()
    for i in range(x.shape[0]):
        v = x[i].mean(0).numpy()[mask[i]] if mask[i].any() else x[i].mean(0).numpy().ravel()
        q = np.percentile(v, [10, 25, 50, 75, 90])
        rows.append(
            [
                v.mean(),
                v.std(),
                *q,
                float(mask[i].sum()),
                ((v - v.mean()) ** 3).mean() / (v.std() ** 3 + 1e-9),
                ((v - v.mean()) ** 4).mean() / (v.std() ** 4 + 1e-9),
            ]
        )
    return np.concatenate([np.asarray(rows), pooled], axis=1)


def without_cases(data: dict, drop: set[str]) -> dict:
    """``data`` (``cached_rois``) without the cases ``drop`` (e.g. those whose radiomics extraction failed)."""
    keep = np.asarray([i not in drop for i in data["ids"]])
    out = dict(data)
    out["x"] = data["x"][torch.from_numpy(keep)]
    for key in ("mask", "y"):
        out[key] = data[key][keep]
    out["ids"] = [i for i, k in zip(data["ids"], keep) if k]
    out["centres"] = [c for c, k in zip(data["centres"], keep) if k]
    return out


def radiomics_features(path: str, ids: list[str]) -> np.ndarray:
    """The 107 pyradiomics features of ``ids`` from a bundle radiomics table (CSV keyed by ``id``)."""
    import csv

    with open(path, encoding="utf-8") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise SystemExit(f"{path} lacks {len(missing)} case(s), e.g. {missing[:3]}")
    cols = [c for c in next(iter(rows.values())) if c.startswith("original_")]
    return np.asarray([[float(rows[i][c]) for c in cols] for i in ids])


def build(recipe: Recipe, in_channels: int):
    from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D

    torch.manual_seed(recipe.seed)
    encoder = Encoder3D(in_channels=in_channels, out_dim=256, hidden_dim=324, out_bn=recipe.out_bn)
    net = SimSiam3D(encoder, Predictor(256, recipe.pred_hidden))
    if recipe.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if recipe.optimizer == "adam":
        groups = [{"params": net.encoder.parameters()}, {"params": net.predictor.parameters(), "fix": True}]
        opt = torch.optim.Adam(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "sgd":
        groups = [{"params": net.encoder.parameters()}, {"params": net.predictor.parameters(), "fix": True}]
        opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    else:
        raise SystemExit(f"unknown optimizer {recipe.optimizer!r}")
    return net, opt


def sync(device: str) -> None:
    """Wait for queued CUDA work, so that a wall-clock step time counts the step and not just its launch."""
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bn_calibrated(net, x: torch.Tensor, batch: int, device: str = "cpu"):
    """A copy of ``net`` whose BatchNorm running statistics are the average over ``x`` in batches of ``batch``
    (weights untouched): the random-init control without the handicap of init statistics (mean 0, var 1) on
    [0, 255] volumes."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    for part in x.split(batch):
        net.encoder(part.to(device))
    return net.eval()


@torch.no_grad()
def embed(
    net,
    x: torch.Tensor,
    layer: str,
    channels_last: bool,
    chunk: int = 16,
    train_mode: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """Eval-mode embeddings of every ROI, exactly as the bundle's ``inferring`` computes them (encoder.eval());
    ``train_mode``: BatchNorm normalises with each chunk's own statistics instead (running stats untouched)."""
    enc = net.encoder
    was = enc.training
    enc.eval()
    if train_mode:
        saved = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k or "num_batches" in k}
        enc.train()
    out = []
    for part in x.split(chunk):
        part = part.to(device)
        if channels_last:
            part = part.contiguous(memory_format=torch.channels_last_3d)
        out.append((enc.backbone(part) if layer == "backbone" else enc(part)).float().cpu().numpy())
    if train_mode:
        enc.load_state_dict(saved, strict=False)
    enc.train(was)
    return np.concatenate(out)


def views(x: torch.Tensor, chains) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent random views of each volume of ``x`` with the bundle's augmentation chains."""
    v1, v2 = [], []
    for xi in x:
        d = {"image": xi.clone(), "image_2": xi.clone()}
        for t in chains:
            d = t(d)
        v1.append(torch.as_tensor(d["image"]))
        v2.append(torch.as_tensor(d["image_2"]))
    return torch.stack(v1), torch.stack(v2)


def run_curve(
    recipe: Recipe,
    data: dict,
    steps: int,
    eval_every: int,
    log=print,
    writer=None,
    tag="",
    diagnostics: bool = False,
    budget_seconds: float | None = None,
    clock: str = "wall",
    on_score=None,
    device: str = "cpu",
    probe_c: float | str = PROBE_C,
    radiomics: np.ndarray | None = None,
    svm: bool = False,
) -> dict:
    """Pretrain for ``steps`` (or until ``budget_seconds`` of training time on ``clock``) and read out every
    ``eval_every`` steps; returns the curve and the recipe.

    ``clock="cpu"`` counts the process's CPU seconds divided by torch's thread count, so that a budget means the
    same compute on a busy machine as on a quiet one; the cosine schedule then follows the spent fraction of the
    budget instead of the step count. ``on_score(result_so_far, net)`` runs after every read-out, so that a run
    killed before its end still leaves its curve (and encoder) behind.

    ``radiomics`` (rows in ``data["ids"]`` order): adds the complementarity measures to every read-out
    (``scripts.downstream.complementarity``: R² of the features from radiomics, probe AUC of their residual) and
    feeds the recipe's radiomics-orthogonality term, if it has one. ``svm``: at the first and the last read-out,
    also the downstream SVM protocol on trad, ssl and trad+ssl (plain and weighted) with the paired trad+ssl - trad
    differences and their CIs (``complementarity.paired_gain``): the random-init control and the end point.

    ``device="cuda"`` trains and embeds on the GPU (bf16 autocast there when the recipe asks for it); the views
    are still made on the CPU by the bundle's MONAI chains, as the bundle's loader makes them."""
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from scripts.downstream.complementarity import paired_gain, r2_from_radiomics, residual_probe
    from scripts.pretrain.augment import view_transforms
    from scripts.pretrain.handlers import collapse_std
    from scripts.pretrain.regularizers import Regularizer, radiomics_components
    from scripts.pretrain.step import simsiam_step, views_on_device

    set_determinism(seed=recipe.seed)
    x, y = data["x"], data["y"]
    centres = np.asarray(data["centres"])
    labelled = np.asarray([v is not None for v in y])
    yl = y[labelled].astype(int) if labelled.any() else None
    folds = stratified_folds(yl) if yl is not None else None
    roi = list(x.shape[2:])
    chains = [
        Compose(view_transforms("image", roi, **recipe.augmentation)),
        Compose(view_transforms("image_2", roi, **recipe.augmentation)),
    ]
    chains[0].set_random_state(recipe.seed)
    chains[1].set_random_state(recipe.seed + 1)
    if device == "cuda" and clock == "cpu":
        raise SystemExit("--clock cpu counts CPU seconds; a CUDA run's budget must be --clock wall")
    net, opt = build(recipe, x.shape[1])
    if recipe.radiomics > 0 and radiomics is None:
        raise SystemExit("a recipe with a radiomics-orthogonality term needs --radiomics")
    components = radiomics_components(dict(zip(data["ids"], radiomics))) if recipe.radiomics > 0 else {}
    regularizer = Regularizer(recipe.covariance, recipe.variance, recipe.radiomics, components)
    net.to(device)  # in place: the optimiser keeps the same parameters
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(recipe.seed)
    order: list[int] = []
    curve = []
    last_loss = float("nan")
    train_seconds = 0.0
    cpu_seconds = 0.0
    threads = torch.get_num_threads()

    def spent() -> float:
        return cpu_seconds / threads if clock == "cpu" else train_seconds

    def result(step: int) -> dict:
        return {"recipe": asdict(recipe), "steps": step, "clock": clock, "threads": threads, "curve": curve}

    def score(step: int, last: bool = False) -> None:
        z = embed(net, x, recipe.readout_layer, recipe.channels_last, device=device)
        row = {
            "step": step,
            "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2),
            **readout(z[labelled], yl, folds, probe_c=probe_c),
        }
        row["collapse_std"] = collapse_std(torch.as_tensor(z))
        if step:
            row["loss"] = last_loss
        if len(set(centres)) > 1:
            row["centre_knn_balanced_accuracy"] = knn_balanced_accuracy(z, centres)
        if radiomics is not None and yl is not None:
            row["r2_from_radiomics"] = r2_from_radiomics(z[labelled], radiomics[labelled], folds)
            resid = residual_probe(z[labelled], radiomics[labelled], yl, folds, probe_c)
            row.update({f"residual_{k}": v for k, v in resid.items()})
        if svm and radiomics is not None and yl is not None and (step == 0 or last):
            row["svm"] = paired_gain(z[labelled], radiomics[labelled], yl)
        if diagnostics:
            zt = embed(net, x, recipe.readout_layer, recipe.channels_last, train_mode=True, device=device)
            tm = readout(zt[labelled], yl, folds, probe_c=probe_c)
            row.update({f"trainmode_{k}": v for k, v in tm.items()})
            zb = embed(net, x, "backbone", recipe.channels_last, device=device)
            row.update({f"backbone_{k}": v for k, v in readout(zb[labelled], yl, folds, probe_c=probe_c).items()})
            if step == 0:  # is "learning" only BatchNorm adapting its statistics to the data? (a control)
                zc = embed(
                    bn_calibrated(net, x, recipe.batch, device),
                    x,
                    recipe.readout_layer,
                    recipe.channels_last,
                    device=device,
                )
                row.update(
                    {f"bn_calibrated_{k}": v for k, v in readout(zc[labelled], yl, folds, probe_c=probe_c).items()}
                )
        curve.append(row)
        log(
            f"{tag} step {step:4d} ({train_seconds:6.0f} s) "
            + " ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k not in ("step", "train_seconds", "train_cpu_seconds", "svm")
            )
        )
        if "svm" in row:
            d = row["svm"]["differences"]
            log(f"{tag} step {step:4d} SVM {row['svm']['metric']}: " + json.dumps(row["svm"]["rows"]) + " paired: "
                + "; ".join(f"{k} {v['1.0']['difference']:+.3f} {v['1.0']['ci95']}" for k, v in d.items()))  # fmt: skip
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "train_seconds", "train_cpu_seconds", "svm") and not math.isnan(v):
                    writer.add_scalar(f"{tag}/{k}", v, step)
        if on_score is not None:
            on_score(result(step), net)

    score(0)
    net.train()
    step = 0
    while step < steps and (budget_seconds is None or spent() < budget_seconds):
        step += 1
        t0, c0 = time.perf_counter(), time.process_time()
        if len(order) < recipe.batch:
            order += list(rng.permutation(len(x)))
        idx, order = order[: recipe.batch], order[recipe.batch :]
        x1, x2 = views_on_device(*views(x[idx], chains), device, recipe.channels_last, non_blocking=True)
        if recipe.schedule == "cosine":
            done = (step - 1) / steps if budget_seconds is None else min(1.0, spent() / budget_seconds)
            factor = 0.5 * (1 + math.cos(math.pi * done))
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 if (recipe.fix_pred_lr and g.get("fix")) else lr0 * factor
        bf16 = torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.bf16)
        ids = [data["ids"][i] for i in idx]
        penalty = (lambda z1, z2, ids=ids: regularizer(z1, z2, ids)) if regularizer.active else None
        loss = simsiam_step(net, opt, x1, x2, autocast=bf16, penalty=penalty, context=f"{tag} step {step}")["loss"]
        sync(device)
        train_seconds += time.perf_counter() - t0
        cpu_seconds += time.process_time() - c0
        last = step == steps or (budget_seconds is not None and spent() >= budget_seconds)
        if step % eval_every == 0 or last:
            last_loss = float(loss)
            score(step, last)
    return result(step)


def controls(data: dict, radiomics: np.ndarray | None, probe_c: float | str = PROBE_C) -> dict:
    """Read-outs of the non-learnt features on the same cases and split as the curves (and the same probe C)."""
    labelled = np.asarray([v is not None for v in data["y"]])
    yl = data["y"][labelled].astype(int)
    folds = stratified_folds(yl)
    first_order = first_order_features(data["x"], data["mask"])[labelled]
    out = {"first_order": readout(first_order, yl, folds, probe_c=probe_c)}
    if radiomics is not None:
        out["radiomics"] = readout(radiomics[labelled], yl, folds, probe_c=probe_c)
    centres = np.asarray(data["centres"])[labelled]
    if len(set(centres)) > 1:
        out["centre_knn_first_order"] = knn_balanced_accuracy(first_order, centres)
    return out


def montage(data: dict, recipe: Recipe, n: int, path: Path) -> None:
    """Mid-slices of ``n`` cases (both classes): the preprocessed ROI and two random views, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.transforms import Compose

    from scripts.pretrain.augment import view_transforms

    roi = list(data["x"].shape[2:])
    chains = [Compose(view_transforms(k, roi, **recipe.augmentation)) for k in ("image", "image_2")]
    for i, c in enumerate(chains):
        c.set_random_state(recipe.seed + i)
    y = data["y"]
    picks = [i for c in (0, 1) for i in np.flatnonzero(y == c)[: (n + 1) // 2]][:n]
    fig, axes = plt.subplots(len(picks), 3, figsize=(6, 2 * len(picks)))
    v1, v2 = views(data["x"][picks], chains)
    for r, i in enumerate(picks):
        mid = roi[2] // 2
        for c, (img, title) in enumerate([(data["x"][i], "ROI"), (v1[r], "view 1"), (v2[r], "view 2")]):
            ax = axes[r, c]
            ax.imshow(np.asarray(img[0, :, :, mid]).T, cmap="gray", vmin=0, vmax=255, origin="lower")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{data['ids'][i]} y={y[i]} {title}" if c == 0 else title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["knn_balanced_accuracy", "probe_auc", "effective_rank"]
    fig, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 8))
    for j, m in enumerate(metrics):
        for row, xkey in enumerate(("step", "train_seconds")):
            ax = axes[row, j]
            for name, res in results["runs"].items():
                c = res["curve"]
                ax.plot([r[xkey] for r in c], [r.get(m, np.nan) for r in c], marker="o", ms=3, label=name)
            for cname, cres in results["controls"].items():
                if isinstance(cres, dict) and m in cres and m != "effective_rank":
                    ax.axhline(cres[m], ls="--", lw=1, color="grey")
                    ax.text(ax.get_xlim()[0], cres[m], cname, fontsize=7, va="bottom")
            ax.set_xlabel("steps" if xkey == "step" else "training seconds")
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def probe_c_arg(value: str) -> float | str:
    """argparse type for ``--probe-c``: ``check_probe_c``'s refusal as a usage error."""
    try:
        return check_probe_c(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--recipe", action="append", default=None, help="named recipe (repeat for several runs)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides applied to every run")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--minutes", type=float, default=None, help="training budget in minutes (stops at --steps or this, first)"
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="what --minutes counts: wall seconds of the training steps, or process CPU seconds / threads",
    )
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--configs", nargs="*", default=["configs/train.json", "configs/data/demo.json"])
    ap.add_argument("--override", nargs="*", default=[], help="config overrides id=json (e.g. roi_size=[40,40,40])")
    ap.add_argument("--radiomics", default=None, help="pyradiomics table (CSV with an id column) for the control")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learning_curve"))
    ap.add_argument(
        "--cache-dir", default=str(ROOT / ".cache"), help="where the preprocessed ROIs are kept between runs"
    )
    ap.add_argument("--name", default=None, help="result file stem (default: the recipe names)")
    ap.add_argument("--tensorboard", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the encoder trains and embeds")
    ap.add_argument(
        "--diagnostics",
        action="store_true",
        help="also read out train-mode BN and backbone features, and at step 0 the init with BN statistics calibrated on the data",
    )
    ap.add_argument(
        "--probe-c",
        type=probe_c_arg,
        default=PROBE_C,
        help=f"the linear probe's C for the curves and controls: a number (default {PROBE_C}) or auto (chosen per "
        "training fold by an inner cross-validation; docs/learning.md, 'The probe's C')",
    )
    ap.add_argument(
        "--svm",
        action="store_true",
        help="at step 0 and the last read-out also run the downstream SVM protocol (needs --radiomics): trad, ssl, "
        "trad+ssl plain and weighted, paired trad+ssl - trad with bootstrap CIs",
    )
    ap.add_argument("--montage", type=int, default=0, help="write a PNG of N cases: original and two views")
    ap.add_argument(
        "--save-encoder",
        action="store_true",
        help="also write each run's encoder state dict at every read-out (<out>/<name>_<run>_step<N>_encoder.pt)",
    )
    args = ap.parse_args(argv)
    if args.svm and not args.radiomics:
        ap.error("--svm needs --radiomics (the trad table)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.override)
    t0 = time.perf_counter()
    data = cached_rois(args.configs, overrides, Path(args.cache_dir))
    print(f"loaded {len(data['ids'])} ROIs {list(data['x'].shape[1:])} in {time.perf_counter() - t0:.1f} s")
    if args.radiomics:
        from scripts.feature_table import failed_cases

        failed = failed_cases(args.radiomics)  # the radiomics stage's failure report: left out of every curve
        if failed:
            print(f"leaving out {len(failed)} case(s) without radiomics: {failed}")
            data = without_cases(data, set(failed))
    radiomics = radiomics_features(args.radiomics, data["ids"]) if args.radiomics else None
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard)
    if args.montage:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        recipe = make_recipe((args.recipe or ["paper"])[0].split("+"), args.set)
        montage(data, recipe, args.montage, out / f"views_{(args.recipe or ['paper'])[0]}.png")
    recipes = args.recipe or ["paper"]
    results = {
        "configs": args.configs,
        "overrides": overrides,
        "steps": args.steps,
        "minutes": args.minutes,
        "clock": args.clock,
        "runs": {},
        "probe_c": args.probe_c,
        "controls": controls(data, radiomics, args.probe_c),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "load_average_1min": os.getloadavg()[0],
    }
    print("controls:", json.dumps(results["controls"], indent=None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "_".join(recipes)

    def save_partial(tag: str, result: dict, net) -> None:
        """Write the curve so far (``partial``: true) and optionally the encoder, atomically."""
        results["runs"][tag] = {**result, "partial": True}
        atomic_write_json(out / f"{stem}.json", results)
        if args.save_encoder:
            with atomic_path(out / f"{stem}_{tag}_step{result['steps']}_encoder.pt") as tmp:
                torch.save({k: v.cpu() for k, v in net.encoder.state_dict().items()}, tmp)

    for name in recipes:
        for seed in args.seeds:
            recipe = make_recipe(name.split("+"), args.set)
            recipe = replace(recipe, seed=seed)
            tag = f"{name}" + (f"_s{seed}" if len(args.seeds) > 1 else "")
            results["runs"][tag] = run_curve(
                recipe,
                data,
                args.steps,
                args.eval_every,
                writer=writer,
                tag=tag,
                diagnostics=args.diagnostics,
                budget_seconds=None if args.minutes is None else args.minutes * 60,
                clock=args.clock,
                on_score=lambda result, net, tag=tag: save_partial(tag, result, net),
                device=args.device,
                probe_c=args.probe_c,
                radiomics=radiomics,
                svm=args.svm,
            )
    atomic_write_json(out / f"{stem}.json", results)
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and .png")
    return results


if __name__ == "__main__":
    main()
