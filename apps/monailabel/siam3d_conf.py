"""Which bundle the app serves, from MONAI Label's ``--conf models <bundle>`` (no monailabel import: testable alone).

``models`` is what MONAI Label users pass for bundle apps: a bundle folder (absolute, or relative to the working
directory), or the name of a folder under ``<app>/model/`` (where the stock ``monaibundle`` app keeps bundles).
Without it the app serves the bundle it sits in (``apps/monailabel`` two folders below the bundle root), as it does
inside the repository or an unpacked release zip. ``bundle_path`` is the older name of the same setting.
"""

from __future__ import annotations

from pathlib import Path

REQUIRED = ("configs/inference.json", "configs/metadata.json")


def _is_bundle(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED)


def resolve_bundle(app_dir: str | Path, conf: dict) -> Path:
    """The bundle folder to serve; ``ValueError`` naming every place looked at when there is none."""
    app_dir = Path(app_dir).resolve()
    value = conf.get("models") or conf.get("bundle_path")
    if value:
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        if len(names) != 1:
            raise ValueError(f"--conf models takes one bundle (this app serves one embedding model), got {value!r}")
        tried = [Path(names[0]).expanduser(), app_dir / "model" / names[0]]
        for candidate in tried:
            if _is_bundle(candidate):
                return candidate.resolve()
        raise ValueError(
            f"--conf models {names[0]}: not a siam3d-radiomics bundle (no {' and '.join(REQUIRED)}) at "
            + " or ".join(str(t) for t in tried)
        )
    home = app_dir.parents[1]
    if _is_bundle(home):
        return home
    raise ValueError(
        f"the app at {app_dir} is not inside a bundle: pass the bundle with --conf models /path/to/siam3d_radiomics"
    )
