"""The embedded default cohort: a synthetic, deterministic, class-imbalanced set of 3D lesion volumes with masks.

It is meant to be a fair test of the method, not a toy that any feature solves:

* two lesion phenotypes at 3:1 — "necrotic" (majority, label 1: lobulated, enhancing rim around a dark core,
  heterogeneous) and "homogeneous" (minority, label 0: smoother, fainter core, finer texture). Their mean
  intensities are matched, so they differ in texture and shape; both are driven by a severity parameter
  whose class ranges overlap, so no classifier can be perfect;
* four "centres" with their own intensity scale, offset, bias field and noise, imbalanced in size, and
  centre A has no minority cases (like CBICA in the paper's BraTS Table 1), so centre is a confounder.

Images are written as int16 NIfTI (like MRI), masks as uint8 NIfTI, with a datalist whose paths are relative
to it — so the default exercises exactly the loading code a real cohort does. Labels are recorded for the
evaluation only; pretraining never reads them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.io_utils import honour_umask

GENERATOR_VERSION = 1
LABEL_MAP = {"0": "homogeneous", "1": "necrotic"}


@dataclass(frozen=True)
class Centre:
    name: str
    scale: float  # scanner intensity scale
    offset: float  # additive offset of the tissue signal
    bias: float  # strength of a linear bias field across the volume
    noise: float  # Gaussian noise sigma, relative to tissue intensity
    share_major: float  # share of the majority class acquired here
    share_minor: float  # share of the minority class acquired here


DEFAULT_CENTRES = (
    Centre("A", 600.0, 0.0, 0.10, 0.04, 0.55, 0.00),
    Centre("B", 1000.0, 80.0, 0.20, 0.06, 0.25, 0.50),
    Centre("C", 250.0, 0.0, 0.05, 0.10, 0.12, 0.30),
    Centre("D", 1500.0, 150.0, 0.25, 0.05, 0.08, 0.20),
)


@dataclass(frozen=True)
class CohortSpec:
    n_cases: int = 120
    minority_fraction: float = 0.25  # 3:1 like BraTS H-grade : L-grade
    shape: tuple[int, int, int] = (48, 48, 48)
    seed: int = 0
    centres: tuple[Centre, ...] = field(default=DEFAULT_CENTRES)

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["generator_version"] = GENERATOR_VERSION
        return d


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field (texture and lobulation come from these)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def make_case(
    rng: np.random.Generator, label: int, centre: Centre, shape=(48, 48, 48)
) -> tuple[np.ndarray, np.ndarray]:
    """One (image int16, mask uint8) pair of the given phenotype acquired at ``centre``."""
    shape = tuple(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    mid = (np.asarray(shape, dtype=np.float32) - 1) / 2
    # head: an ellipsoid of brain-like tissue with low-frequency texture, air (0) outside
    head_r = np.asarray(shape, dtype=np.float32) * rng.uniform(0.44, 0.49, size=3)
    head = (((grid - mid[:, None, None, None]) / head_r[:, None, None, None]) ** 2).sum(0) <= 1.0
    tissue = 1.0 + 0.06 * _smooth_noise(rng, shape, 3.0) + 0.03 * _smooth_noise(rng, shape, 1.0)

    # lesion: centre anywhere inside the head, sometimes close to the volume border
    r0 = rng.uniform(6.5, 10.5) * min(shape) / 48
    centre_vox = mid + rng.uniform(-0.28, 0.28, size=3) * np.asarray(shape)
    rel = (grid - centre_vox[:, None, None, None]) / r0
    # phenotype severity t: necrotic cases draw t from [0.3, 1], homogeneous ones from [0, 0.5]; the overlap keeps
    # the best achievable balanced accuracy near 0.85 instead of 1.0. Shape, rim, core and texture all follow t
    # with their own jitter, so no single feature reads t off exactly.
    t = rng.uniform(0.3, 1.0) if label == 1 else rng.uniform(0.0, 0.5)
    stretch = rng.uniform(0.8, 1.25, size=3)
    dist = np.sqrt(((rel / stretch[:, None, None, None]) ** 2).sum(0))
    dist = dist + (0.03 + 0.25 * t * rng.uniform(0.5, 1.5)) * _smooth_noise(rng, shape, 2.0)
    core_ratio = 0.65 * t * rng.uniform(0.7, 1.1)
    rim_gain = 0.5 * t * rng.uniform(0.6, 1.4)
    core_gain = 0.6 * t * rng.uniform(0.6, 1.4)
    texture = 0.02 + 0.12 * t * rng.uniform(0.5, 1.5)
    lesion = (dist <= 1.0) & head
    if lesion.sum() < 30:  # never emit an (almost) empty lesion: fall back to a plain sphere inside the head
        lesion = (np.sqrt((rel**2).sum(0)) <= 1.0) & head
    base = 1.3  # mean lesion intensity of both phenotypes sits near this: texture and shape separate them
    signal = np.where(dist <= core_ratio, base - core_gain, base + rim_gain * np.clip(1.2 - dist, 0, 1))
    signal = signal + texture * _smooth_noise(rng, shape, 0.8)
    img = np.where(lesion, signal, tissue) * head

    # acquisition: bias field, scale/offset, noise (everywhere, as in MRI)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    ramp = np.tensordot(direction, (grid - mid[:, None, None, None]) / np.asarray(shape).max(), axes=1)
    img = img * (1.0 + centre.bias * ramp) + centre.noise * rng.standard_normal(shape) * (0.3 + head)
    img = np.clip(img * centre.scale + centre.offset * head, 0, 32000)
    return img.astype(np.int16), lesion.astype(np.uint8)


def _assign(spec: CohortSpec, rng: np.random.Generator) -> list[tuple[int, Centre]]:
    n_minor = int(round(spec.n_cases * spec.minority_fraction))
    labels = [0] * n_minor + [1] * (spec.n_cases - n_minor)
    out = []
    for label in labels:
        weights = np.asarray([c.share_minor if label == 0 else c.share_major for c in spec.centres])
        out.append((label, spec.centres[rng.choice(len(spec.centres), p=weights / weights.sum())]))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def generate_cohort(out_dir: str | os.PathLike, spec: CohortSpec = CohortSpec()) -> Path:
    """Write the cohort (images/, masks/, datalist.json, cohort.json) into ``out_dir``; returns the datalist path.

    Written into a temporary sibling folder and renamed into place, so a killed generation leaves nothing half-done.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        honour_umask(tmp, directory=True)  # mkdtemp makes it 0700: the renamed cohort would be private
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rng = np.random.default_rng(spec.seed)
        entries = []
        for i, (label, centre) in enumerate(_assign(spec, rng)):
            case_id = f"demo_{i:04d}"
            img, mask = make_case(rng, label, centre, spec.shape)
            affine = np.diag([1.0, 1.0, 1.0, 1.0])
            affine[:3, 3] = [-spec.shape[0] / 2, -spec.shape[1] / 2, -spec.shape[2] / 2]
            nib.save(nib.Nifti1Image(img, affine), tmp / "images" / f"{case_id}.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), tmp / "masks" / f"{case_id}.nii.gz")
            entries.append(
                {
                    "id": case_id,
                    "image": f"images/{case_id}.nii.gz",
                    "mask": f"masks/{case_id}.nii.gz",
                    "label": label,
                    "centre": centre.name,
                }
            )
        (tmp / "datalist.json").write_text(json.dumps({"training": entries, "testing": []}, indent=1) + "\n")
        (tmp / "cohort.json").write_text(json.dumps({"spec": spec.to_json(), "label_map": LABEL_MAP}, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir / "datalist.json"


def default_cohort_dir() -> Path:
    """``$SIAM3D_DATA/demo_cohort`` if set, else ``<bundle root>/.cache/demo_cohort`` (git-ignored)."""
    root = os.environ.get("SIAM3D_DATA") or str(Path(__file__).resolve().parents[2] / ".cache")
    return Path(root) / "demo_cohort"


def ensure_demo_cohort(
    out_dir: str | os.PathLike | None = None, n_cases: int = 120, seed: int = 0, shape=(48, 48, 48)
) -> str:
    """Path of the default cohort's datalist, generating it first if it is missing or was made with other settings.

    A lock file serialises concurrent callers (the ranks of a torchrun job all resolve the default datalist):
    the first one generates, the others wait and reuse it.
    """
    out_dir = Path(out_dir) if out_dir else default_cohort_dir()
    spec = CohortSpec(n_cases=int(n_cases), seed=int(seed), shape=tuple(int(s) for s in shape))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:  # a sibling: generation replaces out_dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = out_dir / "cohort.json"
        if meta.is_file() and (out_dir / "datalist.json").is_file():
            if json.loads(meta.read_text(encoding="utf-8")).get("spec") == json.loads(json.dumps(spec.to_json())):
                return str(out_dir / "datalist.json")
        t0 = time.perf_counter()
        path = generate_cohort(out_dir, spec)
        print(
            f"generated the default cohort ({spec.n_cases} cases, {spec.shape}) in {time.perf_counter() - t0:.1f} s: "
            f"{path}"
        )
    return str(path)
