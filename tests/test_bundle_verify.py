"""Model Zoo verification in full mode: the project's offline verifier when it is around, and its core checks here.

The verifier lives in the project's shared folder (``../shared/reference/monai_bundle``), which a user's clone does
not have: that test skips there, and the tests below repeat what it checks with MONAI's own functions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from scripts.run.package import check_torchscript_matches

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
META_FILE = CONFIGS / "metadata.json"
INFER_FILE = CONFIGS / "inference.json"
VERIFIER = ROOT.parent / "shared" / "reference" / "monai_bundle" / "verify_bundle_offline.py"
MUST_PASS = ("net_in_out", "torchscript_export", "torchscript_equivalence", "provided_torchscript", "logging_conf")


def test_offline_verifier_full_mode():
    if not VERIFIER.is_file():
        reason = f"offline bundle verifier not found at {VERIFIER} (it is in the project's shared/ folder only)"
        print(reason)
        pytest.skip(reason)
    name = json.loads(META_FILE.read_text(encoding="utf-8"))["name"]
    cmd = [sys.executable, str(VERIFIER), str(ROOT), "--mode", "full", "--device", "cpu", "--name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, f"verifier failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    for check in MUST_PASS:
        assert any(line.startswith(f"PASS {check}:") for line in lines), f"check {check} did not pass:\n{proc.stdout}"


def _eager_network() -> torch.nn.Module:
    """``network_def`` of inference.json with the shipped weights, loaded strictly as MONAI Label/Deploy load it."""
    parser = ConfigParser()
    parser.read_config(f=str(INFER_FILE))
    parser.read_meta(f=str(META_FILE))
    parser["bundle_root"] = str(ROOT)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """models/model.pt exported to TorchScript by ``monai.bundle ckpt_export`` into a temporary folder."""
    path = tmp_path_factory.mktemp("export") / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(path),
        ckpt_file=str(ROOT / "models" / "model.pt"),
        meta_file=str(META_FILE),
        config_file=str(INFER_FILE),
        bundle_root=str(ROOT),
    )
    return path


def test_network_def_input_and_output_match_metadata():
    # feeds rand(1, C, *spatial_shape) from metadata and checks the output channels and dtype; raises otherwise
    verify_net_in_out(
        net_id="network_def", meta_file=str(META_FILE), config_file=str(INFER_FILE), device="cpu", bundle_root=str(ROOT)
    )


def _assert_same_embeddings(scripted: torch.jit.ScriptModule, eager: torch.nn.Module) -> None:
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)) * 255.0
    with torch.no_grad():
        a, b = eager(x), scripted.eval()(x)
    assert a.shape == b.shape == (2, 256)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_ckpt_export_reloads_and_matches_eager(exported):
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(META_FILE.read_text(encoding="utf-8"))["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    _assert_same_embeddings(scripted, _eager_network())


def test_shipped_torchscript_is_the_exported_checkpoint():
    shipped = ROOT / "models" / "model.ts"
    assert shipped.is_file(), "models/model.ts is missing: export it with python -m monai.bundle ckpt_export"
    check_torchscript_matches(ROOT / "models" / "model.pt", shipped)
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(shipped), map_location="cpu", _extra_files=extra)
    embedded = json.loads(extra["metadata.json"])["network_data_format"]
    assert embedded == json.loads(META_FILE.read_text(encoding="utf-8"))["network_data_format"], (
        "models/model.ts embeds an outdated network_data_format: re-export it"
    )
    _assert_same_embeddings(scripted, _eager_network())
