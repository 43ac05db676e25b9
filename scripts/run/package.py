"""Build the release zip of the bundle as the MONAI Model Zoo publishes it: ``<name>_v<version>.zip``.

The zip holds one top folder ``<name>/`` with ``configs/``, ``models/model.pt`` + ``models/model.ts`` (and the
record of their training input, ``models/model.input.json``, where there is one),
``scripts/``, ``docs/``, ``apps/`` (the MONAI Label and MONAI Deploy apps), ``LICENSE``, ``large_files.yml`` and
the requirement files (``requirements.txt`` is read by ``scripts/setup_env.sh``); never caches,
``eval/``, training checkpoints or a virtual environment. Entries are sorted and time-stamped 1980-01-01, so the
same files always give the same bytes. Packaging refuses a bundle whose text files mention a local absolute path
(they would not exist on the user's machine) or whose ``models/model.ts`` was exported from other weights than
``models/model.pt``. Download test: ``python -m monai.bundle download --name <name> --url file://<zip>``.

    python -m scripts.run.package [--out dist] [--bundle_root .] [--name NAME]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from scripts import cli
from scripts.io_utils import atomic_path, atomic_write_text
from scripts.torchscript import EXPORT_COMMAND, check_torchscript_matches

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
INCLUDE_DIRS = ("configs", "scripts", "docs", "apps")
INCLUDE_FILES = ("LICENSE", "requirements.txt", "requirements-monailabel.txt", "requirements-deploy.txt", "large_files.yml",
                 "models/model.pt", "models/model.ts", "models/model.input.json")  # fmt: skip
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "docs/README.md",
    "models/model.pt",
    "models/model.ts",
)
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints", ".cache", "eval"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp", ".swp", "~")
LARGE_FILES = ("models/model.pt", "models/model.ts")
# where a GitHub release of version v<version> would serve each weight file (Model Zoo bundles list such URLs)
RELEASE_URL = "https://github.com/OWNER/siam3d-radiomics/releases/download/v{version}/{name}_v{version}_{file}"
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry: reproducible archives


def bundle_name(metadata: dict) -> str:
    """Model Zoo name of the bundle: metadata ``name`` in snake_case (the zip's top folder and download name)."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", str(metadata.get("name", ""))).strip("_").lower()
    if not name:
        raise ValueError("configs/metadata.json has no usable 'name' (the Model Zoo bundle name)")
    return name


def _skipped(rel: Path) -> bool:
    """True for caches, hidden files (e.g. half-written ``.model.pt.*.tmp``), editor leftovers and bytecode."""
    return any(part in EXCLUDED_DIRS or part.startswith(".") for part in rel.parts) or rel.name.endswith(
        EXCLUDED_SUFFIXES
    )


def collect_files(root: str | os.PathLike) -> list[str]:
    """Sorted bundle-relative POSIX paths that go into the release; raises if a required file is missing."""
    root = Path(root)
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        hint = (
            f" (export the TorchScript model from the bundle root with: {EXPORT_COMMAND})"
            if any("model.ts" in m for m in missing)
            else ""
        )
        raise FileNotFoundError(f"bundle {root} lacks required file(s) {missing}{hint}")
    files = {f for f in INCLUDE_FILES if (root / f).is_file()}
    for top in INCLUDE_DIRS:
        for path in (root / top).rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not _skipped(rel):
                files.add(rel.as_posix())
    return sorted(files)


def local_path_patterns(root: str | os.PathLike) -> list[re.Pattern]:
    """Absolute paths that only exist on this machine: the bundle root and its parent, home, venv, temp dir, cwd;
    plus any ``/home/<user>``, ``/Users/<user>`` or ``C:\\Users\\<user>`` path."""
    root = Path(root).resolve()
    places = {root, root.parent, Path.home(), Path(sys.prefix), Path(tempfile.gettempdir()), Path.cwd()}
    concrete = sorted({str(p.resolve()) for p in places if len(p.resolve().parts) > 1}, key=len, reverse=True)
    patterns = [re.compile(r"(?<![\w.-])" + re.escape(p) + r"(?=[/\\'\"\s,:;)\]}]|$)", re.MULTILINE) for p in concrete]
    patterns.append(re.compile(r"(?<![\w.-])(/home/|/Users/|[A-Za-z]:\\Users\\)[\w.-]+"))
    return patterns


def _text_of(path: Path) -> str | None:
    """File content as text, or ``None`` for binary files (weights, TorchScript, images)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def find_local_paths(root: str | os.PathLike, files: Iterable[str], patterns: Sequence[re.Pattern]) -> list[str]:
    """``"file:line: match"`` for every local absolute path in the text files among ``files``."""
    hits = []
    for rel in files:
        text = _text_of(Path(root) / rel)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            for pattern in patterns:
                hits += [f"{rel}:{lineno}: {m.group(0)}" for m in pattern.finditer(line)]
    return hits


def _packed_bytes(path: Path) -> bytes:
    """A file's bytes as the release packs them (TorchScript without its debug records)."""
    data = path.read_bytes()
    return strip_debug_records(data) if path.suffix == ".ts" else data


def render_large_files(root: str | os.PathLike, files: dict[str, bytes] | None = None) -> str:
    """``large_files.yml`` as Model Zoo bundles ship it: each weight file's path, release URL, sha256.

    ``files`` (path -> bytes) describes what is packed (the release's TorchScript file has no debug records);
    by default the files in ``root``. ``monai.bundle download_large_files`` reads this file and checks the hashes.
    """
    root = Path(root)
    metadata = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    name, version = bundle_name(metadata), metadata["version"]
    lines = [
        "# Weights of this bundle release: where a release would serve them and their hash (sha256).",
        "# Written by `python -m scripts.run.package --write_large_files`; the release zip carries its own copy, computed",
        "# from the files it packs. OWNER in the URLs is the GitHub account the release is published under.",
        "large_files:",
    ]
    for rel in LARGE_FILES:
        data = files[rel] if files is not None else _packed_bytes(root / rel)
        url = RELEASE_URL.format(version=version, name=name, file=Path(rel).name)
        lines += [f'  - path: "{rel}"', f'    url: "{url}"', f'    hash_val: "{hashlib.sha256(data).hexdigest()}"']
        lines += ['    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _zip_entry(name: str, source: Path) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so the permission bits below are honoured on extraction
    info.external_attr = (0o755 if source.stat().st_mode & 0o111 else 0o644) << 16
    return info


def strip_debug_records(ts_bytes: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` entries: they hold the exporting machine's absolute source
    paths, and ``torch.jit.load`` does not need them (the module and its outputs are unchanged)."""
    src, out = zipfile.ZipFile(io.BytesIO(ts_bytes)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(".debug_pkl"):
                dst.writestr(info, src.read(info.filename))
    return out.getvalue()


def build_package(out: str = "dist", bundle_root: str | None = None, name: str | None = None) -> str:
    """Write ``<out>/<name>_v<version>.zip`` from the bundle at ``bundle_root`` and return its path.

    ``name`` defaults to the Model Zoo name derived from ``configs/metadata.json``; the version comes from there too.
    """
    root = Path(bundle_root).resolve() if bundle_root else BUNDLE_ROOT
    meta_file = root / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{root} is not a bundle: {meta_file} is missing")
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    name = name or bundle_name(metadata)
    version = metadata.get("version")
    if not version:
        raise ValueError(f"{meta_file} has no 'version'")
    files = collect_files(root)
    hits = find_local_paths(root, files, local_path_patterns(root))
    if hits:
        raise ValueError("local absolute paths in files to package (they do not exist for users):\n" + "\n".join(hits))
    check_torchscript_matches(root / "models" / "model.pt", root / "models" / "model.ts")

    target = Path(out).resolve() / f"{name}_v{version}.zip"
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        weights = {rel: _packed_bytes(root / rel) for rel in LARGE_FILES}
        for rel in files:
            data = weights[rel] if rel in weights else _packed_bytes(root / rel)
            if rel == "large_files.yml":
                data = render_large_files(root, weights).encode("utf-8")  # the hashes of the weights packed here
            zf.writestr(_zip_entry(f"{name}/{rel}", root / rel), data)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    print(f"{target}: {len(files)} files, {target.stat().st_size / 2**20:.1f} MiB, sha256 {digest}")
    return str(target)


def main(argv: list[str] | None = None) -> str:
    ap = cli.parser("python -m scripts.run.package", __doc__)
    ap.add_argument("--out", default="dist", help="folder for the zip (default: %(default)s)")
    ap.add_argument("--bundle_root", default=None, help="bundle to package (default: this one)")
    ap.add_argument("--name", default=None, help="Model Zoo name (default: from configs/metadata.json)")
    ap.add_argument(
        "--write_large_files", action="store_true", help="only (re)write large_files.yml from the bundle's weights"
    )
    args = vars(ap.parse_args(argv))
    if args.pop("write_large_files"):
        root = Path(args["bundle_root"]).resolve() if args["bundle_root"] else BUNDLE_ROOT
        atomic_write_text(root / "large_files.yml", render_large_files(root))
        print(root / "large_files.yml")
        return str(root / "large_files.yml")
    return build_package(**args)


if __name__ == "__main__":
    main()
