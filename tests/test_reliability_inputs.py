"""Reliability, third round (issue 29): bad inputs, geometry and command lines, on real files written here.

Each test writes the bad input as real NIfTI/NRRD files and checks every entry point a user meets with it: the
validator (``python -m scripts.data.build_cohort validate``), radiomics with both loaders (raw files and the bundle's
ROI loader), and the bundle's preprocessing as training and inference run it. Each must name the case, the file and
the problem in the same words, and the other cases must be processed (radiomics) or nothing written (training).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.datalist import load_datalist
from scripts.data.validation import validate_datalist
from scripts.downstream.radiomics import RadiomicsCaseError, extract_cohort
from scripts.feature_table import meta_path, read_feature_table

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "configs" / "radiomics_params.yaml"
SHAPE = (24, 24, 24)


# ----------------------------------------------------------------------------------------------- writing real cases
def _image(seed: int = 0, shape=SHAPE, dtype=np.float32) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(120, 40, shape), 0, 255).astype(dtype)


def _ellipsoid(shape=SHAPE, centre=None, radii=(6, 5, 5), spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A solid ellipsoid of ``radii`` in mm on a grid of ``spacing`` mm, centred in the volume by default."""
    centre = [(n - 1) / 2 for n in shape] if centre is None else centre
    grid = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return (sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else np.asarray(affine)), str(path))
    return str(path)


def _case(tmp: Path, case_id: str, image=None, mask=None, affine=None, label=0) -> dict:
    return {
        "id": case_id,
        "image": _save(tmp / f"{case_id}_img.nii.gz", _image() if image is None else image, affine),
        "mask": _save(tmp / f"{case_id}_seg.nii.gz", _ellipsoid() if mask is None else mask, affine),
        "label": label,
    }


def _datalist(tmp: Path, items: list[dict], name: str = "datalist.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps({"training": items}))
    return path


def _chain(exc: BaseException) -> str:
    """Every message of an exception chain, as the user reads it in the traceback (MONAI wraps errors twice)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _config(files: list[str], **override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser.update(override)
    return parser


def _bundle_loader(roi: int = 16, **override):
    """The ROI loader ``configs/radiomics.json`` hands to extract_cohort (load, RAS, NaN check, box, rescale)."""
    return _config(["inference.json", "radiomics.json"], roi_size=[roi] * 3, **override).get_parsed_content(
        "radiomics_loader"
    )


def _extract(items, out: Path, **kw):
    kw = {"params_file": PARAMS, "num_workers": 1, "progress": False, **kw}
    return extract_cohort(list(items), out, **kw)


def _preprocess(item: dict, roi: int = 16, **override) -> dict:
    """Training's deterministic preprocessing of one datalist item (what the trainer's dataset runs)."""
    from monai.transforms import Compose

    parser = _config(["train.json"], roi_size=[roi] * 3, **override)
    return Compose(parser.get_parsed_content("deterministic_transforms"))(dict(item))


def _three_files(table: Path) -> dict[str, bytes]:
    from scripts.feature_table import failures_path

    return {p.name: p.read_bytes() for p in (table, meta_path(table), failures_path(table)) if p.exists()}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    return _case(tmp_path_factory.mktemp("good"), "good")


def _everywhere(tmp: Path, good: dict, bad: dict, message: str, *, file: str | None = None) -> None:
    """The validator, radiomics with both loaders and training's preprocessing all refuse ``bad`` with ``message``,
    naming its id (and ``file`` where given); ``good`` beside it is validated clean and extracted."""
    problems = validate_datalist(_datalist(tmp, [good, bad]))
    assert problems and {p.case_id for p in problems} == {bad["id"]}, [str(p) for p in problems]
    assert any(re.search(message, p.problem) for p in problems), [str(p) for p in problems]
    if file is not None:
        assert any(p.file == file for p in problems), [str(p) for p in problems]
    for loader in (None, _bundle_loader()):
        res = _extract([good, bad], tmp / "r.csv", load_case=loader)
        assert read_feature_table(res.table_path)[0] == [good["id"]]
        (failure,) = res.failures
        assert failure.case_id == bad["id"] and re.search(message, failure.reason), failure
        assert " at 0x" not in failure.reason and "applying transform" not in failure.reason
    with pytest.raises(Exception) as info:
        _preprocess(load_datalist(_datalist(tmp, [bad], "one.json"))[0])
    chain = _chain(info.value)
    assert re.search(message, chain) and f"case {bad['id']!r}" in chain, chain


# ------------------------------------------------------------------------------------------- 1 and 4: 4D volumes
def test_4d_mask_is_refused_everywhere(good, tmp_path):
    """A mask of shape (X, Y, Z, 2): the validator refused it, extraction merged its two volumes into one lesion."""
    two = np.stack([_ellipsoid(), _ellipsoid(radii=(3, 3, 3))], axis=-1)
    bad = _case(tmp_path, "mask_4d", mask=two)
    _everywhere(tmp_path, good, bad, r"expected a 3D volume, got 4D with shape \(24, 24, 24, 2\): one file must hold")


def test_all_4d_images_fail_named_instead_of_214_channel_columns(good, tmp_path):
    """An all-4D cohort gave 214 ``c0_``/``c1_`` columns with no warning: now every case is named, no table."""
    cases = [_case(tmp_path, f"img4d_{i}", image=np.stack([_image(i), _image(i + 5)], axis=-1)) for i in range(2)]
    table = tmp_path / "r.csv"
    for loader in (None, _bundle_loader()):
        with pytest.raises(RuntimeError, match=r"all 2 case\(s\) failed.*'img4d_0': .*got 4D") as info:
            _extract(cases, table, load_case=loader)
        assert "'img4d_1'" in str(info.value)
        assert not table.exists()
    _everywhere(tmp_path, good, cases[0], r"got 4D with shape \(24, 24, 24, 2\)", file=cases[0]["image"])


def test_one_4d_image_among_3d_names_the_case_not_a_stack_error(good, tmp_path):
    """Inference batches cases: the 4D one used to fail as "stack expects each tensor to be equal size"."""
    odd = _case(tmp_path, "odd_4d", image=np.stack([_image(1), _image(2)], axis=-1))
    datalist = _datalist(tmp_path, [good, odd, dict(good, id="good_2")])
    parser = _config(["inference.json"], datalist=str(datalist), cache_dir=str(tmp_path / "cache"), roi_size=[16] * 3,
                     num_workers=0, batch_size=3)  # fmt: skip
    with pytest.raises(Exception) as info:
        list(parser.get_parsed_content("dataloader"))
    chain = _chain(info.value)
    assert "case 'odd_4d'" in chain and odd["image"] in chain and "got 4D" in chain, chain
    assert "stack expects" not in chain


# -------------------------------------------------------------------------------------- 2: an image as the mask
def test_intensity_image_given_as_mask_is_not_a_label_mask(good, tmp_path):
    bad = _case(tmp_path, "image_as_mask", mask=_image(3, dtype=np.int16))
    _everywhere(
        tmp_path, good, bad, r"mask has \d+ distinct nonzero values .*not a label mask \(an intensity image given as"
    )


def test_brats_labels_are_still_a_label_mask(good, tmp_path):
    mask = _ellipsoid() * 2
    mask[_ellipsoid(radii=(3, 3, 3)).astype(bool)] = 4
    assert validate_datalist(_datalist(tmp_path, [good, _case(tmp_path, "brats", mask=mask)])) == []


# ----------------------------------------------------------------------------- 3: one lesion listed under two ids
def test_two_cases_with_the_same_files_are_named_together(good, tmp_path):
    """Same paths with another label, and a byte-identical copy at another path: both leak across folds."""
    same_paths = dict(good, id="again", label=1)
    copy = {"id": "copy", "label": 0}
    for key in ("image", "mask"):
        copy[key] = str(tmp_path / Path(good[key]).name)
        Path(copy[key]).write_bytes(Path(good[key]).read_bytes())
    other = _case(tmp_path, "other", image=_image(7))
    problems = validate_datalist(_datalist(tmp_path, [good, same_paths, copy, other]))
    text = [str(p) for p in problems]
    by_case = {p.case_id: p.problem for p in problems if "same paths" in p.problem}
    assert set(by_case) == {"good", "again"}, text
    assert "case(s) 'again'" in by_case["good"] and "with different labels" in by_case["good"], text
    content = {p.case_id: p.problem for p in problems if "identical content" in p.problem}
    assert set(content) == {"good", "again", "copy"} and "'again', 'good'" in content["copy"], text
    assert all("leak" in p.problem for p in problems) and "other" not in {p.case_id for p in problems}


# ------------------------------------------------------------------------------- 5: a faint soft mask, all 0.4
def test_soft_mask_below_threshold_says_the_threshold_and_the_nonzero_voxels(good, tmp_path):
    soft = _ellipsoid().astype(np.float32) * 0.4
    n = int(np.count_nonzero(soft))
    bad = _case(tmp_path, "faint", mask=soft)
    _everywhere(tmp_path, good, bad, rf"{n} voxel\(s\) are nonzero, but all are below the soft-mask threshold 0.5")


# ---------------------------------------------------------------------------- 6: float64 beyond float32's range
def test_float64_values_beyond_float32_are_named_as_overflow(good, tmp_path):
    image = _image().astype(np.float64)
    image[:2, :2, :2] = 1e300
    bad = _case(tmp_path, "huge", image=image)
    _everywhere(tmp_path, good, bad, r"8 voxel value\(s\) overflow float32 \(max \|value\| 1e\+300 > 3.4e\+38\)")


# ------------------------------------------------------------------------------------ 7: a 300-byte file name
def test_file_name_too_long_is_the_case_error_not_a_crash(good, tmp_path, capsys):
    from scripts.data import build_cohort

    bad = dict(good, id="long_name", image=str(tmp_path / ("x" * 293 + ".nii.gz")))
    datalist = _datalist(tmp_path, [good, bad])
    problems = validate_datalist(datalist)
    assert [(p.case_id, p.file) for p in problems] == [("long_name", bad["image"])]
    assert re.match(r"file name too long \(300 bytes; the file system allows 255 per name", problems[0].problem)
    with pytest.raises(SystemExit) as info:
        build_cohort.validate(str(datalist))
    assert info.value.code == 1 and "long_name\t" in capsys.readouterr().out
    for loader in (None, _bundle_loader()):
        res = _extract([bad, good], tmp_path / "r.csv", load_case=loader, cache_dir=tmp_path / "cache")
        assert read_feature_table(res.table_path)[0] == ["good"]
        assert res.failures[0].case_id == "long_name" and "image file name too long" in res.failures[0].reason
    with pytest.raises(Exception) as info:
        _preprocess(bad)
    assert "case 'long_name'" in _chain(info.value) and "file name too long" in _chain(info.value)


# ------------------------------------------------------------------------------- 8: a DICOM folder as the image
def test_dicom_folder_as_image_says_convert_it(good, tmp_path):
    folder = tmp_path / "CT_series"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i:04d}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    bad = dict(good, id="dicom", image=str(folder))
    message = r"is a folder \(a DICOM series\?\): convert it with `python -m scripts.data.build_cohort nsclc`"
    _everywhere(tmp_path, good, bad, message, file=str(folder))
    datalist = _datalist(tmp_path, [good, bad])  # inference: the cache key hashed the folder (IsADirectoryError)
    parser = _config(["inference.json"], datalist=str(datalist), cache_dir=str(tmp_path / "cache"), roi_size=[16] * 3,
                     num_workers=0, batch_size=2)  # fmt: skip
    with pytest.raises(Exception) as info:
        list(parser.get_parsed_content("dataloader"))
    assert "case 'dicom'" in _chain(info.value) and re.search(message, _chain(info.value)), _chain(info.value)


# -------------------------------------------------------------------------- 9: an sform with a zero column
def _zero_column_sform(path: Path, arr: np.ndarray) -> str:
    """A NIfTI whose sform (code 2, qform unset) has a zero third column: nibabel refuses to write one, so the
    header's srow_z[2] is patched in the file, as a broken converter leaves it."""
    img = nib.Nifti1Image(np.asarray(arr), np.eye(4))
    img.header.set_qform(None, code=0)
    raw = bytearray(img.to_bytes())
    assert struct.unpack("<f", raw[320:324]) == (1.0,)  # srow_z[2]
    raw[320:324] = struct.pack("<f", 0.0)
    path.write_bytes(bytes(raw))
    assert nib.load(str(path)).affine[2, 2] == 0
    return str(path)


def test_degenerate_affine_is_refused_naming_case_and_file(good, tmp_path):
    bad = {
        "id": "flat_sform",
        "image": _zero_column_sform(tmp_path / "flat_img.nii", _image()),
        "mask": _zero_column_sform(tmp_path / "flat_seg.nii", _ellipsoid()),
    }
    _everywhere(tmp_path, good, bad, r"degenerate affine: voxel axis z has length 0 \(a zero column", file=bad["image"])


# --------------------------------------------------------------------------------- 13: radiomics_path a folder
def test_radiomics_path_an_existing_folder_is_refused_before_the_first_case(good, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"radiomics output .*eval is an existing folder: radiomics_path must name"):
        _extract([good], out, cache_dir=cache)
    assert list(out.iterdir()) == [] and not cache.exists()  # no case extracted, no sidecar
    parser = _config(["inference.json", "radiomics.json"], datalist=str(_datalist(tmp_path, [good])),
                     radiomics_path=str(out), radiomics_cache_dir=str(cache), radiomics_workers=1)  # fmt: skip
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("radiomics")
    assert "is an existing folder" in _chain(info.value) and not cache.exists()


def test_strict_extraction_names_the_new_problems(tmp_path):
    bad = _case(tmp_path, "mask_4d", mask=np.stack([_ellipsoid()] * 2, axis=-1))
    with pytest.raises(RadiomicsCaseError, match=r"got 4D") as info:
        _extract([bad], tmp_path / "r.csv", strict=True)
    assert info.value.case_id == "mask_4d" and info.value.file == bad["mask"]


# ---------------------------------------------------------------------------------------- 14: a symlinked datalist
def test_symlinked_datalist_resolves_paths_next_to_the_real_file(tmp_path, monkeypatch):
    """``ln -s /data/cohort/datalist.json run/``: the paths the datalist's author wrote are relative to the real
    file; they used to resolve against the link's folder (every case a "missing file")."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    case = _case(cohort, "a")
    entry = {"id": "a", "image": Path(case["image"]).name, "mask": Path(case["mask"]).name, "label": 0}
    (cohort / "datalist.json").write_text(json.dumps({"training": [entry]}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "datalist.json").symlink_to(cohort / "datalist.json")
    monkeypatch.chdir(run)
    for path in (run / "datalist.json", Path("datalist.json")):
        assert load_datalist(path)[0]["image"] == case["image"]
        assert validate_datalist(path) == []
    data = _config(["inference.json"], datalist="datalist.json").get_parsed_content("data")
    assert data[0]["mask"] == case["mask"]


# ------------------------------------------------------------------------------ 10: feature tables checked on read
def _table_text(tmp: Path, text: str) -> Path:
    path = tmp / "features.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,f1,f2\na,1,2\nb,3\n", r"line 3 \(case 'b'\): 2 cells where the header has 3 \(id \+ 2 features\); the first missing column is 'f2'"),
        ("id,f1,f2\na,1,2\nb,3,4,5\n", r"line 3 \(case 'b'\): 4 cells where the header has 3"),
        ("id,f1,f2\na,1,2\nb,,4\n", r"line 3 \(case 'b'\), column 'f1': empty cell"),
        ("id,f1,f2\na,1,2\nb,3,x7\n", r"line 3 \(case 'b'\), column 'f2': 'x7' is not a number"),
        ("id,f1,f1\na,1,2\n", r"line 1: column\(s\) \['f1'\] appear more than once"),
        ("id,f1,\na,1,2\n", r"line 1: header column\(s\) \[3\] have no name"),
        ("id,f1\n,1\n", r"line 2: empty case id"),
    ],
    ids=["short_row", "long_row", "empty_cell", "text_cell", "duplicate_column", "unnamed_column", "empty_id"],
)  # fmt: skip
def test_feature_table_read_names_file_row_and_column(text, message, tmp_path):
    path = _table_text(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        read_feature_table(path)
    assert str(path) in str(info.value)


def test_feature_table_read_keeps_numbers_and_skips_blank_lines(tmp_path):
    ids, columns, values, _ = read_feature_table(_table_text(tmp_path, "id,f1,f2\na,1,nan\n\nb,-3e2,inf\n"))
    assert ids == ["a", "b"] and columns == ["f1", "f2"]
    np.testing.assert_array_equal(values, [[1, np.nan], [-300, np.inf]])
    assert read_feature_table(_table_text(tmp_path, "id,f1\n"))[2].shape == (0, 1)  # an all-failed part


# ------------------------------------------------------------------ 12: a training checkpoint given to inferring
def test_training_checkpoint_given_to_inferring_says_pass_model_pt(tiny_cohort, tmp_path):
    """``inferring --checkpoint models/checkpoints/checkpoint_epoch=1.pt`` listed missing and unexpected keys."""
    from workflows import run_infer_workflow, train_workflow

    from scripts.pretrain.networks import checkpoint_has_output_bn

    datalist = tmp_path / "four.json"
    datalist.write_text(json.dumps({"training": load_datalist(tiny_cohort)[:4]}))
    wf = train_workflow(tmp_path, datalist, epochs=1, batch_size=2, steps_per_epoch=1, knn_monitor=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    (epoch_ckpt,) = (tmp_path / "models" / "checkpoints").glob("checkpoint_epoch=1.pt")
    assert checkpoint_has_output_bn(str(tmp_path / "models" / "model.pt")) is True  # the encoder loads as before
    with pytest.raises(Exception) as info:
        run_infer_workflow(["inference.json"], "inferring", checkpoint=str(epoch_ckpt), datalist=str(datalist),
                           output_dir=str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"), roi_size=[28] * 3,
                           num_workers=0)  # fmt: skip
    chain = _chain(info.value)
    assert re.search(
        r"checkpoint_epoch=1.pt is a training checkpoint \(its keys \[.*'lr_scheduler', 'network', 'optimizer'", chain
    ), chain
    assert "pass models/model.pt" in chain and "Missing key" not in chain
    assert not (tmp_path / "eval" / "ssl_features.csv").exists()


# ------------------------------------------------------------ 11 and 15: command-line values checked by name
def _pipeline_refusals(tmp: Path, cases: list[tuple[list[str], str]]) -> None:
    """Each pipeline command exits 2 with its usage and a message naming the option, before any stage: nothing is
    written (no output folder, no stage arguments)."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    procs = [
        (args, message, subprocess.Popen([sys.executable, "-m", "scripts.run.pipeline", *args], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args, message in cases
    ]  # fmt: skip
    for args, message, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{args}: exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        assert "usage:" in err and re.search(message, err), f"{args}:\n{err[-2000:]}"
        assert "[pipeline]" not in out, f"{args} ran a stage:\n{out[-2000:]}"


def test_pipeline_refuses_bad_values_by_option_before_any_stage(tmp_path, good):
    out = tmp_path / "run"
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    base = ["--out", str(out)]
    _pipeline_refusals(
        tmp_path,
        [
            ([*base, "--epochs", "abc"], r"argument --epochs: invalid int value: 'abc'"),
            ([*base, "--epochs", "0"], r"--epochs must be a positive integer, got 0"),
            ([*base, "--roi_size", "32"], r"--roi_size must be a list of 3 positive integers such as \[32,32,32\], got 32"),
            ([*base, "--roi_size", "[28,28]"], r"--roi_size must be a list of 3 positive integers"),
            ([*base, "--seeds", "abc"], r"--seeds must be comma-separated integers such as 0,1,2, got 'abc'"),
            ([*base, "--pretrain_seeds", "0,x"], r"--pretrain_seeds must be comma-separated integers"),
            ([*base, "--n_folds", "1", "--label_fractions", "[0]"], r"--n_folds must be an integer >= 2, got 1; --label_fractions must be"),
            ([*base, "--datalist", str(tmp_path / "missing.json")], r"--datalist .*missing.json: no such file"),
            (["--out", str(a_file)], r"--out .*a_file.txt: .*a_file.txt is an existing file, not a folder"),
            (["--out", str(a_file / "sub")], r"--out .*: .*sub lies under .*a_file.txt, which is a file, not a folder"),
        ],
    )  # fmt: skip
    assert not out.exists() and a_file.read_text() == "not a folder"


def test_pipeline_run_checks_its_values_too(tmp_path):
    """``run()`` called from Python refuses the same values before any stage (``--seeds abc`` used to be read after
    pretraining, embedding and radiomics had run)."""
    from scripts.run.pipeline import run

    with pytest.raises(SystemExit, match=r"--seeds must be comma-separated integers .*got 'abc'.*nothing was run"):
        run(out=str(tmp_path / "run"), seeds="abc", dry_run=True)
    with pytest.raises(SystemExit, match=r"--roi_size must be a list of 3 positive integers"):
        run(out=str(tmp_path / "run"), dry_run=True, roi_size=32)
    assert not (tmp_path / "run").exists()
    run(out=str(tmp_path / "run"), dry_run=True, modes="plain", supervised=False, svm_path="none", control=False)
    args = json.loads((tmp_path / "run" / "args" / "evaluate.json").read_text(encoding="utf-8"))
    assert args["seeds"] == [0, 1, 2]


def test_config_values_are_checked_by_id(tmp_path):
    """``monai.bundle run training --epochs abc --roi_size 32`` and a roi_size handed to the ROI transform or the
    input record: the message names the config id, before any object is built."""
    from workflows import train_workflow

    from scripts.data.transforms import TumourBoxd
    from scripts.pretrain.model_input import input_record

    wf = train_workflow(tmp_path, tmp_path / "never_read.json", epochs="abc", roi_size=32)
    with pytest.raises(Exception) as info:
        wf.initialize()
    assert re.search(r"epochs must be a positive integer, got 'abc'; roi_size must be a list of 3 positive integers "
                     r"such as \[32,32,32\], got 32", _chain(info.value)), _chain(info.value)  # fmt: skip
    assert not (tmp_path / "models").exists()
    with pytest.raises(ValueError, match=r"TumourBoxd: roi_size must be a list of 3 positive integers .*got 32"):
        TumourBoxd(keys=["image", "mask"], roi_size=32)
    with pytest.raises(ValueError, match=r"roi_size must be .*got \[32, 0, 32\]"):
        TumourBoxd(keys=["image", "mask"], roi_size=[32, 0, 32])
    with pytest.raises(ValueError, match=r"roi_size must be a list of 3 positive integers .*got 32"):
        input_record(32, 1, [])
    assert input_record((32, 32, 32), 1, [])["roi_size"] == [32, 32, 32]


# ----------------------------------------------------------------------------- 16: geometry is physical
@pytest.fixture(scope="module")
def same_lesion(tmp_path_factory) -> dict[str, dict]:
    """The same 20 mm sphere at 1 mm isotropic and at 0.5 x 0.5 x 5 mm (a thick-slice scan), 48 mm fields of view."""
    tmp = tmp_path_factory.mktemp("geometry")
    cases = {}
    for name, spacing, shape in (("iso", (1.0, 1.0, 1.0), (48, 48, 48)), ("aniso", (0.5, 0.5, 5.0), (96, 96, 10))):
        affine = np.diag([*spacing, 1.0])
        mask = _ellipsoid(shape, radii=(10, 10, 10), spacing=spacing)
        image = _image(4, shape) + 60.0 * mask
        cases[name] = _case(tmp, name, image=image, mask=mask, affine=affine)
    return cases


def _box(item: dict, roi: int = 32, **override) -> dict:
    from monai.transforms import Compose

    parser = _config(["train.json"], roi_size=[roi] * 3, **override)
    return Compose(parser.get_parsed_content("load_transforms") + parser.get_parsed_content("roi_transforms"))(
        dict(item)
    )


def test_box_geometry_is_reported_at_validation_and_matches_training(same_lesion, tmp_path, capsys, caplog):
    """A 32-voxel box cuts the 20 mm lesion only at 0.5 mm in-plane (16 mm): validation says so, with the same
    numbers as training's box records, and the build_cohort command prints it without failing."""
    import logging

    from scripts.data import build_cohort

    datalist = _datalist(tmp_path, list(same_lesion.values()))
    from scripts.data.geometry import collect

    geometry: dict = {}
    assert validate_datalist(datalist, on_lesion=collect(geometry, [32] * 3)) == []
    iso, aniso = geometry["iso"], geometry["aniso"]
    assert iso["lesion_cut_fraction"] == 0 and iso["anisotropy"] == 1 and iso["box_mm"] == [32, 32, 32]
    assert aniso["anisotropy"] == 10 and aniso["box_mm"] == [16, 16, 160] and aniso["lesion_cut_fraction"] > 0.05
    with caplog.at_level(logging.WARNING, logger="scripts.data.transforms"):
        boxes = {name: _box(item)["mask_box"]["geometry"] for name, item in same_lesion.items()}
    for name in ("iso", "aniso"):  # the validator places the box training places, voxel for voxel
        assert boxes[name] == {k: v for k, v in geometry[name].items() if k != "mask"}, name
    assert "case 'aniso'" in caplog.text and "case 'iso'" not in caplog.text
    # thick slices miss the sphere's equator: 19 mm in-plane on the 0.5 mm grid
    assert "the box (16 x 16 x 160 mm) cuts the lesion (19 x 19 x 20 mm): 384 of its 3448 voxels (11.1%)" in caplog.text
    assert "anisotropic voxels 0.5 x 0.5 x 5 mm (ratio 10)" in caplog.text
    report = tmp_path / "geometry.csv"
    build_cohort.validate(str(datalist), roi_size="32,32,32", geometry_csv=str(report))
    out = capsys.readouterr().out
    assert re.search(r"^aniso\t.*aniso_seg.nii.gz\twarning: the box \(16 x 16 x 160 mm\) cuts the lesion", out, re.M)
    assert "\niso\t" not in out and "OK: 2 cases" in out and "2 geometry warning(s) above" in out
    rows = report.read_text().splitlines()
    assert rows[0].startswith("id,mask,spacing_mm,anisotropy,box_voxels,box_mm") and len(rows) == 3


def test_roi_spacing_mm_boxes_the_lesion_alike_at_any_voxel_size(same_lesion, tmp_path):
    """``roi_spacing_mm [1,1,1]``: the box is 32 mm on every axis, resampled to 1 mm voxels: the lesion is whole in
    both cases, the ROIs have the same grid and nearly the same lesion, and radiomics' shape features agree."""
    boxes = {name: _box(item, roi_spacing_mm=[1, 1, 1]) for name, item in same_lesion.items()}
    for d in boxes.values():
        geometry = d["mask_box"]["geometry"]
        assert geometry["lesion_cut_fraction"] == 0 and geometry["resampled_to_mm"] == [1.0, 1.0, 1.0]
        assert tuple(d["image"].shape) == (1, 32, 32, 32) and tuple(d["mask"].shape) == (1, 32, 32, 32)
        np.testing.assert_allclose(np.linalg.norm(d["image"].affine[:3, :3].numpy(), axis=0), [1, 1, 1])
    n_iso, n_aniso = (int(boxes[n]["mask"].sum()) for n in ("iso", "aniso"))
    assert abs(n_aniso - n_iso) / n_iso < 0.1, (n_iso, n_aniso)
    volumes = {}
    for spacing in (None, [1, 1, 1]):
        res = _extract(same_lesion.values(), tmp_path / f"r_{spacing}.csv",
                       load_case=_bundle_loader(32, roi_spacing_mm=spacing))  # fmt: skip
        ids, columns, values, meta = read_feature_table(res.table_path)
        volumes[str(spacing)] = dict(zip(ids, values[:, columns.index("original_shape_VoxelVolume")]))
        cut = meta["lesion_cut_by_box"]
        assert (set(cut) == {"aniso"}) if spacing is None else cut == {}, cut
        assert set(meta["roi_geometry"]) == {"iso", "aniso"}
    cut_v, mm_v = volumes["None"], volumes["[1, 1, 1]"]
    assert cut_v["aniso"] < 0.95 * cut_v["iso"], cut_v  # the voxel box cut the lesion
    assert abs(mm_v["aniso"] - mm_v["iso"]) / mm_v["iso"] < 0.05, mm_v  # the box in mm: the same lesion


def test_roi_spacing_mm_is_part_of_the_encoder_input_record(tmp_path):
    """An encoder trained on resampled boxes is not embedded on voxel boxes (and the default record is unchanged)."""
    from scripts.pretrain.model_input import check_input, input_record, write_input_record

    default = input_record([32] * 3, 1, [])
    assert "roi_spacing_mm" not in default and input_record([32] * 3, 1, [], None) == default
    ckpt = tmp_path / "model.pt"
    write_input_record(ckpt, input_record([32] * 3, 1, [], [1, 1, 1]))
    assert check_input(ckpt, [32] * 3, 1, [], [1.0, 1.0, 1.0])["roi_spacing_mm"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"roi_spacing_mm: trained on \[1.0, 1.0, 1.0\], this config gives null"):
        check_input(ckpt, [32] * 3, 1, [])
    write_input_record(ckpt, default)
    with pytest.raises(ValueError, match=r"roi_spacing_mm: trained on null, this config gives \[1.0, 1.0, 1.0\]"):
        check_input(ckpt, [32] * 3, 1, [], [1, 1, 1])
    with pytest.raises(ValueError, match=r"roi_spacing_mm must be null or a list of 3 positive numbers"):
        input_record([32] * 3, 1, [], [1, 0, 1])


# ---------------------------------------------------------------------------------- 17: property-based test
_BAD_MASKS = ("empty", "tiny", "soft_faint", "intensity", "negative", "whole", "mask_4d")
_BAD_IMAGES = ("float64_huge", "nan", "image_4d")
_BAD_PATHS = ("missing", "folder", "long_name")
_PROP_SECTIONS = ("training", "validation", "testing")


def _prop_mask(kind: str, shape, spacing) -> np.ndarray:
    lesion = _ellipsoid(
        shape, radii=[3.0 * min(spacing) / s * max(spacing) / min(spacing) for s in spacing], spacing=spacing
    )
    lesion = lesion if lesion.sum() >= 8 else _ellipsoid(shape, radii=(2.5, 2.5, 2.5))
    if kind == "labels_124":
        return lesion * 2 + _ellipsoid(shape, radii=(1, 1, 1)) * 2
    if kind == "soft_halo":
        return np.maximum(lesion.astype(np.float32), 0.2 * _ellipsoid(shape, radii=(5, 5, 5)))
    if kind == "soft_faint":
        return lesion.astype(np.float32) * 0.4
    if kind == "two_parts":
        return lesion | _ellipsoid(shape, centre=(1, 1, 1), radii=(1.5, 1.5, 1.5))
    if kind == "empty":
        return np.zeros(shape, np.uint8)
    if kind == "tiny":
        out = np.zeros(shape, np.uint8)
        out[5, 5, 4:6] = 1
        return out
    if kind == "intensity":
        return np.random.default_rng(1).integers(0, 200, shape).astype(np.int16)
    if kind == "negative":
        return lesion.astype(np.int16) - 1
    if kind == "whole":
        return np.ones(shape, np.uint8)
    if kind == "mask_4d":
        return np.stack([lesion, lesion], axis=-1)
    return lesion


def _prop_image(kind: str, shape, seed: int) -> np.ndarray:
    image = _image(seed, shape) + 50.0 * _ellipsoid(shape, radii=(3, 3, 3))
    if kind == "int16":
        return image.astype(np.int16)
    if kind == "float64_huge":
        image = image.astype(np.float64)
        image[0, 0, 0] = 1e300
    elif kind == "nan":
        image[0, 0, :2] = np.nan
    elif kind == "image_4d":
        return np.stack([image, image], axis=-1).astype(np.float32)
    return image.astype(np.float32)


def _write_volume(path: Path, arr: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), lps: bool = False) -> None:
    if path.suffix == ".nrrd":
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetOrigin(tuple(float(o) for o in origin))
        sitk.WriteImage(img, str(path))
        return
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    if lps:  # the same grid stored with x and y reversed (the mask of an LPS export)
        arr = arr[::-1, ::-1]
        affine[:2, :2] *= -1
        affine[:2, 3] += [(arr.shape[0] - 1) * spacing[0], (arr.shape[1] - 1) * spacing[1]]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(path))


def _prop_case(folder: Path, i: int, spec: dict) -> dict:
    """One generated case written as real files; ``image``/``mask`` are relative to the datalist."""
    cid = f"c{i}"
    shape, spacing = spec["shape"], spec["spacing"]
    ext = "nii.gz" if "4d" in spec["mask"] + spec["image"] or spec["grid"] == "lps" else spec["fmt"]
    image, mask = f"{cid}_img.{ext}", f"{cid}_seg.{ext}"
    _write_volume(folder / image, _prop_image(spec["image"], shape, i), spacing)
    origin = (5.0, 0.0, 0.0) if spec["grid"] == "other_origin" else (0.0, 0.0, 0.0)
    _write_volume(folder / mask, _prop_mask(spec["mask"], shape, spacing), spacing, origin, spec["grid"] == "lps")
    if spec["path"] == "missing":
        image = f"{cid}_gone.nii.gz"
    elif spec["path"] == "folder":
        (folder / f"{cid}_dicom").mkdir()
        (folder / f"{cid}_dicom" / "IM0001.dcm").write_bytes(b"\0" * 132)
        image = f"{cid}_dicom"
    elif spec["path"] == "long_name":
        mask = "m" * 290 + ".nii.gz"
    entry = {"id": cid, "image": image, "mask": mask}
    if spec["label"] is not None:
        entry["label"] = spec["label"]
    return entry


def _harmless_if_clean(spec: dict) -> dict:
    """A ``clean`` case keeps its spacing, shape, format, orientation, label mask or soft halo, but no bad input."""
    if not spec["clean"]:
        return spec
    return {
        **spec,
        "mask": "ellipsoid" if spec["mask"] in _BAD_MASKS else spec["mask"],
        "image": "float32" if spec["image"] in _BAD_IMAGES else spec["image"],
        "grid": "same" if spec["grid"] == "other_origin" else spec["grid"],
        "path": "ok",
    }


def _expected_bad(spec: dict) -> bool:
    """A case the bundle must refuse (validation names it; radiomics lists it under failures)."""
    return (
        spec["mask"] in _BAD_MASKS
        or spec["image"] in _BAD_IMAGES
        or spec["path"] in _BAD_PATHS
        or spec["grid"] == "other_origin"
    )


def test_property_every_generated_case_is_validated_or_named_and_extracted_or_reported(tmp_path_factory):
    """Generated datalists and volumes (spacings, shapes, formats, label values, soft/label/4D/empty masks, bad
    images, folders, long names, other grids, sections, duplicate entries): validation never crashes and names every
    case it does not pass with a reason; a case it passes is extracted (both loaders); every case is in the table
    or in the failures report with a reason; a case the bundle must refuse is refused by both; an extraction that
    fails as a whole leaves the earlier table, meta.json and failures report byte-identical."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from scripts.data.datalist import load_sections

    base = tmp_path_factory.mktemp("prop_inputs")
    reference = _case(base, "ref")
    loaders = {"files": None, "bundle": _bundle_loader(8)}
    counter = iter(range(10**6))
    case = st.fixed_dictionaries(
        {
            "shape": st.sampled_from([(12, 12, 12), (14, 10, 8)]),
            "spacing": st.sampled_from([(1.0, 1.0, 1.0), (0.5, 0.5, 2.0), (2.0, 1.0, 1.0)]),
            "mask": st.sampled_from(["ellipsoid", "ellipsoid", "labels_124", "soft_halo", "two_parts", *_BAD_MASKS]),
            "image": st.sampled_from(["float32", "float32", "int16", *_BAD_IMAGES]),
            "grid": st.sampled_from(["same", "same", "same", "lps", "other_origin"]),
            "fmt": st.sampled_from(["nii.gz", "nrrd"]),
            "path": st.sampled_from(["ok"] * 6 + list(_BAD_PATHS)),
            "label": st.sampled_from([0, 1, 1, None]),
            "section": st.sampled_from(_PROP_SECTIONS),
            "copy_previous": st.sampled_from([False] * 5 + [True]),
            "clean": st.booleans(),  # half the cases keep only their harmless variations (spacing, format, ...)
        }
    ).map(_harmless_if_clean)

    @settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(specs=st.lists(case, min_size=1, max_size=4), loader=st.sampled_from(sorted(loaders)))
    def run(specs, loader):
        folder = base / f"ex{next(counter)}"
        folder.mkdir()
        doc: dict[str, list] = {}
        entries, bad, duplicated = {}, set(), set()
        for i, spec in enumerate(specs):
            if spec["copy_previous"] and entries:  # the previous case's files under another id: a leak
                prev = list(entries)[-1]
                entry = {**entries[prev], "id": f"c{i}"}
                duplicated |= {prev, entry["id"]}
                spec = {**specs[int(prev[1:])], "section": spec["section"]}
            else:
                entry = _prop_case(folder, i, spec)
            entries[entry["id"]] = entry
            doc.setdefault(spec["section"], []).append(entry)
            if _expected_bad(spec):
                bad.add(entry["id"])
        datalist = folder / "datalist.json"
        datalist.write_text(json.dumps(doc))

        problems = validate_datalist(datalist)
        named = {p.case_id for p in problems}
        assert named <= set(entries) and all(p.problem for p in problems), [str(p) for p in problems]
        assert bad | duplicated <= named, (specs, [str(p) for p in problems])

        out = folder / "out" / "radiomics.csv"
        out.parent.mkdir()
        _extract([reference], out)
        before = _three_files(out)
        items = load_sections(datalist, _PROP_SECTIONS, labels="drop")
        try:
            res = _extract(items, out, load_case=loaders[loader])
        except RuntimeError as e:  # every case failed: each is named, and nothing earlier changed
            assert not (set(entries) - named), ("a validated case failed extraction", specs, str(e))
            assert all(repr(c) in str(e) for c in list(entries)[:5]), str(e)
            assert _three_files(out) == before, "a failed run changed the earlier outputs"
            return
        ids = read_feature_table(res.table_path)[0]
        failed = {f.case_id: f for f in res.failures}

        assert sorted(ids + list(failed)) == sorted(entries), "a case was lost"
        assert set(entries) - named <= set(ids), ("a validated case failed extraction", specs, failed)
        assert bad.isdisjoint(ids), ("a case the bundle must refuse was extracted", specs, ids)
        assert all(f.reason and " at 0x" not in f.reason for f in failed.values()), failed

    run()


def test_embeddings_path_an_existing_folder_is_refused_before_the_first_batch(tmp_path):
    """The same mistake as radiomics_path a folder, for ``inferring``: refused when the run starts."""
    import torch
    from ignite.engine import Engine

    from scripts.pretrain.embed import EmbeddingWriter

    out = tmp_path / "eval"
    out.mkdir()
    seen = []
    engine = Engine(lambda e, b: seen.append(b) or {"pred": torch.ones(1, 4)})
    EmbeddingWriter(str(out)).attach(engine)
    with pytest.raises(ValueError, match=r"embedding output .*eval is an existing folder: embeddings_path must name"):
        engine.run([{"id": ["a"]}])
    assert seen == [] and list(out.iterdir()) == []
