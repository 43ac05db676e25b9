"""Embedding export: collect the encoder's 256-d output per case id and write a feature table with provenance."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.feature_table import write_feature_table
from scripts.io_utils import ensure_writable_dir, sha256_file
from scripts.pretrain.model_input import record_path

logger = logging.getLogger(__name__)


def bundle_version(bundle_root: str | os.PathLike | None = None) -> str:
    """Version in ``configs/metadata.json`` of the bundle whose code is running (``bundle_root`` is a fallback)."""
    for root in (Path(__file__).resolve().parents[2], Path(bundle_root or ".")):
        meta = root / "configs" / "metadata.json"
        if meta.is_file():
            return json.loads(meta.read_text(encoding="utf-8"))["version"]
    return "unknown"


class EmbeddingWriter:
    """Gather ``pred`` rows keyed by ``batch['id']`` and write ``ssl_000 … ssl_255`` atomically when the run ends.

    Provenance: bundle version, checkpoint path and SHA-256, the checkpoint's input record (``model.input.json``), ROI
    size, number of cases, time: what a consumer (the saved SVM, the MONAI Label app) checks against the encoder it
    serves. The output folder is checked when the run starts, so an unwritable one fails before the cohort is
    embedded, not after.
    """

    def __init__(
        self, output_path: str, checkpoint: str | None = None, provenance: dict | None = None, prefix: str = "ssl"
    ) -> None:
        self.output_path, self.checkpoint, self.prefix = output_path, checkpoint, prefix
        self.provenance = dict(provenance or {})
        self.ids: list[str] = []
        self.rows: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        ensure_writable_dir(Path(self.output_path).parent, "embedding output directory")
        if Path(self.output_path).is_dir():  # the rename would fail only after the whole cohort is embedded
            raise ValueError(
                f"embedding output {self.output_path} is an existing folder: embeddings_path must name a table file "
                f"such as {Path(self.output_path) / 'ssl_features.csv'} (nothing was embedded or written)"
            )
        self.ids.clear()
        self.rows.clear()

    def _collect(self, engine: Engine) -> None:
        pred = engine.state.output["pred"] if isinstance(engine.state.output, dict) else engine.state.output[0]["pred"]
        pred = torch.as_tensor(pred).detach().float().cpu().numpy().reshape(len(engine.state.batch["id"]), -1)
        self.ids.extend(str(i) for i in engine.state.batch["id"])
        self.rows.append(pred)

    def _write(self, engine: Engine) -> None:
        values = np.concatenate(self.rows) if self.rows else np.zeros((0, 0))
        columns = [f"{self.prefix}_{i:03d}" for i in range(values.shape[1])]
        if len(values) > 1 and np.ptp(values, axis=0).max() == 0:
            logger.warning(
                "all %d embeddings written to %s are identical: the encoder has collapsed (or was never trained); "
                "the evaluation will refuse this table",
                len(values),
                self.output_path,
            )
        prov = {
            **self.provenance,
            "kind": "ssl_embeddings",
            "n_cases": len(self.ids),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.checkpoint and os.path.isfile(self.checkpoint):
            prov.update(checkpoint=os.path.abspath(self.checkpoint), checkpoint_sha256=sha256_file(self.checkpoint))
            record = record_path(self.checkpoint)  # the encoder's input, which inferring checked this config gives
            if record.is_file():
                prov["input_record"] = json.loads(record.read_text(encoding="utf-8"))
        write_feature_table(self.output_path, self.ids, columns, values, prov)
