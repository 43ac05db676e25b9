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

from scripts.data.datalist import load_datalist, load_sections
from scripts.data.lesion_mask import lesion_border_sides
from scripts.data.validation import check_datalist, validate_datalist
from scripts.downstream.radiomics import RadiomicsCaseError, extract_cohort
from scripts.feature_table import read_feature_table, write_feature_table

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
    Row("label_not_in_label_map", lambda t, c: _case(t, c, image=_image(2), label=7), r"label 7 not in the label map", None, None),
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
    """``python -m scripts.data.build_cohort validate``: one line per problem, starting with the case id."""
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
        with caplog.at_level(logging.WARNING, logger="scripts.data.transforms"):
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
    # no checkpoint and no model.pt: only the run's record, its starting point and the writer lock it still holds
    before_any_step = {"run.json", "model_init.pt", "model_init.input.json", ".siam3d_writer.lock"}
    assert set(_files_in(tmp_path / "bundle" / "models")) <= {f"checkpoints/{f}" for f in before_any_step}


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
    from scripts.downstream.evaluation import evaluate
    from scripts.downstream.protocol import ProtocolSettings

    protocol = ProtocolSettings(n_folds=3, seeds=(0,), label_fractions=(1.0,), n_bootstrap=10)
    return evaluate(tables, labels, tmp / "report", **{"protocol": protocol, "plots": False, **kw})


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
    from scripts.downstream.feature_sets import check_label_map

    check_label_map({"a": 0, "b": "1"}, LABEL_MAP)
    with pytest.raises(ValueError, match=r"1 case\(s\) have labels \['7'\] that are not in the label map.*: b"):
        check_label_map({"a": 0, "b": 7}, LABEL_MAP)


# --------------------------------------------------------------------------------------- balancing (RE/SE) and collapse
def test_se_k_larger_than_candidate_batch():
    from scripts.pretrain.balance import balance_step

    emb = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"k=10.*batch has 6"):
        balance_step(emb, "se", k=10, m=4, seed=0)


def test_se_trained_batch_larger_than_candidate_batch_is_refused():
    from scripts.pretrain.balance import balance_step
    from scripts.pretrain.strategies import make_strategy

    with pytest.raises(ValueError, match=r"SE needs m <= k\*q candidates, got m=12, k\*q=10"):
        make_strategy(mode="se", k=10, q=1, m=12)
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

    from scripts.pretrain.balance import balance_step
    from scripts.pretrain.embed import EmbeddingWriter

    z = torch.ones(6, 8)
    se = balance_step(z, "se", k=3, m=4, seed=0)
    assert se.selection.fallback and se.cluster_sizes == [6]  # a seeded random batch instead of a balanced one
    assert torch.equal(balance_step(z, "re", k=3).weights, torch.ones(6))  # nothing to re-weight

    labels = {f"c{i:02d}": int(i % 4 == 0) for i in range(20)}
    out = tmp_path / "eval" / "ssl.csv"
    batches = [{"id": list(labels)[i : i + 5]} for i in range(0, 20, 5)]
    engine = Engine(lambda e, b: {"pred": torch.ones(len(b["id"]), 8)})
    EmbeddingWriter(str(out)).attach(engine)
    with caplog.at_level(logging.WARNING, logger="scripts.pretrain.embed"):
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
    """Epoch 1 trains; the resumed run's views are NaN (its augmentation: a change of the deterministic preprocessing
    would be refused as a run on another input): FloatingPointError, epoch-1 files untouched."""
    small = {"batch_size": 2, "steps_per_epoch": 2}
    cohort = _subset(tiny_cohort, 4, tmp_path / "datalist.json")
    wf = _train_workflow(tmp_path, cohort, **small)
    wf.initialize()
    wf.run()
    wf.finalize()
    models = tmp_path / "models"

    def outputs() -> dict[str, bytes]:  # the writer lock records its holder: it is no output
        return {f: (models / f).read_bytes() for f in _files_in(models) if not f.endswith(".siam3d_writer.lock")}

    before = outputs()
    assert set(before) == {
        "model.pt", "model.input.json", "checkpoints/checkpoint_epoch=1.pt", "checkpoints/model_init.pt",
        "checkpoints/model_init.input.json", "checkpoints/run.json",
    }  # fmt: skip

    nan_view = "$scripts.pretrain.augment.view_transforms('image', @roi_size, **@augmentation) + "
    nan_view += "[monai.transforms.Lambdad(keys='image', func=lambda x: x * float('nan'))]"  # e.g. a broken transform
    wf = _train_workflow(tmp_path, cohort, epochs=2, resume=True, view_1=nan_view, **small)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    assert "FloatingPointError: non-finite loss at epoch 2 iteration 3" in _chain(info.value), _chain(info.value)
    assert outputs() == before


def test_corrupt_checkpoint_is_detected(tmp_path):
    """A truncated checkpoint (a torn copy, a full disk under a non-atomic writer) stops resume with its name."""
    from ignite.engine import Engine

    from scripts.pretrain.handlers import TrainingCheckpoint

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

    from scripts.pretrain.embed import EmbeddingWriter

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
    from scripts.feature_table import write_feature_table
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

    from scripts.pretrain.handlers import TrainingCheckpoint

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
    labels = parser.get_parsed_content("balancing#labels")
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


# ============================================================================ issue 16: reliability, second round
def _extract(items, out: Path, **kw):
    kw = {"params_file": PARAMS, "num_workers": 1, "progress": False, **kw}
    return extract_cohort(list(items), out, **kw)


def _table(path: Path) -> dict[str, np.ndarray]:
    ids, _, values, _ = read_feature_table(path)
    return dict(zip(ids, values))


def _three_files(table: Path) -> dict[str, bytes]:
    """The table, its meta.json and its failures report: the unit a run writes."""
    from scripts.downstream.radiomics import failures_path_for
    from scripts.feature_table import meta_path

    return {p.name: p.read_bytes() for p in (table, meta_path(table), failures_path_for(table)) if p.exists()}


def _config(files: list[str], **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(override)
    return parser


@pytest.fixture(scope="module")
def good_pair(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("good_pair")
    return {"good_a": _case(tmp, "good_a"), "good_b": _case(tmp, "good_b", image=_image(1), label=1)}


# ----------------------------------------------------------------------------------- item 1: unlabelled cases
def test_unlabelled_cases_in_inference_and_the_training_monitor(tiny_cohort, tmp_path):
    """Labelled training + unlabelled testing, ``"label": null`` and a missing key: inference batches them together
    and the kNN monitor reads the labelled ones; training reaches its first checkpoint."""
    cases = load_datalist(tiny_cohort)[:6]
    for c in cases[2:4]:
        c["label"] = None
    del cases[4]["label"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({"training": cases, "testing": [dict(c, id=c["id"] + "_t", label=None) for c in cases[:3]]})
    )
    parser = _config(["inference.json"], datalist=str(datalist), cache_dir=str(tmp_path / "cache"), roi_size=[28] * 3,
                     num_workers=0, batch_size=4)  # fmt: skip
    batches = list(parser.get_parsed_content("dataloader"))
    assert sum(len(b["id"]) for b in batches) == 9 and all("label" not in b for b in batches)
    wf = _train_workflow(tmp_path / "bundle", datalist, knn_monitor=True, batch_size=2, steps_per_epoch=1)
    wf.initialize()
    wf.run()
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert labelled_ids_of(datalist) == {c["id"]: c["label"] for c in cases if c.get("label") is not None}


def labelled_ids_of(datalist: Path) -> dict:
    from scripts.data.datalist import labelled_ids

    return labelled_ids(datalist)


@pytest.mark.parametrize(
    "labels, problem",
    [
        (["0", 1], r"case 'c1': label is a number while 1 other case\(s\) .* have string labels \(e.g. 'c0'\)"),
        ([0, 1e30], r"case 'c1': label 1e\+30 is not a class label"),
        ([0, 0.5], r"case 'c1': label 0.5 is not a class label"),
        ([0, [1]], r"case 'c1': label \[1\] is a list"),
        ([0, True], r"case 'c1': label True is a bool"),
    ],
    ids=["mixed_string_number", "huge", "fraction", "list", "bool"],
)
def test_bad_labels_are_named_everywhere(labels, problem, good_pair, tmp_path):
    items = [dict(good_pair["good_a"], id=f"c{i}", label=v) for i, v in enumerate(labels)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items}))
    problems = validate_datalist(datalist)
    assert any(re.search(problem, f"case {p.case_id!r}: {p.problem}") for p in problems), [str(p) for p in problems]
    for load in (load_datalist, load_sections, labelled_ids_of):
        with pytest.raises(ValueError, match=problem):
            load(datalist)
    from scripts.data.datalist import read_labels

    with pytest.raises(ValueError, match=problem):
        read_labels(datalist)
    # label-free inference does not care: it drops labels
    assert len(load_sections(datalist, ("training",), labels="drop")) == 2


def test_integral_float_labels_are_integers(good_pair, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps({"training": [dict(good_pair["good_a"], label=1.0), dict(good_pair["good_b"], label=0)]})
    )
    assert [it["label"] for it in load_datalist(datalist)] == [1, 0]
    assert all(type(it["label"]) is int for it in load_datalist(datalist))


# ---------------------------------------------------------------------------- item 2: cache keyed by content
def test_preprocessing_cache_is_keyed_by_content(good_pair, tmp_path):
    """Rewrite a mask at the same path and rerun with the same cache: the new lesion is used, not the stale one."""
    item = dict(good_pair["good_a"])
    (tmp_path / "img.nii.gz").write_bytes(Path(item["image"]).read_bytes())
    item["image"] = str(tmp_path / "img.nii.gz")
    mask_path = tmp_path / "seg.nii.gz"
    _save(mask_path, _ellipsoid(centre=(8, 11.5, 11.5), radii=(4, 4, 4)))
    item["mask"] = str(mask_path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [item]}))

    def preprocessed():
        parser = _config(
            ["inference.json"], datalist=str(datalist), cache_dir=str(tmp_path / "cache"), roi_size=[16] * 3
        )
        return parser.get_parsed_content("dataset")[0]["mask"]

    first = preprocessed()
    _save(mask_path, _ellipsoid(centre=(15, 11.5, 11.5), radii=(2, 5, 5)))  # a corrected mask, same path
    second = preprocessed()
    assert int(first.sum()) != int(second.sum())
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert torch.equal(preprocessed(), second)  # and the new entry is reused
    assert len(list((tmp_path / "cache" / "file_digests").iterdir())) == 3  # image + two mask versions, hashed once


# --------------------------------------------------------------------------------- item 3: an 8-voxel lesion
def test_tiny_lesion_with_complex_shape_values_is_extracted(good_pair, tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:12, 10:12, 10:12] = 1
    tiny = _case(tmp_path, "tiny", mask=mask)
    res = _extract([good_pair["good_a"], tiny, good_pair["good_b"]], tmp_path / "out" / "r.csv")
    table = _table(res.table_path)
    assert set(table) == {"good_a", "tiny", "good_b"} and res.n_failed == 0
    assert np.isfinite(table["tiny"]).all()


def test_unexpected_error_in_one_case_is_its_failure(good_pair, tmp_path):
    from scripts.downstream import radiomics

    res = _extract([good_pair["good_a"], good_pair["good_b"]], tmp_path / "r.csv", load_case=_explodes_on_b)
    assert res.n_ok == 1 and res.failures[0].case_id == "good_b"
    assert "unexpected error: TypeError" in res.failures[0].reason
    assert radiomics.failures_path_for(res.table_path).is_file()


def _explodes_on_b(item):
    from scripts.downstream.radiomics import load_case_files

    image, mask, spacing = load_case_files(item)
    return image, mask, spacing, (5 if item["id"] == "good_b" else {})  # an info that is no dict: a bug


# --------------------------------------------------------------------------------- item 4: malformed datalists
MALFORMED = {
    "empty_object": ("{}", r"no cases in sections .* \(the file has no training/validation/testing section\)"),
    "json_list": ("[]", r"the top level is a JSON list, expected an object"),
    "validation_only": (
        None,
        r"no cases in sections \['training', 'testing'\] \(the file has validation \(1 cases\)\)",
    ),
    "section_not_a_list": ('{"training": {"id": "a"}}', r"section 'training' is a JSON dict, expected a list"),
    "invalid_json": ('{"training": [}', r"is not valid JSON: Expecting value at line 1 column 15"),
    "typo_section": ('{"train": []}', r"no cases .*other keys \['train'\]"),
    "item_not_object": ('{"training": ["a.nii.gz"]}', r"training\[0\] is a JSON str, not an object"),
    "image_wrong_type": ('{"training": [{"id": "a", "image": 3, "mask": "m.nii.gz"}]}', r"case 'a': 'image' is 3"),
    "lacks_mask": (
        '{"training": [{"id": "a", "image": "a.nii.gz"}]}',
        r"all 1 case\(s\) failed, no table written .*'a': datalist item has no 'mask' entry",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_datalist_is_an_error_and_keeps_the_earlier_table(name, good_pair, tmp_path):
    text, message = MALFORMED[name]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(text if text is not None else json.dumps({"validation": [good_pair["good_a"]]}))
    out = tmp_path / "eval" / "radiomics_features.csv"
    _extract(good_pair.values(), out)
    before = _three_files(out)
    parser = _config(["inference.json", "radiomics.json"], datalist=str(datalist), output_dir=str(tmp_path / "eval"),
                     radiomics_workers=1, radiomics_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("radiomics")
    chain = _chain(info.value)  # names the datalist, or the case when the document itself is fine
    assert re.search(message, chain) and (str(datalist) in chain or "'a'" in chain), chain
    assert _three_files(out) == before
    if name in ("empty_object", "json_list", "validation_only", "invalid_json", "section_not_a_list"):
        problems = validate_datalist(datalist, sections=("training", "testing"))
        assert len(problems) == 1 and re.search(message, problems[0].problem), [str(p) for p in problems]
        assert problems[0].file == str(datalist)


def test_utf8_bom_datalist_is_read(good_pair, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_bytes(b"\xef\xbb\xbf" + json.dumps({"training": list(good_pair.values())}).encode())
    assert [it["id"] for it in load_datalist(datalist)] == ["good_a", "good_b"]
    assert validate_datalist(datalist) == []


def test_only_some_sections_present(good_pair, tmp_path):
    """Issue 15 item 4: any subset of training / validation / testing; absent means empty."""
    from scripts.data.datalist import read_labels

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": list(good_pair.values())}))
    assert read_labels(datalist, ("training", "testing")) == ({"good_a": 0, "good_b": 1}, [])
    assert len(load_sections(datalist, ("training", "validation", "testing"))) == 2
    assert load_datalist(datalist, "testing", allow_empty=True) == []
    with pytest.raises(ValueError, match=r"no cases in section 'testing' \(the file has training \(2 cases\)\)"):
        load_datalist(datalist, "testing")


def test_empty_cohort_never_replaces_a_table(good_pair, tmp_path):
    out = tmp_path / "r.csv"
    _extract(good_pair.values(), out)
    before = _three_files(out)
    with pytest.raises(ValueError, match=r"no cases to extract"):
        _extract([], out)
    bad = dict(good_pair["good_a"], id="bad", mask=str(tmp_path / "missing.nii.gz"))
    with pytest.raises(RuntimeError, match=r"all 1 case\(s\) failed, no table written.*'bad': missing mask file"):
        _extract([bad], out)
    assert _three_files(out) == before


# ------------------------------------------------------------------------ item 5: the majority fixes the columns
def test_one_odd_channel_count_listed_first_fails_alone(good_pair, tmp_path):
    two = dict(
        good_pair["good_a"], id="two_channels", image=[good_pair["good_a"]["image"], good_pair["good_b"]["image"]]
    )
    third = dict(good_pair["good_b"], id="good_c")
    res = _extract([two, good_pair["good_a"], good_pair["good_b"], third], tmp_path / "r.csv")
    assert set(_table(res.table_path)) == {"good_a", "good_b", "good_c"}
    (failure,) = res.failures
    assert failure.case_id == "two_channels"
    assert re.search(r"214 feature columns where 3 other case\(s\) \(e.g. 'good_a'\) have 107", failure.reason)


# ----------------------------------------------------------------------------------- item 6: non-binary masks
def _halo(shape=SHAPE) -> np.ndarray:
    core = _ellipsoid(shape).astype(np.float32)
    halo = _ellipsoid(shape, radii=(11, 11, 11)).astype(np.float32) * 0.01
    return np.maximum(core, halo)


def test_soft_mask_halo_is_not_lesion(good_pair, tmp_path, caplog):
    soft = _case(tmp_path, "soft", mask=_halo())
    with caplog.at_level(logging.WARNING, logger="scripts.downstream.radiomics"):
        res = _extract([good_pair["good_a"], soft], tmp_path / "r.csv")
    table = _table(res.table_path)
    np.testing.assert_allclose(table["soft"], table["good_a"])  # same image, same core: the halo is not counted
    rule = read_feature_table(res.table_path)[3]["mask_rules"]["soft"]
    assert rule.startswith("soft mask thresholded at 0.5 (") and "mask rule applied: soft mask" in caplog.text
    for loader in (None, _bundle_loader()):  # training's box and the bundle's ROI see the same lesion
        d = _extract([soft], tmp_path / "b.csv", load_case=loader)
        assert d.n_ok == 1


def test_label_values_are_merged_and_recorded(good_pair, tmp_path):
    mask = _ellipsoid().astype(np.uint8) * 2
    mask[_ellipsoid(radii=(3, 3, 3)).astype(bool)] = 4
    mask[_ellipsoid(radii=(1, 1, 1)).astype(bool)] = 1
    brats = _case(tmp_path, "brats", mask=mask)
    res = _extract([good_pair["good_a"], brats], tmp_path / "r.csv")
    table, meta = _table(res.table_path), read_feature_table(res.table_path)[3]
    np.testing.assert_allclose(table["brats"], table["good_a"])  # whole tumour = the same ellipsoid
    assert meta["mask_rules"] == {"brats": "labels [1, 2, 4] merged (nonzero = lesion)"}


@pytest.mark.parametrize(
    "name, mask, message",
    [
        ("negative", lambda: _ellipsoid().astype(np.int16) - (_ellipsoid() == 0).astype(np.int16), r"mask has negative values \(min -1\)"),
        ("not_a_probability", lambda: _ellipsoid() * 2.5, r"neither integer labels nor probabilities in \[0, 1\] \(range 0 .. 2.5\)"),
        ("whole_volume", lambda: np.ones(SHAPE, np.uint8), r"mask covers the whole volume"),
    ],
    ids=["negative", "not_a_probability", "whole_volume"],
)  # fmt: skip
def test_unusable_mask_values_are_named_everywhere(name, mask, message, good_pair, tmp_path):
    bad = _case(tmp_path, name, mask=mask())
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [good_pair["good_a"], bad]}))
    problems = validate_datalist(datalist)
    assert [p.case_id for p in problems] == [name] and re.search(message, problems[0].problem), problems
    for loader in (None, _bundle_loader()):
        res = _extract([good_pair["good_a"], bad], tmp_path / "r.csv", load_case=loader)
        assert set(_table(res.table_path)) == {"good_a"} and re.search(message, res.failures[0].reason)
    from monai.transforms import Compose

    parser = _config(["train.json"], roi_size=[16] * 3)
    with pytest.raises(Exception) as info:
        Compose(parser.get_parsed_content("deterministic_transforms"))(load_datalist(datalist)[1])
    assert re.search(message, _chain(info.value)) and f"case {name!r}" in _chain(info.value)


# --------------------------------------------------------------------------- item 7: border flag in extracting
def test_border_flag_survives_the_box_padding(cohort, tmp_path):
    _, items = cohort
    res = _extract([items["good_a"], items["lesion_touching_border"]], tmp_path / "r.csv", load_case=_bundle_loader())
    assert read_feature_table(res.table_path)[3]["lesion_at_border"] == {"lesion_touching_border": "x-"}


# ------------------------------------------------------------------------------- item 8: multi-focal masks
def test_multifocal_mask_box_on_the_largest_lesion(good_pair, tmp_path, caplog):
    """Two distant lesions: the box is centred on the larger one (it used to sit between them, holding neither);
    the voxels of the other that the box cuts off are reported; raw-file radiomics describes both, as pyradiomics
    reads one label, and records it."""
    shape = (40, 24, 24)
    big = _ellipsoid(shape, centre=(6, 11.5, 11.5), radii=(4, 4, 4))
    small = _ellipsoid(shape, centre=(33, 11.5, 11.5), radii=(3, 3, 3))
    two = _case(tmp_path, "two_lesions", image=_image(shape=shape), mask=big | small)
    one = _case(tmp_path, "big_only", image=_image(shape=shape), mask=big)
    res = _extract([two, one], tmp_path / "r.csv")
    meta = read_feature_table(res.table_path)[3]
    n_big, n_small = int(big.sum()), int(small.sum())
    assert meta["mask_rules"] == {"two_lesions": f"2 components ({n_big} + {n_small} voxels), described together"}
    from monai.transforms import Compose

    parser = _config(["train.json"], roi_size=[12] * 3)
    with caplog.at_level(logging.WARNING, logger="scripts.data.transforms"):
        d = Compose(parser.get_parsed_content("load_transforms") + parser.get_parsed_content("roi_transforms"))(
            load_datalist(_datalist_of(tmp_path, [two]))[0]
        )
    assert d["mask_box"]["centroid"] == pytest.approx([6, 11.5, 11.5], abs=0.01)  # on the big lesion, not between
    assert int(d["mask"].sum()) == n_big  # the whole big lesion is in the box; the small one is outside it
    assert d["mask_box"]["mask_rule"].endswith(
        f"parts too far apart for one box, box centred on the largest ({n_big} voxels), {n_small} lesion voxels outside it"
    )
    assert "case 'two_lesions'" in caplog.text and f"{n_small} lesion voxels outside it" in caplog.text
    roi = _table(_extract([two, one], tmp_path / "roi.csv", load_case=_bundle_loader(roi=12)).table_path)
    np.testing.assert_allclose(roi["two_lesions"], roi["big_only"])  # the ROI describes the lesion the box holds


def _datalist_of(tmp: Path, items: list[dict]) -> Path:
    path = tmp / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path


# --------------------------------------------------------------------------- item 9: geometry judged physically
def test_equivalent_orientation_is_the_same_grid_everywhere(good_pair, tmp_path):
    """The mask stored LPS (x and y flipped, origin moved to the far corner) lies on the same physical voxels."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]
    ref = good_pair["good_a"]
    mask = nib.load(ref["mask"]).get_fdata()[::-1, ::-1, :].astype(np.uint8)
    lps = dict(ref, id="lps", mask=_save(tmp_path / "lps_seg.nii.gz", mask, flip))
    swapped = dict(
        ref,
        id="swapped",
        mask=_save(
            tmp_path / "sw_seg.nii.gz",
            np.transpose(nib.load(ref["mask"]).get_fdata(), (1, 0, 2)).astype(np.uint8),
            np.eye(4)[[1, 0, 2, 3]],
        ),
    )
    assert validate_datalist(_datalist_of(tmp_path, [ref, lps, swapped])) == []
    for loader in (None, _bundle_loader()):
        table = _table(_extract([ref, lps, swapped], tmp_path / "r.csv", load_case=loader).table_path)
        np.testing.assert_allclose(table["lps"], table["good_a"])
        np.testing.assert_allclose(table["swapped"], table["good_a"])
    from scripts.data.cohorts.common import _validate

    kept = _validate([ref, lps, swapped], excluded := [], lambda s: None)
    assert [it["id"] for it in kept] == ["good_a", "lps", "swapped"] and excluded == []


# ------------------------------------------------------------------- item 11: concurrent extractions, one folder
_EXTRACT = textwrap.dedent(
    """
    import json, sys
    from scripts.downstream.radiomics import extract_cohort
    items = json.loads(open(sys.argv[1], encoding="utf-8").read())
    for _ in range(int(sys.argv[3])):
        extract_cohort(items, sys.argv[2], params_file=sys.argv[4], num_workers=1, progress=False)
    """
)


def test_concurrent_extractions_leave_table_meta_and_failures_of_one_run(cohort, tmp_path):
    """Two runs with different cohorts write into one folder at once, several times: the table, its meta.json
    and its failures report always come from the same run (without the lock this fails about one time in three)."""
    from scripts.downstream.radiomics import failures_path_for
    from scripts.feature_table import meta_path

    _, items = cohort
    cohorts = {
        "a": [items["good_a"], items["missing_file"]],
        "b": [items["good_b"], items["empty_mask"], items["one_voxel_mask"]],
    }
    out = tmp_path / "out" / "r.csv"
    procs = []
    for name, cases in cohorts.items():
        spec = tmp_path / f"{name}.json"
        spec.write_text(json.dumps(cases))
        procs.append(subprocess.Popen([sys.executable, "-c", _EXTRACT, str(spec), str(out), "6", str(PARAMS)], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    ids = read_feature_table(out)[0]
    meta = json.loads(meta_path(out).read_text(encoding="utf-8"))
    with open(failures_path_for(out), newline="", encoding="utf-8") as f:
        failed = [r["id"] for r in csv.DictReader(f)]
    run = "a" if ids == ["good_a"] else "b"
    assert ids == [cohorts[run][0]["id"]] and failed == [c["id"] for c in cohorts[run][1:]]
    assert meta["n_ok"] == len(ids) and meta["n_failed"] == len(failed) and meta["n_cases"] == len(cohorts[run])
    _no_temp_files(out.parent)


# --------------------------------------------------------------------------------- item 12: kill -9 and workers
_SLOW_RUN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[4])
    from reliability_helpers import SlowLoader
    from scripts.downstream.radiomics import extract_cohort
    items = json.loads(open(sys.argv[1], encoding="utf-8").read())
    extract_cohort(items, sys.argv[2], params_file=sys.argv[3], num_workers=2, load_case=SlowLoader(sys.argv[5]), progress=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_extraction_ends_its_workers(cohort, tmp_path):
    """kill -9 of the extraction: its worker processes (busy on a long case) are gone within seconds."""
    import signal
    import time

    _, items = cohort
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "reliability_helpers.py").write_text(textwrap.dedent(
        """
        import os, time
        from pathlib import Path
        class SlowLoader:
            def __init__(self, folder):
                self.folder = folder
            def __call__(self, item):
                Path(self.folder, str(os.getpid())).write_text("busy")
                time.sleep(120)
        """
    ))  # fmt: skip
    spec = tmp_path / "items.json"
    spec.write_text(json.dumps([items["good_a"], items["good_b"]]))
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(spec), str(tmp_path / "r.csv"), str(PARAMS), str(helpers), str(pids_dir)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{helpers}"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(pids_dir.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids_dir.iterdir()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "radiomics workers outlived the killed extraction"
    finally:
        proc.kill()
        for w in [int(p.name) for p in pids_dir.iterdir()]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert not (tmp_path / "r.csv").exists()


# -------------------------------------------------------------- item 13: long table name, constant image
def test_too_long_table_name_fails_before_extraction(good_pair, tmp_path):
    out = tmp_path / ("r" * 240 + ".csv")
    with pytest.raises(ValueError, match=r"is 244 characters: .* exceeds the file system's 255-byte limit"):
        _extract(good_pair.values(), out, cache_dir=tmp_path / "cache")
    assert _files_in(tmp_path) == []  # nothing extracted, not even into the cache


def test_constant_image_is_flagged(good_pair, tmp_path, caplog):
    flat = _case(tmp_path, "flat", image=np.full(SHAPE, 100, np.float32))
    with caplog.at_level(logging.WARNING):
        res = _extract([good_pair["good_a"], flat], tmp_path / "r.csv")
    assert read_feature_table(res.table_path)[3]["constant_image_channels"] == {"flat": ["0"]}
    assert "'flat': image channel(s) ['0'] constant inside the lesion" in caplog.text
    from monai.transforms import Compose

    parser = _config(["train.json"], roi_size=[16] * 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.data.transforms"):
        Compose(parser.get_parsed_content("deterministic_transforms"))(dict(flat))
    assert "case 'flat'" in caplog.text and "is constant" in caplog.text


# ---------------------------------------------------------------------------------------- property-based test
_PSHAPE = (16, 16, 16)
_PCASES = ("p0", "p1", "p2")
# mutations of one case: (name, what it does to the entry or its files); and of the whole document
_CASE_MUTATIONS = (
    "drop_id", "drop_image", "drop_mask", "drop_label", "label_null", "label_string", "label_list", "label_huge",
    "image_int", "mask_empty_list", "id_dict", "missing_file", "truncated_image", "garbage_mask", "empty_mask",
    "negative_mask", "soft_mask", "whole_volume_mask", "two_lesions", "one_voxel", "labels_2_4", "move_to_testing",
    "move_to_validation",
)  # fmt: skip
_DOC_MUTATIONS = ("json_list", "empty_object", "invalid_json", "bom", "reverse_order", "none")


def _pcase(folder: Path, cid: str, seed: int, mask=None) -> dict:
    img = np.clip(np.random.default_rng(seed).normal(120, 40, _PSHAPE), 0, 255).astype(np.float32)
    mask = _ellipsoid(_PSHAPE, radii=(4, 3, 3)) if mask is None else mask
    return {
        "id": cid,
        "image": _save(folder / f"{cid}_img.nii.gz", img),
        "mask": _save(folder / f"{cid}_seg.nii.gz", mask),
        "label": seed % 2,
    }


def _mutate_case(doc: dict, index: int, how: str, folder: Path) -> None:
    entry = doc["training"][index]
    small = _ellipsoid(_PSHAPE, radii=(2, 2, 2))
    masks = {
        "empty_mask": np.zeros(_PSHAPE, np.uint8),
        "negative_mask": small.astype(np.int16) - 1,
        "soft_mask": np.maximum(small.astype(np.float32), 0.01),
        "whole_volume_mask": np.ones(_PSHAPE, np.uint8),
        "two_lesions": _ellipsoid(_PSHAPE, centre=(3, 7.5, 7.5), radii=(2, 2, 2))
        | _ellipsoid(_PSHAPE, centre=(12, 7.5, 7.5), radii=(2, 2, 2)),
        "one_voxel": (np.arange(np.prod(_PSHAPE)).reshape(_PSHAPE) == 2000).astype(np.uint8),
        "labels_2_4": small * 2 + _ellipsoid(_PSHAPE, radii=(1, 1, 1)) * 2,
    }
    if how.startswith("drop_"):
        entry.pop(how[5:], None)
    elif how.startswith("label_"):
        entry["label"] = {"null": None, "string": "1", "list": [1], "huge": 1e30}[how[6:]]
    elif how == "image_int":
        entry["image"] = 3
    elif how == "mask_empty_list":
        entry["mask"] = []
    elif how == "id_dict":
        entry["id"] = {"x": 1}
    elif how.startswith("move_to_"):
        doc.setdefault(how[8:], []).append(doc["training"].pop(index))
    else:
        new = folder / f"mut_{entry['id']}_{how}.nii.gz"
        if how == "missing_file":
            entry["image"] = str(new)
        elif how == "truncated_image":
            raw = Path(entry["image"]).read_bytes()
            new.write_bytes(raw[: len(raw) // 2])
            entry["image"] = str(new)
        elif how == "garbage_mask":
            new.write_bytes(b"\x00not a nifti" * 10)
            entry["mask"] = str(new)
        else:
            entry["mask"] = _save(new, masks[how])


def test_property_any_mutation_succeeds_unchanged_or_stops_naming_the_case(tmp_path_factory):
    """Mutate a small valid datalist and its files (drop keys, wrong types, moved sections, corrupt files, odd
    masks, a broken document): every run either succeeds with the untouched cases' features unchanged and every
    case in the table or in the failures report, or stops with an error naming the case (or the datalist); the
    earlier table, meta.json and failures report are never torn or emptied."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = tmp_path_factory.mktemp("prop_base")
    good = [_pcase(base, cid, seed) for seed, cid in enumerate(_PCASES)]
    cache = base / "cache"
    reference = _table(_extract(good, base / "ref.csv", cache_dir=cache).table_path)
    assert set(reference) == set(_PCASES)
    counter = iter(range(10**6))

    @settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(
        mutations=st.lists(
            st.tuples(st.integers(0, len(_PCASES) - 1), st.sampled_from(_CASE_MUTATIONS)), max_size=2, unique_by=lambda m: m[0]
        ),
        doc_mutation=st.sampled_from(_DOC_MUTATIONS),
    )  # fmt: skip
    def run(mutations, doc_mutation):
        folder = base / f"ex{next(counter)}"
        folder.mkdir()
        doc = {"training": [dict(c) for c in good]}
        touched = set()
        for index, how in sorted(mutations, key=lambda m: -m[0]):  # from the end: "move" pops keep indices valid
            touched.add(_PCASES[index])
            _mutate_case(doc, index, how, folder)
        if doc_mutation == "reverse_order":
            doc["training"].reverse()
        datalist = folder / "datalist.json"
        text = json.dumps(doc)
        text = {"json_list": json.dumps(list(doc.values())), "empty_object": "{}", "invalid_json": text[:-3]}.get(
            doc_mutation, text
        )
        datalist.write_bytes((b"\xef\xbb\xbf" if doc_mutation == "bom" else b"") + text.encode())
        out = folder / "out" / "radiomics.csv"
        out.parent.mkdir()
        for name, data in _three_files(base / "ref.csv").items():
            (out.parent / name.replace("ref", "radiomics")).write_bytes(data)
        before = _three_files(out)
        try:
            items = load_sections(datalist, ("training", "validation", "testing"), labels="drop")
            result = _extract(items, out, cache_dir=cache)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            message = _chain(e)
            named = [c for c in touched if repr(c) in message or f"{c}_" in message]
            positions = re.findall(r"\w+\[\d+\]", message)
            assert named or positions or str(datalist) in message, (mutations, doc_mutation, message)
            assert _three_files(out) == before, "a failed run changed the earlier outputs"
            return
        table = _table(result.table_path)
        ids, _, _, meta = read_feature_table(result.table_path)
        failed = [f.case_id for f in result.failures]
        assert sorted(ids + failed) == sorted(it["id"] for it in items), "a case was lost"
        assert meta["n_ok"] == len(ids) and meta["n_failed"] == len(failed)
        for cid in set(_PCASES) - touched:
            np.testing.assert_array_equal(table[cid], reference[cid], err_msg=f"untouched case {cid} changed")
        for failure in result.failures:
            assert failure.reason and failure.case_id in {it["id"] for it in items}
        _no_temp_files(out.parent)

    run()
