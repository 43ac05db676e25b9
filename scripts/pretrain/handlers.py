"""Ignite handlers of the pretraining workflow: per-epoch seeding, resume, encoder export, collapse and kNN monitors.

Each handler has ``attach(engine)`` so it can sit in a bundle's ``train#handlers`` list next to MONAI's own.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler
from monai.utils import set_determinism

from scripts.config_utils import as_bool
from scripts.distributed import is_rank0, rank
from scripts.io_utils import atomic_path, atomic_write_json, hold_writer_lock
from scripts.pretrain.readout import (
    PROBE_C,
    check_probe_c,
    effective_rank,
    knn_balanced_accuracy,
    probe_scores,
    stratified_folds,
)

READOUT_METRICS = ("knn_balanced_accuracy", "probe_auc", "probe_balanced_accuracy", "probe_score", "effective_rank")

logger = logging.getLogger(__name__)


class EpochSeeder:
    """Seed every random source from ``(seed, epoch)`` at each epoch start.

    Makes epoch e's shuffling and augmentations independent of what ran before, so ``train 1 + resume 1``
    reproduces ``train 2`` exactly (MONAI seeds the transforms once per loader otherwise). Under DDP each rank
    adds its rank to the seed, so ranks draw different augmentations; the ``DistributedSampler`` keeps its own
    shared seed (via ``set_epoch``) because all ranks must agree on the shuffle.
    """

    def __init__(self, seed: int, data_loader=None) -> None:
        self.seed, self.data_loader = int(seed), data_loader

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_seed = self.seed * 100_003 + int(engine.state.epoch) + 1_000_003 * rank()
        set_determinism(seed=epoch_seed)
        loader = self.data_loader
        if loader is not None:
            if getattr(loader, "generator", None) is not None:
                loader.generator.manual_seed(epoch_seed)
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(int(engine.state.epoch))
            if getattr(loader, "num_workers", 0) == 0:
                from monai.data.utils import set_rnd

                set_rnd(loader.dataset, epoch_seed)
            if engine.state.dataloader is loader:
                # Ignite may have opened this epoch's iterator before now; reopen it so it draws from the new seeds
                engine.set_data(loader)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the checkpoint with the highest epoch number in ``ckpt_dir`` (``None`` when there is none)."""
    best, best_epoch = None, -1
    for path in glob.glob(os.path.join(str(ckpt_dir), f"{prefix}*.pt")):
        m = re.search(r"epoch=(\d+)", os.path.basename(path))
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = path, int(m.group(1))
    return best


class TrainingCheckpoint:
    """Save the full training state every epoch (MONAI ``CheckpointSaver``) and, with ``resume``, restore it first.

    The state is ``objects`` (network, optimiser, scheduler) plus the engine itself and its AMP scaler, which
    the handler adds when attached (a config cannot reference the trainer from inside its own handler list).
    Files are ``checkpoint_epoch=N.pt``, written atomically by Ignite; the newest ``n_saved`` are kept. A
    checkpoint that cannot be read stops the run with a message naming the file instead of starting over.

    ``inputs`` (``scripts.pretrain.run_inputs.training_inputs``: the cases' files, preprocessing, input record, seed,
    balancing) are recorded in ``run.json`` beside the checkpoints when the run starts afresh, and a resume of a run
    on other inputs is refused, naming both (``run_inputs.check_resume``); a fresh start moves an earlier run's files
    to ``previous/``. The rank-0 process holds the folder's writer lock (``scripts.io_utils``) until the run
    completes: a second training into the same folder refuses at once, naming the first.
    """

    def __init__(
        self, ckpt_dir: str, objects: dict, resume: bool = False, n_saved: int = 2, inputs: dict | None = None
    ) -> None:
        self.ckpt_dir, self.objects, self.n_saved = ckpt_dir, dict(objects), int(n_saved)
        self.resume = as_bool(resume, "resume")
        self.inputs = dict(inputs) if inputs is not None else None

    def attach(self, engine: Engine) -> None:
        if is_rank0():  # one training per checkpoint folder: a second one refuses at once, naming the first
            release = hold_writer_lock(self.ckpt_dir, "training")
            engine.add_event_handler(Events.COMPLETED, lambda _: release())
            weakref.finalize(engine, release)
        objects = {**self.objects, "trainer": engine}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # a disabled (CPU) scaler has no state to save or load
            objects["scaler"] = scaler
        current = None
        if self.inputs is not None:
            network = self.objects.get("network")
            current = {**self.inputs, "network": type(network).__qualname__ if network is not None else None}
        resumed = self.resume and self._attach_resume(engine, objects, current)
        if is_rank0():
            if not resumed and current is not None:
                from scripts.pretrain.run_inputs import start_afresh

                start_afresh(self.ckpt_dir, current)
            CheckpointSaver(
                save_dir=self.ckpt_dir, save_dict=objects, save_interval=1, n_saved=self.n_saved, epoch_level=True
            ).attach(engine)

    def _attach_resume(self, engine: Engine, objects: dict, current: dict | None) -> bool:
        """Load the newest checkpoint when the run starts; False when there is none (the run starts afresh)."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("resume requested but no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return False
        if current is not None:
            from scripts.pretrain.run_inputs import check_resume

            check_resume(path, current)
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
            raise RuntimeError(
                f"cannot resume: checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})"
            ) from e
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict=objects, map_location="cpu").attach(engine)
        return True


class EncoderExport:
    """Write the encoder's flat ``state_dict`` to ``path`` (``models/model.pt``) atomically after every epoch, and,
    with ``torchscript_path``, its TorchScript export (``models/model.ts``) right after, so the two files the folder
    ships never hold different weights.

    Flat keys match the inference ``network_def`` (the encoder alone), which is what ``ckpt_export``, MONAI Label
    and MONAI Deploy load. ``meta_file`` and ``config_file`` are embedded in the TorchScript file as ``ckpt_export``
    embeds them (default: ``configs/metadata.json`` and ``configs/inference.json`` beside this package).
    ``input_record`` (``scripts.pretrain.model_input.input_record``) is written beside ``path`` as
    ``model.input.json``, so that whatever embeds with these weights can check it gives them the same input.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        path: str,
        torchscript_path: str | None = None,
        meta_file: str | None = None,
        config_file: str | None = None,
        input_record: dict | None = None,
    ) -> None:
        self.encoder, self.path, self.torchscript_path = encoder, path, torchscript_path
        self.input_record = input_record
        configs = Path(__file__).resolve().parents[2] / "configs"
        self.meta_file = meta_file or str(configs / "metadata.json")
        self.config_file = config_file or str(configs / "inference.json")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0():
            return
        save_encoder(self.encoder, self.path, self.input_record)
        if self.torchscript_path:
            from scripts.torchscript import export_torchscript

            export_torchscript(self.encoder, self.torchscript_path, self.meta_file, self.config_file)


def save_encoder(encoder: torch.nn.Module, path: str, input_record: dict | None = None) -> None:
    """The encoder's flat state dict at ``path`` (atomic), and its input record beside it when given."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if input_record is not None:
        from scripts.pretrain.model_input import write_input_record

        write_input_record(path, input_record)


class InitialEncoderExport:
    """Write the encoder as initialised (``models/checkpoints/model_init.pt``) when the first step starts, before its
    update: the random-init control of the downstream report (``ssl (random init)``) is exactly this run's starting
    point, same architecture, seed and input. Written once the first batch has loaded, so a run that fails on its
    data leaves ``models/`` empty; a resumed run (its first iteration is not 1) keeps the file its start wrote."""

    def __init__(self, encoder: torch.nn.Module, path: str, input_record: dict | None = None) -> None:
        self.encoder, self.path, self.input_record = encoder, path, input_record

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if is_rank0() and int(engine.state.iteration) == 1:
            save_encoder(self.encoder, self.path, self.input_record)


class InputRecordBeside:
    """Write ``input_record`` beside ``checkpoint`` once another handler has saved it (``CheckpointSaver``'s
    ``models/checkpoints/model_best.pt``), so the best encoder is checked like ``model.pt`` wherever it embeds.

    Attach it after the saver: both run on ``EPOCH_COMPLETED``, in the order they were attached. A run's input
    does not change, so the record is written once, when the checkpoint first exists.
    """

    def __init__(self, checkpoint: str, input_record: dict) -> None:
        self.checkpoint, self.input_record = checkpoint, input_record
        self.written = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from scripts.pretrain.model_input import write_input_record

        if self.written or not is_rank0() or not Path(self.checkpoint).is_file():
            return
        write_input_record(self.checkpoint, self.input_record)
        self.written = True


def collapse_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the std of L2-normalised embeddings (SimSiam's collapse metric).

    0 means every input maps to the same direction (collapse); about 1/sqrt(d) is healthy.
    """
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return float(z.std(dim=0).mean()) if z.shape[0] > 1 else float("nan")


class CollapseMonitor:
    """Log the label-free collapse figures of each epoch's ``z1`` outputs: the mean std of the normalised
    embeddings (with its healthy reference 1/sqrt(d)) and their effective rank (RankMe, ``scripts.pretrain.readout``),
    which also sees dimensional collapse — embeddings spread over only a few directions."""

    def __init__(self, summary_writer=None, output_key: str = "z1", tag: str = "collapse_std") -> None:
        self.writer, self.output_key, self.tag = summary_writer, output_key, tag
        self._buffer: list[torch.Tensor] = []
        self.history: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._buffer.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log)

    def _collect(self, engine: Engine) -> None:
        self._buffer.append(engine.state.output[self.output_key].detach().cpu())

    def _log(self, engine: Engine) -> None:
        z = torch.cat(self._buffer)
        value, ref = collapse_std(z), 1.0 / math.sqrt(z.shape[1])
        rank = effective_rank(z.numpy())
        self.history.append(value)
        engine.state.metrics[self.tag] = value
        engine.state.metrics["effective_rank"] = rank
        logger.info(
            "epoch %d: %s %.4f (healthy ~ %.4f, collapsed = 0), effective rank %.1f of %d",
            engine.state.epoch, self.tag, value, ref, rank, min(z.shape[0] - 1, z.shape[1]),
        )  # fmt: skip
        if self.writer is not None and is_rank0():
            self.writer.add_scalar(self.tag, value, engine.state.epoch)
            self.writer.add_scalar(f"{self.tag}_reference", ref, engine.state.epoch)
            self.writer.add_scalar("effective_rank", rank, engine.state.epoch)
            self.writer.flush()


class ReadoutMetric(Metric):
    """One read-out figure of the validator's epoch: ``(embeddings, labels)`` collected over the validation cases.

    ``name`` is one of ``scripts.pretrain.readout.readout``'s keys (``knn_balanced_accuracy``, ``probe_auc``,
    ``probe_balanced_accuracy``, ``effective_rank``) or ``probe_score``: the probe's AUC with two classes and its
    balanced accuracy with more, where no single AUC exists. ``probe_score`` is the key metric that picks
    ``model_best.pt``: a key metric that is NaN every epoch (``probe_auc`` on a 3-class cohort) never improves, and the
    "best" encoder would stay the first epoch's. Labels reach the read-out only; the trainer never sees them.
    Computed once per validation run over every case, so the figure does not depend on the loader's batch size.
    Deliberately not synchronised across processes (unlike Ignite's ``EpochMetric``): under DDP only rank 0
    validates, and a gather would wait forever for the other ranks.
    """

    def __init__(
        self, name: str, output_transform=lambda out: (out["pred"], out["label"]), probe_c: float | str = PROBE_C
    ) -> None:
        if name not in READOUT_METRICS:
            raise ValueError(f"unknown read-out metric {name!r}; one of {READOUT_METRICS}")
        self.name, self.probe_c = name, check_probe_c(probe_c)
        self._z: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._z, self._y = [], []

    def update(self, output) -> None:
        z, y = output
        self._z.append(torch.as_tensor(z).detach().float().cpu().reshape(len(z), -1))
        self._y.append(torch.as_tensor(y).detach().cpu().reshape(-1))

    def compute(self) -> float:
        if not self._z:
            return float("nan")
        z, y = torch.cat(self._z).numpy(), torch.cat(self._y).numpy()
        if self.name == "effective_rank":
            return effective_rank(z)
        if len(y) < 3 or len(np.unique(y)) < 2:
            return float("nan")
        if self.name == "knn_balanced_accuracy":
            return knn_balanced_accuracy(z, y)
        name = self.name
        if name == "probe_score":
            name = "probe_auc" if len(np.unique(y)) == 2 else "probe_balanced_accuracy"
        return _probe_once(z, y, self.probe_c)[name]


_last_probe: tuple[bytes, dict] = (b"", {})


def _probe_once(z: np.ndarray, y: np.ndarray, c: float | str = PROBE_C) -> dict:
    """``probe_scores`` of one validation run, shared by the probe-AUC and probe-accuracy metrics (one fit, not two)."""
    global _last_probe
    key = hashlib.sha256(z.tobytes() + y.tobytes() + str(c).encode()).digest()
    if _last_probe[0] != key:
        _last_probe = (key, probe_scores(z, y, stratified_folds(y), c))
    return _last_probe[1]


class ReadoutValidation:
    """Run the ``validate`` section's evaluator every ``interval`` epochs (MONAI ``ValidationHandler``).

    ``enabled`` (the config's ``knn_monitor`` switch) and an evaluator with no labelled case turn it off, so a
    cohort without labels trains exactly as before.
    """

    def __init__(self, validator, interval: int = 1, enabled: bool = True) -> None:
        self.validator, self.interval = validator, max(1, int(interval))
        self.enabled = as_bool(enabled, "knn_monitor") and validator is not None

    def attach(self, engine: Engine) -> None:
        loader = getattr(self.validator, "data_loader", None)
        if not self.enabled or loader is None or len(loader) == 0:
            logger.info("validation read-out off (disabled, or no labelled case to read out)")
            return
        ValidationHandler(interval=self.interval, validator=self.validator, epoch_level=True).attach(engine)


class TrainingLog:
    """Append one row per epoch to a JSON file: the median step time and every metric of the epoch.

    A machine-readable trajectory (loss, collapse, kNN, RE/SE/bank diagnostics) that experiments read back
    without parsing TensorBoard; step time runs from fetching the batch to the end of the step, so SE's in-step
    candidate work and loader stalls are included. Rows of earlier epochs survive a resume; written atomically.
    """

    def __init__(self, path: str, validator=None) -> None:
        self.path, self.validator = path, validator
        self._t0 = 0.0
        self._steps: list[float] = []
        self._losses: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: (self._steps.clear(), self._losses.clear()))
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, engine: Engine) -> None:
        self._steps.append(time.perf_counter() - self._t0)
        self._losses.append(float(engine.state.output["loss"]))

    def _write(self, engine: Engine) -> None:
        if not is_rank0():
            return
        epoch = int(engine.state.epoch)
        rows = []
        if os.path.isfile(self.path):
            rows = [
                r
                for r in json.loads(Path(self.path).read_text(encoding="utf-8")).get("epochs", [])
                if r["epoch"] < epoch
            ]
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        validated = self.validator is not None and getattr(self.validator.state, "epoch", None) == epoch
        if validated:  # the read-out figures of this epoch's validation run (absent on epochs it skipped)
            metrics.update(
                {k: float(v) for k, v in self.validator.state.metrics.items() if isinstance(v, (int, float))}
            )
        rows.append(
            {
                "epoch": epoch,
                "steps": len(self._steps),
                "step_time_median_s": float(np.median(self._steps)) if self._steps else None,
                "loss_mean": float(np.mean(self._losses)) if self._losses else None,
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                **metrics,
            }
        )
        atomic_write_json(self.path, {"epochs": rows})


class LearningRateLogger:
    """TensorBoard scalar ``learning_rate`` (first parameter group) at every iteration, so warm-up and per-epoch
    schedules show as they are applied; further groups as ``learning_rate/group_<i>``."""

    def __init__(self, optimizer: torch.optim.Optimizer, summary_writer=None, tag: str = "learning_rate") -> None:
        self.optimizer, self.writer, self.tag = optimizer, summary_writer, tag

    def attach(self, engine: Engine) -> None:
        if self.writer is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0():
            return
        for i, group in enumerate(self.optimizer.param_groups):
            tag = self.tag if i == 0 else f"{self.tag}/group_{i}"
            self.writer.add_scalar(tag, float(group["lr"]), engine.state.iteration)


class EpochProgress:
    """A tqdm bar over each epoch's iterations (loss shown) on a terminal; off a terminal no bar, one log line per
    epoch instead (StatsHandler's per-iteration lines stay), so a log file stays readable. See scripts.progress."""

    def __init__(self) -> None:
        self._bar = None
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end)

    def _start(self, engine: Engine) -> None:
        from scripts.progress import bar

        self._t0 = time.perf_counter()
        if is_rank0():
            desc = f"epoch {engine.state.epoch}/{engine.state.max_epochs}"
            self._bar = bar(total=engine.state.epoch_length, desc=desc, unit="step", leave=False)

    def _step(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{float(engine.state.output['loss']):.4f}", refresh=False)

    def _end(self, engine: Engine) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if is_rank0():
            logger.info(
                "epoch %d/%d done in %.1f s",
                engine.state.epoch,
                engine.state.max_epochs,
                time.perf_counter() - self._t0,
            )


def ensure_dir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    return path
