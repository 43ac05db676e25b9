"""The input an encoder was trained on, recorded beside ``models/model.pt`` and checked wherever it embeds.

The weights load the same whether the encoder sees the lesion context (the 0.6.0 default) or the whole tumour box
(the paper preset, ``--context_transforms "[]"``), or another ROI size. A mismatch would give features of the wrong
input with no error, so training writes ``model.input.json`` beside the checkpoint (ROI size, input channels and the
``context_transforms`` as class + settings), and ``inferring`` and the MONAI Label and Deploy apps refuse a config
whose input differs, naming both. A checkpoint without a record (made before 0.6.1, or by hand) is used with a
warning: there is nothing to check it against.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from scripts.config_utils import check_settings
from scripts.data.roi_loader import setting_text, settings_of
from scripts.io_utils import atomic_write_json

logger = logging.getLogger(__name__)

RECORD_SUFFIX = ".input.json"
CHECKED = ("roi_size", "in_channels", "context_transforms", "roi_spacing_mm")


def record_path(checkpoint: str | os.PathLike) -> Path:
    """``models/model.pt`` -> ``models/model.input.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + RECORD_SUFFIX)


def _setting(value):
    """One setting as JSON where it is plain data (tuples as lists), else as ``roi_loader``'s stable text of it
    (nested transforms by their settings, arrays by value or hash), so no setting escapes the comparison."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return setting_text(value)


def describe_transforms(transforms) -> list[dict]:
    """Each transform's class and settings, e.g. ``{"transform": "scripts.data.transforms.LesionContextd",
    "keys": ["image"], "margin": 3.0, ...}``: the settings ``roi_loader.describe`` keys its caches on, as JSON."""
    return [
        {"transform": f"{type(t).__module__}.{type(t).__qualname__}"}
        | {k: _setting(v) for k, v in settings_of(t).items()}
        for t in transforms or []
    ]


def input_record(roi_size, in_channels: int, context_transforms, roi_spacing_mm=None) -> dict:
    """The record of one configuration's encoder input (JSON round-tripped, so it compares equal to a read one).
    A ``roi_size`` that is not 3 positive integers (``--roi_size 32``) is refused naming it. ``roi_spacing_mm`` (a
    box in mm on resampled voxels) is recorded only when set, so the record of the default input is unchanged."""
    check_settings(roi_size=roi_size, in_channels=in_channels, roi_spacing_mm=roi_spacing_mm)
    record = {
        "roi_size": [int(s) for s in roi_size],
        "in_channels": int(in_channels),
        "context_transforms": describe_transforms(context_transforms),
    }
    if roi_spacing_mm is not None:
        record["roi_spacing_mm"] = [float(s) for s in roi_spacing_mm]
    return json.loads(json.dumps(record))


def write_input_record(checkpoint: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` beside ``checkpoint`` atomically (the trainer calls this with every ``model.pt``)."""
    path = record_path(checkpoint)
    atomic_write_json(path, record)
    return path


def read_input_record(checkpoint: str | os.PathLike) -> dict | None:
    """The record beside ``checkpoint``; ``None``, with a warning, when there is none."""
    path = record_path(checkpoint)
    if not path.is_file():
        logger.warning("%s has no %s: its training input is unknown and not checked", checkpoint, path.name)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable input record of {checkpoint} ({e})") from e


def check_input(
    checkpoint: str | os.PathLike, roi_size, in_channels: int, context_transforms, roi_spacing_mm=None
) -> dict | None:
    """Raise ``ValueError`` when this configuration's encoder input differs from the one ``checkpoint`` was trained
    on; returns the record read (``None``, with a warning, when the checkpoint has none). An absent
    ``roi_spacing_mm`` is the box in voxels (null), on either side."""
    record = read_input_record(checkpoint)
    if record is None:
        return None
    path = record_path(checkpoint)
    trained = {"roi_spacing_mm": None, **record}
    now = {"roi_spacing_mm": None, **input_record(roi_size, in_channels, context_transforms, roi_spacing_mm)}
    differ = [k for k in CHECKED if k in trained and trained[k] != now[k]]
    if differ:
        lines = "; ".join(
            f"{k}: trained on {json.dumps(trained[k])}, this config gives {json.dumps(now[k])}" for k in differ
        )
        fixes = [f'--{k} "{json.dumps(trained[k])}"' for k in differ if k != "context_transforms"]
        if "context_transforms" in differ:
            fixes.append(
                '--context_transforms "[]"'
                if not trained["context_transforms"]
                else "the context_transforms of the training config (the default's is in inference.json)"
            )
        raise ValueError(
            f"{checkpoint} was trained on another input than this config gives it: {lines}. Embed with the "
            f"training's input ({'; '.join(fixes)}) or retrain; the record is {path}"
        )
    return record


def check_config_input(checkpoint: str | os.PathLike, config: dict) -> dict | None:
    """``check_input`` for a raw bundle config (``inference.json``, or the one a TorchScript file embeds): the apps
    build their preprocessing from such a config, not from a parsed workflow."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(config)
    if "imports" in config:  # the modules its expressions name (as a bundle run resolves them first)
        parser.get_parsed_content("imports")
    return check_input(
        checkpoint,
        parser.get_parsed_content("roi_size"),
        parser.get_parsed_content("in_channels"),
        parser.get_parsed_content("context_transforms"),
        parser.get_parsed_content("roi_spacing_mm") if "roi_spacing_mm" in config else None,
    )


def check_torchscript_input(model_ts: str | os.PathLike) -> dict | None:
    """``check_config_input`` for the ``inference.json`` a TorchScript export embeds (what the Deploy app's bundle
    operator builds its preprocessing from), against the record beside it (``model.input.json``)."""
    from monai.data import load_net_with_metadata

    model_ts = Path(model_ts)
    if read_input_record(model_ts.with_name("model.pt")) is None:
        return None
    _, _, extra = load_net_with_metadata(str(model_ts), map_location="cpu", more_extra_files=("inference.json",))
    if not extra.get("inference.json"):
        raise ValueError(f"{model_ts} embeds no inference.json: re-export it with `python -m monai.bundle ckpt_export`")
    return check_config_input(model_ts.with_name("model.pt"), json.loads(extra["inference.json"]))
