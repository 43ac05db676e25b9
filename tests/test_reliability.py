"""Reliability matrix (issue #7): every bad input a hospital export or a shared machine produces, on real files.

Each row of the matrix expects either a clear error that names the case (or its file) and the problem, or a skip
recorded in a failures table, and in both cases no partial output file. Per-case rows run through every entry
point a user meets: the datalist validator, radiomics (a recorded skip, and an error with ``strict``) with both
loaders, and the training workflow. The other rows (ids, evaluation, balancing, training, disk, security) follow.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from workflows import train_workflow  # noqa: E402

from scripts.datalist import check_datalist, lesion_border_sides, load_datalist, load_sections, validate_datalist
from scripts.io_utils import read_feature_table, write_feature_table
from scripts.radiomics import RadiomicsCaseError, extract_cohort

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "configs" / "radiomics_params.yaml"
SHAPE = (24, 24, 24)
LABEL_MAP = {"0": "homogeneous", "1": "necrotic"}


# ----------------------------------------------------------------------------------------------- writing real cases
def _image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(120, 40, shape), 0, 255).astype(np.float32)


def _ellipsoid(shape=SHAPE, centre=None, radii=(6, 5, 5)) -> np.ndarray:
    centre = [(n - 1) / 2 for n in shape] if centre is None else centre
    grid = np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij")
    return (sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else np.asarray(affine)), str(path))
    return str(path)


def _case(tmp: Path, case_id: str, image=None, mask=None, image_affine=None, mask_affine=None, label=0) -> dict:
    return {
        "id": case_id,
        "image": _save(tmp / f"{case_id}_img.nii.gz", _image() if image is None else image, image_affine),
        "mask": _save(tmp / f"{case_id}_seg.nii.gz", _ellipsoid() if mask is None else mask, mask_affine),
        "label": label,
    }


def _missing_file(tmp: Path, cid: str) -> dict:
    item = _case(tmp, cid)
    Path(item["image"]).unlink()
    return item


def _corrupt_nifti(tmp: Path, cid: str) -> dict:
    """A .nii.gz cut in the middle of its data, as a copy interrupted by a full disk or a killed transfer leaves it."""
    item = _case(tmp, cid)
    raw = Path(item["image"]).read_bytes()
    Path(item["image"]).write_bytes(raw[: len(raw) // 2])
    assert len(gzip.decompress(raw)) > 0  # the original was a valid gzip
    return item


def _one_voxel(tmp: Path, cid: str) -> dict:
    mask = np.zeros(SHAPE, np.uint8)
    mask[12, 12, 12] = 1
    return _case(tmp, cid, mask=mask)


def _nan_inf(tmp: Path, cid: str) -> dict:
    image = _image()
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = np.inf
    return _case(tmp, cid, image=image)


def _origin_shift(mm: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 3] = mm
    return affine


def _border(tmp: Path, cid: str) -> dict:
    """The lesion is cut by the field of view at x = 0 (the scan stopped inside it)."""
    return _case(tmp, cid, mask=_ellipsoid(centre=(1, 11.5, 11.5)))


@dataclass(frozen=True)
class Row:
    """One bad input and what each entry point must say about it (a regex; None: the case is processed)."""

    name: str
    make: object  # (tmp, case_id) -> datalist item
    validator: str | None
    radiomics: str | None
    training: str | None
    training_gap: str | None = None  # xfail reason when training's message misses the case or the problem


ROWS = [
    Row("missing_file", _missing_file, r"missing file", r"missing image file", r"No such file|missing file"),
    Row("corrupt_nifti_truncated_gzip", _corrupt_nifti, r"unreadable image \(EOFError", r"unreadable image", r"unreadable|EOFError"),
    Row("empty_mask", lambda t, c: _case(t, c, mask=np.zeros(SHAPE, np.uint8)), r"empty mask", r"empty mask", r"empty mask"),
    Row("one_voxel_mask", _one_voxel, r"only 1 lesion voxel", r"only 1 voxel", None),
    Row("shape_mismatch", lambda t, c: _case(t, c, mask=_ellipsoid((24, 24, 20))), r"image shape \(24, 24, 24\) != mask shape \(24, 24, 20\)", r"shape", r"shape \(24, 24, 24\) != mask shape \(24, 24, 20\)"),
    Row("spacing_mismatch", lambda t, c: _case(t, c, mask_affine=np.diag([1.0, 1.0, 1.5, 1.0])), r"affine mismatch \(max difference 0.5", r"spacing|affine mismatch", r"affine mismatch \(max difference 0.5"),
    Row("origin_mismatch", lambda t, c: _case(t, c, mask_affine=_origin_shift(5.0)), r"affine mismatch \(max difference 5", r"affine mismatch", r"affine mismatch \(max difference 5"),
    Row("affine_within_tolerance", lambda t, c: _case(t, c, mask_affine=_origin_shift(1e-4)), None, None, None),
    Row("nan_inf_voxels", _nan_inf, r"4 non-finite \(NaN/Inf\) voxels", r"4 non-finite", r"4 non-finite \(NaN/Inf\) voxels"),
    Row("image_2d", lambda t, c: _case(t, c, image=_image(shape=(24, 24)), mask=np.ones((24, 24), np.uint8)), r"expected a 3D volume, got 2D", r"got 2D|got shape \(24, 24\)", r"2D"),
    Row("image_5d", lambda t, c: _case(t, c, image=np.ones((24, 24, 24, 2, 2), np.float32)), r"expected a 3D volume, got 5D", r"got 5D|\(24, 24, 24, 2, 2\)", r"5D"),
    Row("lesion_touching_border", _border, None, None, None),
    Row("label_not_in_label_map", lambda t, c: _case(t, c, label=7), r"label 7 not in the label map", None, None),
]  # fmt: skip
ROW_IDS = [r.name for r in ROWS]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Every bad row next to two good cases, each written once as real NIfTI files."""
    tmp = tmp_path_factory.mktemp("bad_cohort")
    items = {"good_a": _case(tmp, "good_a"), "good_b": _case(tmp, "good_b", image=_image(1), label=1)}
    for row in ROWS:
        items[row.name] = row.make(tmp, row.name)
    return tmp, items


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _no_temp_files(folder: Path) -> None:
    leftovers = [f for f in _files_in(folder) if f.endswith(".tmp") or Path(f).name.startswith(".")]
    assert not leftovers, f"temporary files left behind in {folder}: {leftovers}"


def _chain(exc: BaseException) -> str:
    """Every message of an exception chain, as the user reads it in the traceback (MONAI wraps errors twice)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ per-case rows: validator
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_case_validator(row, cohort, tmp_path):
    """``python -m scripts.datasets validate``: one line per problem, starting with the case id."""
    _, items = cohort
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [items["good_a"], items[row.name]]}))
    problems = validate_datalist(datalist, label_map=LABEL_MAP)
    if row.validator is None:
        assert problems == [], [str(p) for p in problems]
        assert check_datalist(datalist, label_map=LABEL_MAP) == 2
        return
    assert problems and all(p.case_id == row.name for p in problems), [str(p) for p in problems]
    assert any(re.search(row.validator, p.problem) for p in problems), [str(p) for p in problems]
    assert all(str(p).startswith(f"{row.name}\t") for p in problems)
    with pytest.raises(ValueError, match=row.validator) as info:  # the same lines as one pre-flight error
        check_datalist(datalist, label_map=LABEL_MAP)
    assert row.name in str(info.value)


# ------------------------------------------------------------------------------------------ per-case rows: radiomics
def _bundle_loader(roi: int = 16):
    """The ROI loader ``configs/radiomics.json`` hands to extract_cohort (load, RAS, NaN check, box, rescale)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "radiomics.json")])
    parser.update({"roi_size": [roi, roi, roi]})
    return parser.get_parsed_content("radiomics_loader")


@pytest.fixture(scope="module", params=["files", "bundle"])
def radiomics_run(request, cohort, tmp_path_factory):
    """One non-strict extraction of the whole bad cohort, with the raw-file loader and with the bundle's ROI loader."""
    _, items = cohort
    out = tmp_path_factory.mktemp(f"radiomics_{request.param}") / "out"
    loader = _bundle_loader() if request.param == "bundle" else None
    result = extract_cohort(
        list(items.values()),
        out / "radiomics.csv",
        params_file=PARAMS,
        load_case=loader,
        cache_dir=out.parent / "cache",
        num_workers=1,
        progress=False,
    )
    with open(result.failures_path, newline="") as f:
        failures = {r["id"]: r for r in csv.DictReader(f)}
    return request.param, out, result, failures


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_case_radiomics_is_a_recorded_skip(row, radiomics_run):
    """One bad case never stops the cohort: it gets a row in ``<table>.failures.csv``, the others their features."""
    loader, out, result, failures = radiomics_run
    ids, columns, values, meta = read_feature_table(result.table_path)
    assert {"good_a", "good_b"} <= set(ids) and len(columns) == 107 and np.isfinite(values).all()
    assert set(ids).isdisjoint(failures), "a case is both in the table and in the failures report"
    _no_temp_files(out)
    if row.radiomics is None:
        assert row.name in ids and row.name not in failures
        if row.name == "lesion_touching_border" and loader == "files":
            assert meta["lesion_at_border"] == {row.name: "x-"}
        return
    assert row.name not in ids
    failure = failures[row.name]
    assert re.search(row.radiomics, failure["reason"]), failure
    assert "applying transform" not in failure["reason"] and " at 0x" not in failure["reason"]
    assert failure["file"] and Path(failure["file"].split(";")[0]).name.startswith(row.name)


@pytest.mark.parametrize("row", [r for r in ROWS if r.radiomics], ids=[r.name for r in ROWS if r.radiomics])
def test_bad_case_radiomics_strict_is_an_error(row, cohort, tmp_path):
    """``radiomics_strict``: the first bad case is an error naming it, and no table or failures file is written."""
    _, items = cohort
    out = tmp_path / "out" / "radiomics.csv"
    with pytest.raises(RadiomicsCaseError, match=row.radiomics) as info:
        extract_cohort([items[row.name]], out, params_file=PARAMS, num_workers=1, strict=True, progress=False)
    assert info.value.case_id == row.name and repr(row.name) in str(info.value)
    assert _files_in(out.parent) == []


# ------------------------------------------------------------------------------------------- per-case rows: training
def _train_workflow(bundle_root: Path, datalist: Path, **override):
    return train_workflow(bundle_root, datalist, **{"epochs": 1, "batch_size": 2, "knn_monitor": False, **override})


def _training_rows():
    for row in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=row.training_gap)] if row.training_gap else []
        yield pytest.param(row, id=row.name, marks=marks)


@pytest.mark.parametrize("row", list(_training_rows()))
def test_bad_case_training(row, cohort, tmp_path, caplog):
    """``monai.bundle run training`` on a cohort with the bad case: an error naming it before any checkpoint."""
    _, items = cohort
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [items["good_a"], items[row.name]]}))
    if row.training is None:  # the case is usable for pretraining: the bundle's preprocessing takes it
        from monai.bundle import ConfigParser
        from monai.transforms import Compose

        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "train.json"))
        parser.update({"roi_size": [28, 28, 28]})
        with caplog.at_level(logging.WARNING, logger="scripts.transforms"):
            d = Compose(parser.get_parsed_content("deterministic_transforms"))(load_datalist(datalist)[1])
        assert tuple(d["image"].shape) == (1, 28, 28, 28)
        if row.name == "lesion_touching_border":  # kept, but the user is told
            assert f"case {row.name!r}" in caplog.text and "touches the volume border (x-)" in caplog.text
        return
    wf = _train_workflow(tmp_path / "bundle", datalist)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    message = _chain(info.value)
    assert re.search(row.training, message), message
    assert row.name in message, f"the error does not name the case or its file:\n{message}"
    assert _files_in(tmp_path / "bundle" / "models") == []


def test_lesion_border_sides_names_the_faces():
    assert lesion_border_sides(_ellipsoid()) == []
    assert lesion_border_sides(_ellipsoid(centre=(1, 11.5, 22))) == ["x-", "z+"]
    assert lesion_border_sides(np.zeros(SHAPE)) == []


# ----------------------------------------------------------------------------------------------- duplicate case ids
def test_duplicate_case_ids(cohort, tmp_path):
    _, items = cohort
    dup = dict(items["good_b"], id="good_a")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [items["good_a"]], "testing": [dup]}))
    problems = validate_datalist(datalist)
    assert [(p.case_id, p.problem) for p in problems] == [("good_a", "duplicate case id (2 entries)")]
    with pytest.raises(ValueError, match=r"duplicate case ids 'good_a'; every case needs its own id"):
        load_sections(datalist, ("training", "testing"))  # inference, radiomics, supervised
    datalist.write_text(json.dumps({"training": [items["good_a"], dup]}))
    with pytest.raises(ValueError, match=r"section 'training': duplicate case ids 'good_a'"):
        load_datalist(datalist)  # training
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"duplicate case ids in the radiomics cohort: \['good_a'\]"):
        extract_cohort([items["good_a"], dup], out / "r.csv", params_file=PARAMS, progress=False)
    with pytest.raises(ValueError, match=r"duplicate case ids in feature table .*\['good_a'\]"):
        write_feature_table(out / "t.csv", ["good_a", "good_a"], ["f"], np.zeros((2, 1)))
    assert _files_in(out) == []


# ----------------------------------------------------------------------------------------------------- evaluation
def _tables(tmp: Path, labels: dict, X: np.ndarray, name: str = "ssl") -> str:
    path = tmp / f"{name}.csv"
    write_feature_table(path, list(labels), [f"f{i}" for i in range(X.shape[1])], X)
    return str(path)


def _evaluate(tmp: Path, tables: dict, labels: dict, **kw):
    from scripts.report import evaluate

    kw = {"n_folds": 3, "seeds": [0], "label_fractions": [1.0], "n_bootstrap": 10, "plots": False, **kw}
    return evaluate(tables, labels, tmp / "report", **kw)


def test_class_with_fewer_cases_than_folds(tmp_path):
    labels = {f"c{i:02d}": int(i < 2) for i in range(20)}  # class 1 has 2 cases, 3 folds
    table = _tables(tmp_path, labels, np.random.default_rng(0).normal(size=(20, 4)))
    with pytest.raises(ValueError, match=r"class 1 has 2 cases, fewer than n_folds=3"):
        _evaluate(tmp_path, {"ssl": table}, labels)
    assert _files_in(tmp_path / "report") == []


def test_label_not_in_label_map_evaluation(tmp_path):
    labels = {f"c{i:02d}": int(i % 3 == 0) for i in range(24)}
    labels.update({"c01": 7, "c02": 7, "c04": 7})  # enough 7s to pass the fold check: silently multiclass today
    table = _tables(tmp_path, labels, np.random.default_rng(0).normal(size=(24, 4)))
    with pytest.raises(ValueError, match=r"labels \['7'\] that are not in the label map \['0', '1'\].*c01"):
        _evaluate(tmp_path, {"ssl": table}, labels, label_names=LABEL_MAP)
    assert _files_in(tmp_path / "report") == []


def test_label_map_check_lists_the_cases():
    from scripts.evaluation import check_label_map

    check_label_map({"a": 0, "b": "1"}, LABEL_MAP)
    with pytest.raises(ValueError, match=r"1 case\(s\) have labels \['7'\] that are not in the label map.*: b"):
        check_label_map({"a": 0, "b": 7}, LABEL_MAP)


# --------------------------------------------------------------------------------------- balancing (RE/SE) and collapse
def test_se_k_larger_than_candidate_batch():
    from scripts.balance import balance_step

    emb = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"k=10.*batch has 6"):
        balance_step(emb, "se", k=10, m=4, seed=0)


def test_se_trained_batch_larger_than_candidate_batch_is_refused():
    from scripts.balance import balance_step
    from scripts.engine import BalanceSettings

    with pytest.raises(ValueError, match=r"SE needs m <= k\*q candidates, got m=12, k\*q=10"):
        BalanceSettings(mode="se", k=10, q=1, m=12)
    emb = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"m must be a positive even number <= N=6, got 8"):
        balance_step(emb, "se", k=3, m=8)


def test_se_candidate_batch_larger_than_cohort(tiny_cohort, tmp_path):
    wf = _train_workflow(tmp_path, tiny_cohort, **{"balance#mode": "se", "balance#k": 3, "balance#q": 10})
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    assert re.search(r"no batch.*12 cases < batch size 30", _chain(info.value)), _chain(info.value)


def test_collapsed_embeddings(tmp_path, caplog):
    """All-identical embeddings: RE/SE fall back (documented), the export warns, the evaluation refuses the table."""
    from ignite.engine import Engine

    from scripts.balance import balance_step
    from scripts.embed import EmbeddingWriter

    z = torch.ones(6, 8)
    se = balance_step(z, "se", k=3, m=4, seed=0)
    assert se.selection.fallback and se.cluster_sizes == [6]  # a seeded random batch instead of a balanced one
    assert torch.equal(balance_step(z, "re", k=3).weights, torch.ones(6))  # nothing to re-weight

    labels = {f"c{i:02d}": int(i % 4 == 0) for i in range(20)}
    out = tmp_path / "eval" / "ssl.csv"
    batches = [{"id": list(labels)[i : i + 5]} for i in range(0, 20, 5)]
    engine = Engine(lambda e, b: {"pred": torch.ones(len(b["id"]), 8)})
    EmbeddingWriter(str(out)).attach(engine)
    with caplog.at_level(logging.WARNING, logger="scripts.embed"):
        engine.run(batches)
    assert "all 20 embeddings written to" in caplog.text and "collapsed" in caplog.text
    with pytest.raises(ValueError, match=r"table .*ssl.csv gives all 20 labelled cases identical features"):
        _evaluate(tmp_path, {"ssl": str(out)}, labels)
    assert _files_in(tmp_path / "report") == []


# ------------------------------------------------------------------------------------------- training failures
def _subset(datalist: Path, n: int, out: Path) -> Path:
    """The first ``n`` training cases of ``datalist`` (absolute paths) as a new datalist: less to preprocess."""
    out.write_text(json.dumps({"training": load_datalist(datalist)[:n]}))
    return out


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_cohort, tmp_path):
    """Epoch 1 trains; the resumed run's preprocessing yields NaN: FloatingPointError, epoch-1 files untouched."""
    small = {"batch_size": 2, "steps_per_epoch": 2}
    cohort = _subset(tiny_cohort, 4, tmp_path / "datalist.json")
    wf = _train_workflow(tmp_path, cohort, **small)
    wf.initialize()
    wf.run()
    wf.finalize()
    models = tmp_path / "models"
    before = {f: (models / f).read_bytes() for f in _files_in(models)}
    assert set(before) == {"model.pt", "checkpoints/checkpoint_epoch=1.pt"}

    nan_step = {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * float('nan')"}
    intensity = [
        {"_target_": "scripts.transforms.RobustRescaled", "keys": "image", "ref_key": "nonzero"},
        nan_step,  # e.g. a window whose range is zero
    ]
    wf = _train_workflow(tmp_path, cohort, epochs=2, resume=True, intensity_transforms=intensity, **small)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    assert "FloatingPointError: non-finite loss at epoch 2 iteration 3" in _chain(info.value), _chain(info.value)
    assert {f: (models / f).read_bytes() for f in _files_in(models)} == before


def test_corrupt_checkpoint_is_detected(tmp_path):
    """A truncated checkpoint (a torn copy, a full disk under a non-atomic writer) stops resume with its name."""
    from ignite.engine import Engine

    from scripts.handlers import TrainingCheckpoint

    net = torch.nn.Linear(3, 2)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    good = ckpt_dir / "checkpoint_epoch=1.pt"
    torch.save({"network": net.state_dict()}, good)
    raw = good.read_bytes()
    (ckpt_dir / "checkpoint_epoch=2.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        RuntimeError, match=r"cannot resume: checkpoint .*checkpoint_epoch=2.pt is corrupt or unreadable"
    ):
        TrainingCheckpoint(str(ckpt_dir), {"network": net}, resume=True).attach(Engine(lambda e, b: None))


# ------------------------------------------------------------------------------------------- output directory and disk
def _unwritable(tmp: Path, how: str) -> Path:
    """A folder the job cannot write into: read-only permissions, or a path whose parent is a file."""
    if how == "read_only_dir":
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits; the 'path_under_a_file' variant covers this as root")
        folder = tmp / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    blocker = tmp / "not_a_dir"
    blocker.write_text("a file where a folder is expected")
    return blocker / "out"


@pytest.mark.parametrize("how", ["read_only_dir", "path_under_a_file"])
def test_output_directory_not_writable(how, cohort, tmp_path):
    """Fails before any work (radiomics, embeddings) or at the write (tables), naming the folder; writes nothing."""
    from ignite.engine import Engine

    from scripts.embed import EmbeddingWriter

    _, items = cohort
    out = _unwritable(tmp_path, how)
    with pytest.raises(OSError, match=r"radiomics output directory .*out is not writable"):
        extract_cohort([items["good_a"]], out / "r.csv", params_file=PARAMS, num_workers=1, progress=False)
    engine = Engine(lambda e, b: {"pred": torch.zeros(1, 4)})
    EmbeddingWriter(str(out / "ssl.csv")).attach(engine)
    with pytest.raises(OSError, match=r"embedding output directory .*out is not writable"):
        engine.run([{"id": ["a"]}])
    assert engine.state.iteration == 0  # nothing was embedded
    with pytest.raises(OSError, match=r"cannot write .*out/t.csv"):
        write_feature_table(out / "t.csv", ["a"], ["f"], np.zeros((1, 1)))
    assert not out.exists()


_DISK_FULL = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from scripts.io_utils import write_feature_table
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
    ids = [f"case{i:04d}" for i in range(400)]
    write_feature_table(sys.argv[1], ids, [f"f{j}" for j in range(50)], np.random.default_rng(0).normal(size=(400, 50)))
    """
)


def test_disk_full_while_writing_a_table(tmp_path):
    """A write that runs out of space (a file-size limit, as on a quota'd or full disk) leaves the old table intact."""
    table = tmp_path / "features.csv"
    write_feature_table(table, ["a", "b"], ["f0"], np.array([[1.0], [2.0]]), provenance={"run": "old"})
    before = read_feature_table(table)
    r = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(table), str(64 * 1024)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert r.returncode != 0
    assert f"OSError: [Errno 27] cannot write {table}: File too large; nothing was written there" in r.stderr, r.stderr
    after = read_feature_table(table)
    assert after[:2] == before[:2] and np.array_equal(after[2], before[2]) and after[3] == {"run": "old"}
    assert _files_in(tmp_path) == ["features.csv", "features.meta.json"]


# ---------------------------------------------------------------------------------------------------------- security
@functools.cache
def _torch_load_calls() -> list[tuple[str, int, bool]]:
    """(file, line, has weights_only=True) for every ``torch.load(`` call in the bundle's Python code."""
    import ast

    found = []
    for folder in ("scripts", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    safe = any(
                        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords
                    )
                    found.append((str(path.relative_to(ROOT)), node.lineno, safe))
    return found


def _torch_load_params():
    for f in sorted({f for f, _, _ in _torch_load_calls()}):
        yield pytest.param(f, id=f)


@pytest.mark.parametrize("path", list(_torch_load_params()))
def test_every_torch_load_uses_weights_only(path):
    unsafe = [line for f, line, safe in _torch_load_calls() if f == path and not safe]
    assert unsafe == [], f"{path}: torch.load without weights_only=True at lines {unsafe}"
    configs = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "configs").glob("*.json"))
    assert "torch.load" not in configs  # configs load checkpoints through MONAI's CheckpointLoader only


class _Payload:
    """A pickle that runs code when loaded: what a malicious checkpoint from the internet would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_malicious_checkpoint_is_refused_not_executed(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from scripts.handlers import TrainingCheckpoint

    marker = tmp_path / "executed.txt"
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    evil = ckpt_dir / "checkpoint_epoch=1.pt"
    torch.save({"network": _Payload(str(marker))}, evil)
    with pytest.raises(RuntimeError, match=r"cannot resume: checkpoint .* is corrupt or unreadable \(UnpicklingError"):
        TrainingCheckpoint(str(ckpt_dir), {"network": torch.nn.Linear(2, 2)}, resume=True).attach(
            Engine(lambda e, b: None)
        )
    with pytest.raises(pickle.UnpicklingError):  # configs/inference.json's loader for models/model.pt
        CheckpointLoader(load_path=str(evil), load_dict={"model": torch.nn.Linear(2, 2)})(Engine(lambda e, b: None))
    assert not marker.exists()


def test_datalist_is_data_never_evaluated(cohort, tmp_path):
    """Strings that look like MONAI config expressions ("$...", "@...", "%...") stay strings in every loader."""
    from monai.bundle import ConfigParser

    _, items = cohort
    marker = tmp_path / "executed.txt"
    payload = f"$__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"
    entry = dict(items["good_a"], id=payload, centre="@network_def", note="%configs/train.json#epochs")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [entry]}))
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"datalist": str(datalist), "cache_dir": str(tmp_path / "cache"), "bundle_root": str(tmp_path)})
    train_data = parser.get_parsed_content("train#data")
    labels = parser.get_parsed_content("train#trainer#balance#labels")
    assert train_data[0]["id"] == payload and train_data[0]["centre"] == "@network_def"
    assert list(labels) == [payload]
    assert not marker.exists()


def test_datalist_paths_resolve_against_the_datalist_and_stay_in_the_data_root(cohort, tmp_path, monkeypatch):
    _, items = cohort
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    img = Path(items["good_a"]["image"])
    (root / "img.nii.gz").write_bytes(img.read_bytes())
    (root / "seg.nii.gz").write_bytes(Path(items["good_a"]["mask"]).read_bytes())
    (root / "link.nii.gz").symlink_to(img)  # inside the root, pointing outside
    datalist = root / "sub" / "datalist.json"

    def write(image: str) -> Path:
        datalist.write_text(json.dumps({"training": [{"id": "c", "image": image, "mask": "../seg.nii.gz"}]}))
        return datalist

    monkeypatch.chdir(tmp_path)  # relative paths must not depend on where the command runs
    assert load_datalist(write("../img.nii.gz"), data_root=root)[0]["image"] == str(root / "img.nii.gz")
    for escape, shown in [("../../escape.nii.gz", "../../escape.nii.gz"), (str(img), str(img)), ("../link.nii.gz", "")]:
        with pytest.raises(
            ValueError, match=r"resolves to .*outside the configured data root " + re.escape(str(root))
        ) as info:
            load_datalist(write(escape), data_root=root)
        assert shown in str(info.value)
    from monai.bundle import ConfigParser  # what the training config does with data_root

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"datalist": str(write(str(img))), "data_root": str(root), "bundle_root": str(tmp_path)})
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#data")
    assert "outside the configured data root" in _chain(info.value)
