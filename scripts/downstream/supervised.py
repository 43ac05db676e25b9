"""Supervised baseline of the paper (Table 2, last row): the same 3D encoder + a linear head, trained from scratch
with class-weighted cross-entropy on each training fold, and scored on exactly the SVM protocol's folds.

The baseline must sit in the same report table as the SVM rows, so it trains on the protocol's own splits
(``scripts.downstream.protocol.splits`` over the labelled cases in sorted-id order) and writes its out-of-fold
predictions in the record format of ``scripts.downstream.protocol.summarise_predictions``::

    [{"seed", "fraction", "ids", "y_pred", "scores", "fold"}, ...]    one record per (seed, label fraction)

``scores`` are softmax probabilities: of the positive label (binary) or of every class, columns in sorted class
order (multi-class), as ``compute_metrics`` expects. ``scripts.downstream.evaluation.evaluate(extra_rows={"supervised":
path})`` adds the row.

Volumes are preprocessed once by the bundle's deterministic transforms and kept in memory; only training volumes
are augmented (one view of ``scripts.pretrain.augment.view_transforms``). Every (seed, fold, fraction) training is seeded
from that triple alone and cached as a small JSON file keyed on the settings, the network, the augmentation and the
data, so a killed run resumes where it stopped and gives the same records as an uninterrupted one. On the CPU the
records are bit-for-bit reproducible; on CUDA a few backward kernels (pooling) use atomics, so they agree to float
rounding only, and AMP (float16 autocast) is on by default there.

All cases are held in memory as float32 (120 x 32^3 demo cases: 16 MB; 326 BraTS cases of 4 x 96^3: 4.6 GB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from monai.utils import convert_to_tensor, set_determinism
from torch import nn

from scripts.data.datalist import labels_of
from scripts.data.roi_loader import describe
from scripts.downstream.metrics import compute_metrics
from scripts.downstream.protocol import ProtocolSettings, Split, check_design, splits, task_labels
from scripts.feature_table import meta_path
from scripts.io_utils import atomic_write_json, py_scalar
from scripts.pretrain.networks import Encoder3D
from scripts.progress import bar

logger = logging.getLogger(__name__)

N_LISTED = 20  # ids listed in an error message


# ---------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one fold's classifier. Defaults fit training from scratch on a small cohort (Adam 1e-3)."""

    epochs: int = 4
    batch_size: int = 6
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    amp: bool = True  # mixed precision; only ever used on CUDA

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two cases per batch), got {self.batch_size}")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError(
                f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}"
            )


# ------------------------------------------------------------------------------------------------------------ cohort
@dataclass
class Cohort:
    """Labelled cases in sorted-id order (the order ``load_and_join`` gives the SVM protocol) with their volumes."""

    ids: list[str]
    y: np.ndarray
    images: torch.Tensor  # [N, C, D, H, W] float32, preprocessed once

    def fingerprint(self) -> str:
        """SHA-256 of ids, labels and voxels: a cached fold result is reused only for the very same data."""
        h = hashlib.sha256(json.dumps([self.ids, [str(v) for v in self.y.tolist()]]).encode())
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()


def _listing(ids: Sequence[str]) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:N_LISTED]) + (
        f" ... and {len(ids) - N_LISTED} more ({len(ids)} in all)" if len(ids) > N_LISTED else ""
    )


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def select_labelled(items: Sequence[Mapping], unlabelled: str = "error") -> tuple[list[Mapping], list[str]]:
    """(items with a label, ids of items without one). ``unlabelled="error"`` refuses a case without a label;
    ``"exclude"`` leaves such cases out (as the report does), logs and returns their ids so nothing goes unnoticed."""
    if unlabelled not in ("error", "exclude"):
        raise ValueError(f"unlabelled must be 'error' or 'exclude', got {unlabelled!r}")
    labels, missing = labels_of(items)
    if missing and unlabelled == "error":
        raise ValueError(
            f"{len(missing)} cases have no label: {_listing(missing)}; the supervised baseline needs a label for "
            "every case (pass unlabelled='exclude', config --supervised_unlabelled exclude, to leave them out)"
        )
    if missing:
        logger.warning("supervised baseline: %d unlabelled cases excluded: %s", len(missing), _listing(missing))
    keys = [str(it.get("id", f"#{i}")) for i, it in enumerate(items)]  # the ids labels_of gave them
    return [{**it, "label": labels[k]} for k, it in zip(keys, items) if k in labels], missing


def prepare_cohort(items: Sequence[Mapping], preprocess: Callable[[dict], Mapping] | None = None) -> Cohort:
    """Preprocess every case once (``preprocess``: the bundle's deterministic transforms; None when ``items`` are
    already ``{"id", "image", "label"}`` with image [C, D, H, W]) and stack the volumes in sorted-id order."""
    if not items:
        raise ValueError("no cases given")
    labelled, _ = select_labelled(items, "error")
    ids = [str(it.get("id", "")) for it in labelled]
    if any(not i for i in ids):
        raise ValueError("every case needs an 'id' (load datalists with scripts.data.datalist, which assigns them)")
    images: dict[str, torch.Tensor] = {}
    for case_id, item in zip(ids, labelled):
        try:
            out = preprocess(dict(item)) if preprocess is not None else item
            img = convert_to_tensor(out["image"], dtype=torch.float32, track_meta=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the case named
            raise RuntimeError(f"case {case_id}: preprocessing failed ({type(e).__name__}: {e})") from e
        if img.dim() != 4:
            raise ValueError(
                f"case {case_id}: expected a [C, D, H, W] image after preprocessing, got {list(img.shape)}"
            )
        images[case_id] = img
    shapes = {tuple(v.shape) for v in images.values()}
    if len(shapes) > 1:
        first = next(iter(images.values())).shape
        odd = [i for i, v in images.items() if v.shape != first]
        raise ValueError(
            f"preprocessed images differ in shape ({sorted(shapes)}); e.g. {_listing(odd)} vs {list(first)}"
        )
    order = sorted(ids)
    label_of, _ = labels_of(labelled)
    return Cohort(order, np.asarray([label_of[i] for i in order]), torch.stack([images[i] for i in order]))


# ------------------------------------------------------------------------------------------------------------ splits
def class_weights(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Inverse class frequency, normalised like sklearn's ``"balanced"`` (n / (K * n_c), so the weights of all
    cases sum to n): the minority class counts as much as the majority in the loss, as in the SVM's weighting."""
    counts = np.array([(y == c).sum() for c in classes], dtype=np.float64)
    if (counts == 0).any():
        absent = [c for c, n in zip(classes.tolist(), counts) if n == 0]
        raise ValueError(f"classes {absent} have no case in this training set; cannot weight them")
    return y.size / (classes.size * counts)


def split_seed(seed: int, fold: int, fraction_index: int) -> int:
    """A 32-bit seed for one training that depends on (seed, fold, fraction index) only, so a resumed run or a
    single fold trained on its own gets the same weights as the full run."""
    return int(np.random.SeedSequence([seed, fold, fraction_index, 0x5EED]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------- network
class EncoderClassifier(nn.Module):
    """The pretraining encoder (``feature_dim`` outputs) followed by one linear layer to the class logits."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        dim = getattr(encoder, "feature_dim", None)
        if not isinstance(dim, int):
            raise ValueError("the encoder needs an int `feature_dim` attribute (its output size), as Encoder3D has")
        self.encoder = encoder
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a last batch of one case joins the previous one (BatchNorm cannot train on one)."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _augment_batch(images: torch.Tensor, augment: Compose | None) -> torch.Tensor:
    """One random view per case (own parameters per case), on the tensors' device: MONAI's transforms run on GPU
    tensors, so on a GPU the augmentation is not a CPU bottleneck; the parameters come from the transforms' own
    seeded RandomState, so they are the same on any device."""
    if augment is None:
        return images
    return torch.stack([convert_to_tensor(augment({"image": img})["image"], track_meta=False) for img in images])


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    augment: Compose | None = None,
) -> list[float]:
    """Train ``model`` in place with weighted cross-entropy and Adam; returns the mean loss of each epoch.

    ``images`` stay on the CPU (the whole cohort need not fit in GPU memory); each batch is moved to ``device`` and
    augmented there. AMP (float16 autocast + gradient scaling) only on CUDA.
    """
    use_amp = settings.amp and device.type == "cuda"
    model.to(device).train()
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device=device, dtype=torch.float32))
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    generator = torch.Generator().manual_seed(seed)
    if augment is not None:
        augment.set_random_state(seed=seed)
    losses = []
    for _ in range(settings.epochs):
        total = torch.zeros((), device=device)
        for idx in _batches(images.shape[0], settings.batch_size, generator):
            x = _augment_batch(images[idx].to(device, non_blocking=True), augment)
            t = targets[idx].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(x), t)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach().float() * idx.numel()
        losses.append(float(total) / images.shape[0])
    return losses


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Softmax class probabilities [n, K] (float64) of un-augmented volumes, BatchNorm in inference mode."""
    model.to(device).eval()
    out = [torch.softmax(model(x.to(device)).float(), dim=1).cpu() for x in images.split(batch_size)]
    return torch.cat(out).double().numpy()


# ------------------------------------------------------------------------------------------------------------- cache
def _part_path(cache_dir: Path, split: Split) -> Path:
    return cache_dir / f"seed{split.seed}_fold{split.fold}_fraction{split.fraction_index}.json"


def _part_key(split: Split, cohort: Cohort, settings: TrainSettings, config_hash: str, data_hash: str) -> str:
    """What a cached fold result depends on: data, settings, network + augmentation, and the split itself."""
    payload = {
        "data": data_hash,
        "config": config_hash,
        "settings": asdict(settings),
        "split": [split.seed, split.fold, split.fraction_index, split.fraction],
        "train": [cohort.ids[i] for i in split.subset],
        "test": [cohort.ids[i] for i in split.test],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_part(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable cached fold result %s", path)
        return None
    if part.get("key") != key:
        logger.info("cached fold result %s was made with other data or settings; retraining", path.name)
        return None
    return part


# ---------------------------------------------------------------------------------------------------------- protocol
def _describe_augment(make_augment: Callable[[], Sequence] | None) -> str:
    """Settings of freshly built augmentation transforms (part of the cache key and the provenance)."""
    return "none" if make_augment is None else describe(list(make_augment()))


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit_split(
    cohort: Cohort,
    split: Split,
    classes: np.ndarray,
    settings: TrainSettings,
    make_encoder: Callable[[], nn.Module],
    make_augment: Callable[[], Sequence] | None,
    device: torch.device,
) -> tuple[np.ndarray, list[float]]:
    """Train a fresh classifier on ``split.subset`` and return (test-fold probabilities [n_test, K], epoch losses)."""
    seed = split_seed(split.seed, split.fold, split.fraction_index)
    set_determinism(seed=seed)  # weights init + any global RNG use, per training, independent of run order
    model = EncoderClassifier(make_encoder(), classes.size)
    y_train = cohort.y[split.subset]
    targets = torch.as_tensor(np.searchsorted(classes, y_train), dtype=torch.long)
    weights = torch.as_tensor(class_weights(y_train, classes))
    aug = Compose(list(make_augment())) if make_augment is not None else None  # fresh transforms, no shared state
    losses = train_classifier(model, cohort.images[split.subset], targets, weights, settings, seed, device, aug)
    proba = predict_proba(model, cohort.images[split.test], device, batch_size=max(settings.batch_size, 16))
    return proba, losses


def _fold_part(
    cache: Path | None, split: Split, key: str, cohort: Cohort, device: torch.device, train: Callable
) -> tuple[dict, bool]:
    """(the split's result, whether it was trained now): the cached result when its key matches, else ``train()``
    (test-fold probabilities, epoch losses), written to the cache at once so a killed run keeps it."""
    part = _read_part(_part_path(cache, split), key) if cache is not None else None
    if part is not None:
        return part, False
    t0 = time.perf_counter()
    proba, losses = train()
    part = {
        "key": key,
        "test_ids": [cohort.ids[i] for i in split.test],
        "proba": proba.tolist(),
        "losses": losses,
        "n_train": int(split.subset.size),
        "seconds": round(time.perf_counter() - t0, 3),
        "device": str(device),
    }
    if cache is not None:
        atomic_write_json(_part_path(cache, split), part)
    return part, True


def _log_fold(name: str, trained: bool, y_train: np.ndarray, classes: np.ndarray, part: dict, m: dict) -> None:
    logger.info(
        "%s: %s on %d cases (%s), loss %.3f -> %.3f, %.1f s; test balanced accuracy %.3f",
        name,
        "trained" if trained else "cached",
        y_train.size,
        ":".join(str(int((y_train == c).sum())) for c in classes),
        part["losses"][0],
        part["losses"][-1],
        part["seconds"],
        m["balanced_accuracy"],
    )


def run_supervised(
    cohort: Cohort,
    *,
    n_folds: int = 5,
    seeds: Sequence[int] = (0,),
    label_fractions: Sequence[float] = (1.0, 0.5),
    settings: TrainSettings = TrainSettings(),
    positive_label=None,
    make_encoder: Callable[[], nn.Module] | None = None,
    make_augment: Callable[[], Sequence] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[dict], dict]:
    """Out-of-fold predictions of the supervised baseline, one record per (seed, fraction), and run information
    (``trained`` / ``reused`` fold results, per-fold losses and times).

    ``make_encoder``: a fresh encoder per training (default ``Encoder3D`` with the cohort's channels).
    ``make_augment``: fresh MONAI dict transforms on key ``"image"`` for training volumes, e.g.
    ``functools.partial(scripts.pretrain.augment.view_transforms, "image", roi_size)`` (None: no augmentation); a factory
    rather than a list because random transforms keep state from their last call. ``cache_dir``: where each fold
    result is kept so that a rerun trains only what is missing (None: no cache).
    """
    y = cohort.y
    check_design(y, n_folds, seeds, label_fractions)
    classes, positive, minority = task_labels(y, positive_label)
    binary = classes.size == 2
    device = _default_device(device)
    if make_encoder is None:
        in_channels = int(cohort.images.shape[1])

        def make_encoder() -> nn.Module:
            return Encoder3D(in_channels=in_channels)

    factories = (make_encoder, make_augment)
    config_hash = hashlib.sha256(
        (str(EncoderClassifier(make_encoder(), classes.size)) + _describe_augment(make_augment)).encode()
    ).hexdigest()
    data_hash = cohort.fingerprint()
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)

    records: dict[tuple[int, int], dict] = {}
    info: dict = {"trained": [], "reused": [], "folds": []}
    for seed in seeds:
        for j, f in enumerate(label_fractions):
            records[seed, j] = {"seed": int(seed), "fraction": float(f), "ids": list(cohort.ids)}
            records[seed, j] |= {"y_pred": [None] * y.size, "scores": [None] * y.size, "fold": [-1] * y.size}
        seed_splits = splits(y, n_folds, seed, label_fractions)
        total = n_folds * len(label_fractions)
        for split in bar(seed_splits, total=total, desc=f"supervised baseline, seed {seed}", unit="fold", leave=False):
            name = f"seed {split.seed} fold {split.fold + 1}/{n_folds} fraction {split.fraction:g}"
            key = _part_key(split, cohort, settings, config_hash, data_hash)
            train = partial(fit_split, cohort, split, classes, settings, *factories, device)
            part, trained = _fold_part(cache, split, key, cohort, device, train)
            info["trained" if trained else "reused"].append(name)
            proba = np.asarray(part["proba"], dtype=np.float64)
            pred = classes[np.argmax(proba, axis=1)]
            scores = proba[:, classes.tolist().index(positive)] if binary else proba
            rec = records[split.seed, split.fraction_index]
            for row, i in enumerate(split.test):
                rec["y_pred"][i] = pred[row].item()
                rec["scores"][i] = scores[row].tolist()
                rec["fold"][i] = split.fold
            m = {
                k: _nan_to_none(v)
                for k, v in compute_metrics(y[split.test], pred, scores, classes, positive, minority).items()
            }
            info["folds"].append({"name": name, "losses": part["losses"], "seconds": part["seconds"], **m})
            _log_fold(name, trained, y[split.subset], classes, part, m)
    return list(records.values()), info


def supervised_baseline(
    items: Sequence[Mapping],
    output_path: str | os.PathLike,
    *,
    preprocess: Callable[[dict], Mapping] | None = None,
    protocol: ProtocolSettings | None = None,
    settings: TrainSettings | Mapping = TrainSettings(),
    make_encoder: Callable[[], nn.Module] | None = None,
    make_augment: Callable[[], Sequence] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    unlabelled: str = "error",
    provenance: Mapping | None = None,
) -> str:
    """Preprocess, run the protocol and write the records JSON (what ``evaluation.evaluate(extra_rows=...)`` reads)
    atomically, with a ``<stem>.meta.json`` provenance sidecar; returns the output path.

    ``protocol``: the ``ProtocolSettings`` the SVM rows use (its folds, seeds, label fractions and positive label),
    so the baseline trains on exactly their splits.

    ``cache_dir`` defaults to ``<output stem>.parts/`` next to the output: rerunning after a kill trains only the
    (seed, fold, fraction) results that are missing there.
    """
    t0 = time.perf_counter()
    settings = settings if isinstance(settings, TrainSettings) else TrainSettings(**settings)
    protocol = protocol if protocol is not None else ProtocolSettings(seeds=(0,))
    n_folds, seeds, label_fractions = protocol.n_folds, protocol.seeds, protocol.label_fractions
    positive_label = protocol.positive_label
    output_path = Path(output_path)
    labelled, excluded = select_labelled(items, unlabelled)
    cohort = prepare_cohort(labelled, preprocess)
    logger.info("supervised baseline: %d cases preprocessed in %.1f s", len(cohort.ids), time.perf_counter() - t0)
    cache = Path(cache_dir) if cache_dir is not None else output_path.with_name(output_path.stem + ".parts")
    records, info = run_supervised(
        cohort,
        n_folds=n_folds,
        seeds=seeds,
        label_fractions=label_fractions,
        settings=settings,
        positive_label=positive_label,
        make_encoder=make_encoder,
        make_augment=make_augment,
        device=device,
        cache_dir=cache,
    )
    classes, counts = np.unique(cohort.y, return_counts=True)
    meta = {
        **dict(provenance or {}),
        "kind": "supervised_baseline_predictions",
        "n_cases": len(cohort.ids),
        "class_counts": {str(c): int(n) for c, n in zip(classes.tolist(), counts)},
        "excluded_unlabelled": excluded,
        "image_shape": list(cohort.images.shape[1:]),
        "data_sha256": cohort.fingerprint(),
        "n_folds": n_folds,
        "seeds": [int(s) for s in seeds],
        "label_fractions": [float(f) for f in label_fractions],
        "positive_label": py_scalar(task_labels(cohort.y, positive_label)[1]),
        "settings": asdict(settings),
        "loss": "cross-entropy weighted n / (K * n_c) per training subset",
        "augmentation": _describe_augment(make_augment),
        "device": str(_default_device(device)),
        "torch": torch.__version__,
        "cache_dir": str(cache),
        "trained": info["trained"],
        "reused": info["reused"],
        "folds": info["folds"],
        "seconds": round(time.perf_counter() - t0, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(output_path, records)
    atomic_write_json(meta_path(output_path), meta)
    logger.info(
        "supervised baseline: %d trained, %d reused, %.0f s; wrote %s",
        len(info["trained"]),
        len(info["reused"]),
        meta["seconds"],
        output_path,
    )
    return str(output_path)
