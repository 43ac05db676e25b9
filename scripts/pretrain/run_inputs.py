"""What a pretraining run trains on, recorded beside its checkpoints, so that a resume never mixes two runs.

``--resume true`` loads the newest ``checkpoint_epoch=N.pt`` of ``checkpoint_dir``. Run with the same ``ckpt_dir``
but another cohort, another mask, another ROI or another seed, it used to "resume" the other run's checkpoint: a
finished one trained 0 iterations and the new cohort's report used the old encoder, with no error. So a run records
its training inputs in ``<checkpoint_dir>/run.json`` when it starts afresh, and a resume whose inputs differ is
refused, naming both runs and what differs, with the two ways to go on (start afresh, or another ``ckpt_dir``).
Refusing is what a researcher expects: which of two runs an encoder belongs to must never be a silent guess, and
moving a run aside on a resume would lose the run the user meant to continue.

The inputs are what changes the weights a training reaches:

* the cases: each training case id and the SHA-256 of its image and mask files (contents, not paths: a cohort folder
  that moved is the same cohort; a rewritten mask is not). Labels are not an input: pretraining never reads them (the
  read-out monitor reads the current labels each epoch);
* the deterministic preprocessing (load, orientation, ROI, intensity, context: the settings ``roi_loader.describe``
  keys the caches on) and the encoder's input record (``model_input``);
* the seed, the balancing mode and the network (SimSiam or Rubik's cube).

Hyper-parameters such as ``epochs`` or the learning rate are not: continuing a run for more epochs is what resume is
for. A fresh start (``resume`` false, or no checkpoint) moves the earlier run's files out of ``checkpoint_dir`` into
``checkpoint_dir/previous/`` (replacing the one kept there before), so no checkpoint, ``model_best.pt`` or
``model_init.pt`` of an earlier run stays beside the new run's, where a later resume or an embedding would take it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from scripts.data.roi_loader import describe, file_digest
from scripts.io_utils import WRITER_LOCK, atomic_write_json

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
PREVIOUS = "previous"
COMPARED = ("cases_sha256", "n_cases", "preprocessing_sha256", "input_record", "seed", "balance_mode", "network")


def _paths(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] if value else []


def cases_sha256(items: Sequence[dict], memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over every case's id and its image and mask files' SHA-256 (``roi_loader.file_digest``, remembered per
    file version under ``memo_dir``, the cache's ``file_digests``), in datalist order."""
    h = hashlib.sha256()
    memo = Path(memo_dir) if memo_dir else None
    for item in items:
        files = {key: [file_digest(p, memo) for p in _paths(item.get(key))] for key in ("image", "mask")}
        h.update(json.dumps([str(item["id"]), files], sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def training_inputs(
    datalist: str | os.PathLike,
    items: Sequence[dict],
    transforms: Sequence,
    input_record: dict,
    seed: int,
    balance_mode: str,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """The record of one run's training inputs (JSON); ``network`` is added by the checkpoint handler."""
    datalist = Path(datalist).resolve()
    memo = Path(cache_dir) / "file_digests" if cache_dir else None
    return {
        "datalist": str(datalist),
        "datalist_sha256": hashlib.sha256(datalist.read_bytes()).hexdigest() if datalist.is_file() else None,
        "n_cases": len(items),
        "cases_sha256": cases_sha256(items, memo),
        "preprocessing_sha256": hashlib.sha256(describe(list(transforms)).encode("utf-8")).hexdigest(),
        "input_record": json.loads(json.dumps(input_record)),
        "seed": int(seed),
        "balance_mode": str(balance_mode),
    }


def read_run_record(checkpoint_dir: str | os.PathLike) -> dict | None:
    path = Path(checkpoint_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable run record ({e}); move the folder aside to start afresh") from e


def differences(recorded: dict, current: dict) -> list[str]:
    """The compared inputs that differ, as ``name: recorded -> current`` (hashes shortened)."""

    def show(v) -> str:
        return v[:12] + "…" if isinstance(v, str) and len(v) == 64 else json.dumps(v)

    names = {"cases_sha256": "case files (ids + image/mask contents)", "preprocessing_sha256": "preprocessing"}
    return [
        f"{names.get(k, k)}: {show(recorded.get(k))} -> {show(current.get(k))}"
        for k in COMPARED
        if k in recorded and recorded.get(k) != current.get(k)
    ]


def check_resume(checkpoint: str | os.PathLike, current: dict) -> None:
    """Refuse to resume ``checkpoint`` when its folder's run record has other training inputs than ``current``,
    naming both datalists and what differs. A folder without a record (an earlier bundle version's) resumes with a
    warning: there is nothing to check against."""
    folder = Path(checkpoint).parent
    recorded = read_run_record(folder)
    if recorded is None:
        logger.warning("%s has no %s: its training inputs are unknown and not checked", folder, RUN_RECORD)
        return
    diff = differences(recorded, current)
    if diff:
        raise ValueError(
            f"cannot resume from {checkpoint}: it belongs to a run on another input. That run: datalist "
            f"{recorded.get('datalist')} ({recorded.get('n_cases')} cases); this run: datalist {current['datalist']} "
            f"({current['n_cases']} cases). Differs in: {'; '.join(diff)}. Resuming would mix the two runs in one "
            f"encoder. To start afresh here, run with --resume false (the earlier run's checkpoints are moved to "
            f"{folder / PREVIOUS}); to keep both, give this run another --ckpt_dir"
        )


def start_afresh(checkpoint_dir: str | os.PathLike, current: dict) -> Path | None:
    """Move an earlier run's files out of ``checkpoint_dir`` into ``previous/`` (replacing the run kept there) and
    write this run's record; returns the folder they went to (None when there was nothing)."""
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = [p for p in folder.iterdir() if p.name not in (PREVIOUS, WRITER_LOCK)]
    moved = None
    if earlier:
        moved = folder / PREVIOUS
        if moved.exists():
            shutil.rmtree(moved)
        moved.mkdir()
        for p in earlier:
            os.replace(p, moved / p.name)
        recorded = read_run_record(moved) or {}
        logger.warning(
            "starting afresh in %s: the earlier run's %d file(s) (datalist %s) were moved to %s",
            folder, len(earlier), recorded.get("datalist", "unknown"), moved,
        )  # fmt: skip
    atomic_write_json(folder / RUN_RECORD, current)
    return moved
