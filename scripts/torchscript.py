"""``models/model.ts`` kept in step with ``models/model.pt``: export at the end of each training epoch, and a check
that everything serving TorchScript (the release zip, the MONAI Deploy app, the MONAI Label app) runs first.

A stale ``model.ts`` would serve the previous weights while ``model.pt`` users get the new ones. The export is what
``python -m monai.bundle ckpt_export`` writes (TorchScript + ``metadata.json`` + ``inference.json`` embedded), so the
Deploy app's bundle operator can read it; the check compares every tensor.
"""

from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import torch

from scripts.io_utils import atomic_write_bytes

EXPORT_COMMAND = (
    "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt "
    "--meta_file configs/metadata.json --config_file configs/inference.json"
)


def export_torchscript(
    encoder: torch.nn.Module,
    path: str | os.PathLike,
    meta_file: str | os.PathLike,
    config_file: str | os.PathLike,
) -> Path:
    """Script a CPU copy of ``encoder`` (the training module is left as it is) and write it atomically to ``path``
    with ``meta_file`` and ``config_file`` embedded as ``ckpt_export`` embeds them."""
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata
    from monai.networks.utils import convert_to_torchscript

    net = copy.deepcopy(encoder).cpu().eval()
    scripted = convert_to_torchscript(net, use_trace=False)
    meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    extra = {Path(config_file).stem + ".json": json.dumps(ConfigParser.load_config_file(str(config_file))).encode()}
    buf = io.BytesIO()
    save_net_with_metadata(
        scripted, buf, include_config_vals=False, append_timestamp=False, meta_values=meta, more_extra_files=extra
    )
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def check_torchscript_matches(model_pt: str | os.PathLike, model_ts: str | os.PathLike) -> None:
    """Raise unless ``model_ts`` carries exactly the weights of ``model_pt`` (a stale export would serve old weights).

    The message names both files and the command that re-exports the TorchScript file."""
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    scripted = torch.jit.load(str(model_ts), map_location="cpu").state_dict()
    if set(state) != set(scripted):
        diff = sorted(set(state) ^ set(scripted))[:5]
        raise ValueError(f"{model_ts} and {model_pt} hold different tensors (e.g. {diff}); re-export: {EXPORT_COMMAND}")
    stale = [k for k in state if not torch.equal(state[k].cpu(), scripted[k].cpu())]
    if stale:
        raise ValueError(
            f"{model_ts} was exported from other weights than {model_pt} ({len(stale)} tensors differ, e.g. "
            f"{stale[0]}); re-export: {EXPORT_COMMAND}"
        )


def check_beside(model_ts: str | os.PathLike) -> None:
    """``check_torchscript_matches`` against the ``model.pt`` in the same folder, when there is one."""
    model_pt = Path(model_ts).with_name("model.pt")
    if model_pt.is_file():
        check_torchscript_matches(model_pt, model_ts)
