"""Release zip as the Model Zoo publishes it, downloaded with ``monai.bundle download`` and trained from elsewhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from scripts.pretrain.networks import Encoder3D
from scripts.run.package import (
    build_package,
    bundle_name,
    check_torchscript_matches,
    collect_files,
    find_local_paths,
    local_path_patterns,
)

ROOT = Path(__file__).resolve().parent.parent
METADATA = json.loads((ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))
NAME = bundle_name(METADATA)
BUNDLE_PARTS = ("configs", "scripts", "docs", "LICENSE", "requirements.txt")


@pytest.fixture(scope="module")
def release_zip(tmp_path_factory) -> Path:
    return Path(build_package(out=str(tmp_path_factory.mktemp("dist"))))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_bundle(dst: Path) -> Path:
    """A copy of the bundle's release files, to break without touching the repository."""
    for part in BUNDLE_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / part)
    (dst / "models").mkdir()
    for f in ("model.pt", "model.ts"):
        shutil.copy2(ROOT / "models" / f, dst / "models" / f)
    return dst


def test_zip_has_one_top_folder_and_only_release_files(release_zip):
    assert release_zip.name == f"{NAME}_v{METADATA['version']}.zip"
    names = zipfile.ZipFile(release_zip).namelist()
    assert {n.split("/")[0] for n in names} == {NAME}
    rel = {n.split("/", 1)[1] for n in names}
    for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                     "configs/logging.conf", "models/model.pt", "models/model.ts", "scripts/__init__.py",
                     "scripts/pretrain/networks.py", "docs/README.md"):  # fmt: skip
        assert required in rel, f"{required} missing from the release zip"
    assert not [r for r in rel if r.startswith(("models/checkpoints", "eval/", ".venv", "tests/"))]
    assert not [r for r in rel if "__pycache__" in r or "_cache" in r or r.endswith(".pyc")]
    # the TorchScript file carries no absolute source paths of the machine that exported it, and still loads
    ts = zipfile.ZipFile(release_zip).read(f"{NAME}/models/model.ts")
    assert str(ROOT).encode() not in ts and not [
        n for n in zipfile.ZipFile(io.BytesIO(ts)).namelist() if n.endswith(".debug_pkl")
    ]
    module = torch.jit.load(io.BytesIO(ts))
    assert module(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 256)


def test_packaging_is_reproducible_and_skips_caches(tmp_path):
    bundle = _copy_bundle(tmp_path / "bundle")
    (bundle / "scripts" / "__pycache__").mkdir()
    (bundle / "scripts" / "__pycache__" / "networks.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (bundle / "configs" / ".ruff_cache").mkdir()
    (bundle / "configs" / ".ruff_cache" / "x").write_text("cache")
    (bundle / "models" / ".model.pt.abc.tmp").write_bytes(b"half written")
    (bundle / "models" / "checkpoints").mkdir()
    (bundle / "models" / "checkpoints" / "checkpoint_epoch=1.pt").write_bytes(b"ckpt")
    (bundle / "eval").mkdir()
    (bundle / "eval" / "ssl_features.csv").write_text("id\n")
    files = collect_files(bundle)
    assert not [f for f in files if "cache" in f or f.endswith((".pyc", ".tmp")) or f.startswith(("eval", "models/c"))]
    first = build_package(out=str(tmp_path / "a"), bundle_root=str(bundle))
    second = build_package(out=str(tmp_path / "b"), bundle_root=str(bundle))
    assert _sha256(Path(first)) == _sha256(Path(second))


def test_local_absolute_paths_are_refused(tmp_path):
    bundle = _copy_bundle(tmp_path / "bundle")
    profile = bundle / "configs" / "data" / "demo.json"
    data = json.loads(profile.read_text(encoding="utf-8"))
    data["datalist"] = str(bundle / "data" / "datalist.json")
    profile.write_text(json.dumps(data, indent=4))
    (bundle / "docs" / "notes.md").write_text("relative paths are fine: ./data, ../shared\nsee /home/alice/cohort\n")
    hits = find_local_paths(bundle, collect_files(bundle), local_path_patterns(bundle))
    assert any(h.startswith("configs/data/demo.json:") and str(bundle) in h for h in hits), hits
    assert any(h.startswith("docs/notes.md:2:") for h in hits) and not any("notes.md:1:" in h for h in hits), hits
    with pytest.raises(ValueError, match="local absolute paths"):
        build_package(out=str(tmp_path / "dist"), bundle_root=str(bundle))
    assert not (tmp_path / "dist" / f"{NAME}_v{METADATA['version']}.zip").exists()


def test_stale_torchscript_is_refused(tmp_path):
    net = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "model.ts"))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    check_torchscript_matches(tmp_path / "model.pt", tmp_path / "model.ts")
    with torch.no_grad():
        net.weight.add_(1.0)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="exported from other weights"):
        check_torchscript_matches(tmp_path / "model.pt", tmp_path / "model.ts")


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_downloaded_bundle_trains_from_another_directory(release_zip, tiny_cohort, tmp_path):
    downloads, elsewhere = tmp_path / "downloads", tmp_path / "elsewhere"
    elsewhere.mkdir()
    download = [sys.executable, "-m", "monai.bundle", "download", "--name", NAME, "--url", release_zip.as_uri()]
    _run([*download, "--bundle_dir", str(downloads)], cwd=elsewhere)
    bundle = downloads / NAME
    assert (bundle / "configs" / "metadata.json").is_file() and (bundle / "models" / "model.ts").is_file()

    shipped, repo_model = _sha256(bundle / "models" / "model.pt"), _sha256(ROOT / "models" / "model.pt")
    # configs `$import scripts` before MONAI puts the bundle root on sys.path: the bundle root must be on PYTHONPATH
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    train = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(bundle / "configs" / "train.json"),
    ]
    overrides = {"bundle_root": bundle, "datalist": tiny_cohort, "epochs": 1, "batch_size": 2, "steps_per_epoch": 1,
                 "roi_size": "[28,28,28]", "num_workers": 0, "knn_monitor": "false"}  # fmt: skip
    _run([*train, *(a for k, v in overrides.items() for a in (f"--{k}", str(v)))], cwd=elsewhere, env=env)

    model = bundle / "models" / "model.pt"
    assert _sha256(model) != shipped, "training did not write models/model.pt inside the downloaded bundle"
    Encoder3D(in_channels=1, out_bn=True).load_state_dict(torch.load(model, weights_only=True), strict=True)
    check_torchscript_matches(model, bundle / "models" / "model.ts")  # training re-exported model.ts with it
    assert (bundle / "models" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()
    assert _sha256(ROOT / "models" / "model.pt") == repo_model, "the run wrote into the repository"
    assert not any(elsewhere.iterdir()), f"the run wrote into its working directory: {list(elsewhere.iterdir())}"


def _load_conf_module(app_dir: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("siam3d_conf_under_test", app_dir / "siam3d_conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_release_ships_the_monailabel_app_which_finds_its_bundle(release_zip, tmp_path):
    """The unpacked release has apps/monailabel; without --conf models it serves the bundle it sits in, a copy of
    the app elsewhere takes the bundle from --conf models (a path, or a name under <app>/model/)."""
    with zipfile.ZipFile(release_zip) as zf:
        zf.extractall(tmp_path / "unzipped")
    bundle = tmp_path / "unzipped" / NAME
    for rel in ("apps/monailabel/main.py", "apps/monailabel/siam3d_conf.py", "apps/monailabel/lib/infers/embedding.py",
                "apps/monailabel/README.md", "requirements-monailabel.txt", "scripts/downstream/svm_model.py"):  # fmt: skip
        assert (bundle / rel).is_file(), f"{rel} missing from the release"
    conf = _load_conf_module(bundle / "apps" / "monailabel")
    assert conf.resolve_bundle(bundle / "apps" / "monailabel", {}) == bundle.resolve()
    app_copy = Path(shutil.copytree(bundle / "apps" / "monailabel", tmp_path / "my_app"))
    assert conf.resolve_bundle(app_copy, {"models": str(bundle)}) == bundle.resolve()
    shutil.copytree(bundle, app_copy / "model" / NAME)
    assert conf.resolve_bundle(app_copy, {"models": NAME}) == (app_copy / "model" / NAME).resolve()
    with pytest.raises(ValueError, match="not inside a bundle: pass the bundle with --conf models"):
        conf.resolve_bundle(tmp_path / "unzipped" / "x" / "y", {})
    with pytest.raises(ValueError, match=r"--conf models nowhere: not a siam3d-radiomics bundle .* or .*model/nowhere"):
        conf.resolve_bundle(app_copy, {"models": "nowhere"})


def test_large_files_yml_lists_the_weights_with_url_and_hash(release_zip):
    """Model Zoo layout: ``large_files.yml`` gives each weight file a release URL and a sha256. The repository's
    copy has the layout (its hashes are those of the committed weights: training rewrites models/); the release
    zip's copy is computed from the files it packs, so ``monai.bundle download_large_files`` can check them."""
    import yaml

    version = METADATA["version"]
    for text in (
        (ROOT / "large_files.yml").read_text(encoding="utf-8"),
        zipfile.ZipFile(release_zip).read(f"{NAME}/large_files.yml").decode("utf-8"),
    ):
        entries = {e["path"]: e for e in yaml.safe_load(text)["large_files"]}
        assert set(entries) == {"models/model.pt", "models/model.ts"}
        for path, e in entries.items():
            assert e["hash_type"] == "sha256" and len(e["hash_val"]) == 64, e
            assert e["url"].startswith("https://") and f"v{version}" in e["url"] and e["url"].endswith(path[-3:]), e
    with zipfile.ZipFile(release_zip) as zf:
        for path, e in entries.items():  # the zip's copy, checked against the zip's bytes
            assert hashlib.sha256(zf.read(f"{NAME}/{path}")).hexdigest() == e["hash_val"], path


def test_app_readmes_name_files_that_exist():
    for app in ("monailabel", "deploy"):
        app_dir = ROOT / "apps" / app
        text = (app_dir / "README.md").read_text(encoding="utf-8")
        named = set(
            re.findall(r"`((?:lib|scripts|configs|models|apps)/[\w./-]+\.(?:py|json|pt|ts|txt)|[\w-]+\.py)", text)
        )
        missing = [n for n in sorted(named) if not (app_dir / n).exists() and not (ROOT / n).exists()]
        assert named and not missing, f"apps/{app}/README.md names files that do not exist: {missing}"
