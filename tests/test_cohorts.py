"""BraTS / NSCLC-Radiomics datalist builders, exclusions, the cohort summary and the two ROI profiles.

Every test writes a miniature cohort on disk with the real naming (BraTS 2018/2020/2021 folders, a
``name_mapping.csv``, an NSCLC clinical table with messy ``Overall.Stage`` values, a DICOM CT series written with
SimpleITK) and runs the real code on it.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.bundle import ConfigParser

from scripts.data import build_cohort as datasets
from scripts.data import cohorts
from scripts.data.datalist import load_datalist
from scripts.data.validation import validate_datalist

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (20, 18, 14)
MODS = ("flair", "t1", "t1ce", "t2")


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _seg(rng: np.random.Generator, empty: bool = False) -> np.ndarray:
    """BraTS labels on a blob: 2 (oedema) outside, 1 (necrosis) and 4 (enhancing) inside."""
    seg = np.zeros(SHAPE, np.uint8)
    if empty:
        return seg
    c = rng.integers(6, 10, size=3)
    seg[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, c[2] - 3 : c[2] + 3] = 2
    seg[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 1 : c[2] + 1] = 4
    seg[c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2]] = 1
    return seg


def _brats_case(folder: Path, case_id: str, rng, skip=(), ext=".nii.gz", seg_name=None, empty=False, mods=MODS) -> None:
    for m in mods:
        if m not in skip:
            vol = (rng.random(SHAPE) * 500).astype(np.float32)
            vol[:2] = 0  # skull-stripped background
            _nifti(folder / case_id / f"{case_id}_{m}{ext}", vol)
    if "seg" not in skip:
        _nifti(folder / case_id / (seg_name or f"{case_id}_seg{ext}"), _seg(rng, empty))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def brats2020(tmp_path) -> tuple[Path, Path]:
    """A BraTS 2020-style download: case folders + name_mapping.csv (centres only in the 2019 ids)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    rows = [  # Grade, BraTS_2019_subject_ID, BraTS_2020_subject_ID
        ["HGG", "BraTS19_CBICA_AAB_1", "BraTS20_Training_001"],
        ["LGG", "BraTS19_TCIA10_103_1", "BraTS20_Training_002"],
        ["HGG", "BraTS19_TMC_06290_1", "BraTS20_Training_003"],
        ["HGG", "BraTS19_2013_2_1", "BraTS20_Training_004"],
        ["HGG", "BraTS19_CBICA_AAG_1", "BraTS20_Training_005"],  # no t1ce
        ["LGG", "BraTS19_TCIA10_130_1", "BraTS20_Training_006"],  # no seg
        ["NA", "BraTS19_CBICA_ABB_1", "BraTS20_Training_007"],  # no grade
        ["GBM", "BraTS19_CBICA_ABE_1", "BraTS20_Training_009"],  # grade outside the map
        [" lgg ", "NA", "BraTS20_Training_010"],  # .nii files, 2020's odd seg name, no centre known
        ["HGG", "BraTS19_CBICA_ABM_1", "BraTS20_Training_011"],  # empty segmentation
        ["HGG", "BraTS19_CBICA_ABN_1", "BraTS20_Training_012"],  # in the table, not on disk
    ]
    for i in (1, 2, 3, 4, 7, 8, 9):
        _brats_case(root, f"BraTS20_Training_{i:03d}", rng)
    _brats_case(root, "BraTS20_Training_005", rng, skip=("t1ce",))
    _brats_case(root, "BraTS20_Training_006", rng, skip=("seg",))
    _brats_case(root, "BraTS20_Training_010", rng, ext=".nii", seg_name="W39_1998.09.19_Segm.nii")
    _brats_case(root, "BraTS20_Training_011", rng, empty=True)
    table = _write_csv(tmp_path / "name_mapping.csv", ["Grade", "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"], rows)
    return root, table


def test_brats_datalist_labels_centres_exclusions_and_table(brats2020, tmp_path, capsys):
    root, table = brats2020
    out = cohorts.build_brats_datalist(root, tmp_path / "out" / "datalist.json", grades=table)
    doc = json.loads(out.read_text(encoding="utf-8"))
    by_id = {it["id"]: it for it in doc["training"]}
    assert sorted(by_id) == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3, 4, 10)]
    assert {k: (v["label"], v["centre"]) for k, v in by_id.items()} == {
        "BraTS20_Training_001": (1, "CBICA"),
        "BraTS20_Training_002": (0, "TCIA"),
        "BraTS20_Training_003": (1, "TMC"),
        "BraTS20_Training_004": (1, "others"),
        "BraTS20_Training_010": (0, "unknown"),
    }
    first = by_id["BraTS20_Training_001"]
    assert [Path(p).name for p in first["image"]] == [f"BraTS20_Training_001_{m}.nii.gz" for m in MODS]
    assert Path(first["mask"]).is_absolute()  # data outside the datalist's folder: absolute paths
    assert Path(by_id["BraTS20_Training_010"]["mask"]).name == "W39_1998.09.19_Segm.nii"
    assert doc["label_map"] == {"1": "HGG", "0": "LGG"} and doc["source"]["id_column"] == "BraTS_2020_subject_ID"

    reasons = {e["id"]: e["reason"] for e in doc["excluded"]}
    assert reasons["BraTS20_Training_005"].startswith("missing t1ce file: no BraTS20_Training_005_t1ce.nii.gz")
    assert reasons["BraTS20_Training_006"].startswith("missing segmentation: ")
    assert reasons["BraTS20_Training_007"].startswith("no grade: 'NA' in column 'Grade'")
    assert reasons["BraTS20_Training_008"].startswith("no grade: not in ")
    assert reasons["BraTS20_Training_009"].startswith("unknown grade: 'GBM'")
    assert reasons["BraTS20_Training_011"].startswith("failed validation: empty mask")
    assert reasons["BraTS20_Training_012"].startswith("no case folder: listed in ")
    assert len(reasons) == 7

    # the datalist is valid as written, and loads with absolute paths
    assert validate_datalist(out, label_map=doc["label_map"]) == []
    assert all(Path(p).is_file() for it in load_datalist(out) for p in [*it["image"], it["mask"]])

    # the table (class x centre, like the paper's Table 1) and the excluded CSV, printed and written
    header, rows = cohorts.cohort_table(doc["training"], doc["label_map"])
    assert header == ["class", "CBICA", "TCIA", "TMC", "others", "unknown", "Total"]
    assert rows == [["HGG", 1, 0, 1, 1, 0, 3], ["LGG", 0, 1, 0, 0, 1, 2], ["Total", 1, 1, 1, 1, 1, 5]]
    paths = cohorts.summary_paths(out)
    with open(paths["table_csv"]) as f:
        assert list(csv.reader(f))[1] == ["HGG", "1", "0", "1", "1", "0", "3"]
    with open(paths["excluded"]) as f:
        excluded = list(csv.DictReader(f))
    assert {r["id"]: r["reason"] for r in excluded} == reasons
    md = paths["table_md"].read_text(encoding="utf-8")
    assert "| HGG | 1 | 0 | 1 | 1 | 0 | 3 |" in md and "- missing t1ce file: 1" in md
    printed = capsys.readouterr().out
    assert "BraTS20_Training_005: missing t1ce file" in printed and "5 cases, 7 excluded" in printed


def test_brats_flair_only_and_tumour_core_masks(brats2020, tmp_path):
    root, table = brats2020
    out = cohorts.build_brats_datalist(
        root, tmp_path / "flair.json", grades=table, modalities="flair", mask_labels=[1, 4], validate=False
    )
    doc = json.loads(out.read_text(encoding="utf-8"))
    item = next(it for it in load_datalist(out) if it["id"] == "BraTS20_Training_001")
    assert isinstance(item["image"], str) and item["image"].endswith("BraTS20_Training_001_flair.nii.gz")
    seg = np.asanyarray(nib.load(root / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz").dataobj)
    core = np.asanyarray(nib.load(item["mask"]).dataobj)
    np.testing.assert_array_equal(core, np.isin(seg, [1, 4]).astype(np.uint8))
    assert doc["training"][0]["mask"].startswith("flair_files/masks/")  # derived masks live by the datalist
    assert cohorts.image_channels(out) == 1
    assert "BraTS20_Training_011" in {it["id"] for it in doc["training"]}  # not validated: empty mask kept
    with pytest.raises(ValueError, match=r"modalities must be distinct names from"):
        cohorts.build_brats_datalist(root, tmp_path / "x.json", grades=table, modalities="flair,dwi")


def test_brats_2018_folders_2021_names_duplicates_and_bad_tables(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "brats18"
    _brats_case(root / "HGG", "Brats18_CBICA_AAB_1", rng)
    _brats_case(root / "HGG", "Brats18_2013_10_1", rng)
    _brats_case(root / "LGG", "Brats18_TCIA10_103_1", rng)
    _brats_case(root / "HGG", "Brats18_TCIA02_117_1", rng)
    _brats_case(root / "LGG", "Brats18_TCIA02_117_1", rng)  # the same case id twice
    out = cohorts.build_brats_datalist(root, tmp_path / "b18.json", log=lambda s: None)
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert {it["id"]: (it["label"], it["centre"], it["grade"]) for it in doc["training"]} == {
        "Brats18_2013_10_1": (1, "others", "HGG"),
        "Brats18_CBICA_AAB_1": (1, "CBICA", "HGG"),
        "Brats18_TCIA10_103_1": (0, "TCIA", "LGG"),
    }
    [dup] = doc["excluded"]
    assert dup["id"] == "Brats18_TCIA02_117_1" and dup["reason"].startswith("duplicate id: 2 case folders")

    # a grades table contradicting the folder is refused per case, not resolved silently
    grades = _write_csv(tmp_path / "g.csv", ["ID", "Grade"], [["Brats18_CBICA_AAB_1", "LGG"]])
    doc = json.loads(
        cohorts.build_brats_datalist(root, tmp_path / "c.json", grades, log=lambda s: None).read_text(encoding="utf-8")
    )
    reasons = {e["id"]: e["reason"] for e in doc["excluded"]}
    assert reasons["Brats18_CBICA_AAB_1"].startswith("grade conflict: ")

    # 2021 naming with a configurable grade map; a table without a grade column fails clearly
    root21 = tmp_path / "brats21"
    for i in range(3):
        _brats_case(root21, f"BraTS2021_{i:05d}", rng)
    g21 = _write_csv(
        tmp_path / "g21.csv",
        ["BraTS2021", "WHO"],
        [["BraTS2021_00000", "4"], ["BraTS2021_00001", "2"], ["BraTS2021_09999", "4"]],
    )
    with pytest.raises(ValueError, match=r"no column 'Grade' \(columns: BraTS2021, WHO\); pass --grade_column"):
        cohorts.build_brats_datalist(root21, tmp_path / "d.json", g21)
    out = cohorts.build_brats_datalist(
        root21, tmp_path / "d.json", g21, grade_column="WHO", grade_map={"4": 1, "2": 0, "3": 0}, log=lambda s: None
    )
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert [(it["id"], it["label"], it["centre"]) for it in doc["training"]] == [
        ("BraTS2021_00000", 1, "unknown"),
        ("BraTS2021_00001", 0, "unknown"),
    ]
    assert [e["id"] for e in doc["excluded"]] == ["BraTS2021_00002", "BraTS2021_09999"]
    assert doc["label_map"] == {"1": "4", "0": "2/3"}
    with pytest.raises(ValueError, match=r"holds NIfTI files directly"):
        cohorts.build_brats_datalist(root21 / "BraTS2021_00000", tmp_path / "e.json")
    with pytest.raises(ValueError, match=r"no usable case: 4 excluded .*the datalist was not written"):
        cohorts.build_brats_datalist(root21, tmp_path / "f.json", g21, grade_column="WHO", log=lambda s: None)
    assert not (tmp_path / "f.json").exists() and (tmp_path / "f_excluded.csv").is_file()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("IIIa", 3),
        ("iiib", 3),
        (" II ", 2),
        ("Stage I", 1),
        ("stage IB", 1),
        ("3a", 3),
        ("I", 1),
        ("NA", "no stage: 'NA'"),
        ("", "no stage: ''"),
        (None, "no stage: ''"),
        ("IV", "stage IV: 'IV' is outside"),
        ("IVb", "stage IV: 'IVb' is outside"),
        ("early", "unparseable stage: 'early'"),
        ("IIII", "unparseable stage: 'IIII'"),
    ],
)
def test_parse_stage(raw, expected):
    label, why = cohorts.parse_stage(raw)
    if isinstance(expected, int):
        assert (label, why) == (expected, None)
    else:
        assert label is None and why.startswith(expected)


def test_parse_stage_map_overrides():
    assert cohorts.parse_stage("IV", {"IV": 3}) == (3, None)
    assert cohorts.parse_stage("IVa", {"IV": 3}) == (3, None)  # sub-stages follow their main stage
    assert cohorts.parse_stage("IIIb", {"IIIB": 4}) == (4, None)  # a sub-stage can be split off
    assert cohorts.parse_stage("IIIa", {"IIIB": 4}) == (3, None)


# --------------------------------------------------------------------------------------------------------- NSCLC

CT_SHAPE = (40, 36, 16)  # x, y, z
CT_SPACING = (8.0, 8.0, 10.0)


def _ct(rng) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, GTV mask) in x, y, z: air outside an elliptic body (40 HU) holding two lungs (-850 HU)."""
    x, y, _ = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in CT_SHAPE], indexing="ij")
    hu = np.full(CT_SHAPE, -1000.0, np.float32)
    body = ((x - 20) / 17) ** 2 + ((y - 18) / 14) ** 2 <= 1
    hu[body] = 40.0
    for cx in (12, 28):
        lung = (
            (((x - cx) / 6) ** 2 + ((y - 18) / 9) ** 2 <= 1)
            & (np.arange(16) >= 2)[None, None]
            & (np.arange(16) <= 13)[None, None]
        )
        hu[lung] = -850.0
    hu += rng.normal(0, 10, CT_SHAPE).astype(np.float32)
    gtv = np.zeros(CT_SHAPE, np.uint8)
    gtv[11:14, 16:20, 6:9] = 1
    hu[gtv > 0] = 30.0
    return hu.astype(np.int16), gtv


@cohorts._keeps_locale  # GDCM's writer switches the process locale to "C" too
def _dicom_series(folder: Path, hu: np.ndarray) -> sitk.Image:
    """Write ``hu`` (x, y, z) as a CT DICOM series, one file per slice; returns the image it encodes."""
    img = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)))
    img.SetSpacing(CT_SPACING)
    img.SetOrigin((-150.0, -140.0, 20.0))
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.7.1"
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000e", uid),
            ("0020|000d", uid + ".1"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k))))),
            ("0020|0013", str(k + 1)),
            ("0018|0050", str(CT_SPACING[2])),
        ):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{k + 1:03d}.dcm"))
        writer.Execute(s)
    return img


@pytest.fixture
def nsclc(tmp_path) -> tuple[Path, Path, Path]:
    """images/, masks/ and a clinical CSV like NSCLC-Radiomics' (messy stages, a duplicate, a DICOM CT)."""
    rng = np.random.default_rng(2)
    images, masks = tmp_path / "images", tmp_path / "masks"
    affine = np.diag([*CT_SPACING, 1.0])
    stages = {
        "LUNG1-001": "IIIa",
        "LUNG1-002": "iiib",  # CT as NRRD, mask as NIfTI
        "LUNG1-003": " II ",
        "LUNG1-004": "Stage I",
        "LUNG1-005": "NA",
        "LUNG1-006": "",
        "LUNG1-007": "IV",
        "LUNG1-008": "early",
        "LUNG1-010": "I",  # CT as a DICOM series folder
        "LUNG1-011": "II",  # mask only as DICOM (RTSTRUCT)
        "LUNG1-012": "III",  # no CT
        "LUNG1-013": "II",  # two GTVs in its mask folder
    }
    for cid in [*stages, "LUNG9-999"]:
        if cid == "LUNG1-012":
            continue
        hu, gtv = _ct(rng)
        if cid == "LUNG1-010":
            ct = _dicom_series(images / cid / "1.000-study" / "2.000-CT", hu)
            m = sitk.GetImageFromArray(np.transpose(gtv, (2, 1, 0)))
            m.CopyInformation(ct)
            (masks / cid).mkdir(parents=True)
            sitk.WriteImage(m, str(masks / cid / "mask_GTV-1.nii.gz"))
            sitk.WriteImage(m * 0 + 1, str(masks / cid / "mask_Lungs.nii.gz"))
            continue
        if cid == "LUNG1-002":
            ct = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)))
            ct.SetSpacing(CT_SPACING)
            m = sitk.GetImageFromArray(np.transpose(gtv, (2, 1, 0)))
            m.CopyInformation(ct)
            images.mkdir(exist_ok=True)
            masks.mkdir(exist_ok=True)
            sitk.WriteImage(ct, str(images / f"{cid}_ct.nrrd"))
            sitk.WriteImage(m, str(masks / f"{cid}_GTV.nii.gz"))
            continue
        _nifti(images / f"{cid}_ct.nii.gz", hu, affine)
        if cid == "LUNG1-011":
            (masks / cid).mkdir(parents=True)
            (masks / cid / "1-1.dcm").write_bytes(b"\0" * 128 + b"DICM")
        elif cid == "LUNG1-013":
            _nifti(masks / cid / "mask_GTV-1.nii.gz", gtv, affine)
            _nifti(masks / cid / "mask_GTV-2.nii.gz", gtv, affine)
        else:
            _nifti(masks / f"{cid}.nii.gz", gtv, affine)
    rows = [[cid, "61", stage, "squamous"] for cid, stage in stages.items()]
    rows.insert(3, ["LUNG1-004", "70", "IIIb", "adeno"])  # a duplicate id with a different stage
    clinical = _write_csv(tmp_path / "clinical.csv", ["PatientID", "age", "Overall.Stage", "Histology"], rows)
    return images, masks, clinical


def test_nsclc_datalist_stages_dicom_and_exclusions(nsclc, tmp_path, capsys):
    images, masks, clinical = nsclc
    out = cohorts.build_nsclc_datalist(images, masks, clinical, tmp_path / "nsclc" / "datalist.json")
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert {it["id"]: it["label"] for it in doc["training"]} == {
        "LUNG1-001": 3,
        "LUNG1-002": 3,
        "LUNG1-003": 2,
        "LUNG1-010": 1,
    }
    assert doc["label_map"] == {"1": "I", "2": "II", "3": "III"}
    dicom = next(it for it in doc["training"] if it["id"] == "LUNG1-010")
    assert dicom["image"] == "datalist_files/ct/LUNG1-010.nii.gz" and dicom["mask"].endswith("mask_GTV-1.nii.gz")
    ct = nib.load(out.parent / dicom["image"])
    assert ct.shape == CT_SHAPE and np.allclose(np.abs(np.diag(ct.affine))[:3], CT_SPACING)
    assert float(np.asanyarray(ct.dataobj).min()) < -900  # HU kept through DICOM and back
    nrrd = next(it for it in doc["training"] if it["id"] == "LUNG1-002")  # NRRD CT + NIfTI mask: CT converted
    assert nrrd["image"] == "datalist_files/ct/LUNG1-002.nii.gz" and nrrd["mask"].endswith("LUNG1-002_GTV.nii.gz")

    reasons = {e["id"]: e["reason"] for e in doc["excluded"]}
    expected = {
        "LUNG1-004": "duplicate id: 2 rows in ",
        "LUNG1-005": "no stage: 'NA' in column 'Overall.Stage' of ",
        "LUNG1-006": "no stage: '' in column",
        "LUNG1-007": "stage IV: 'IV' is outside the paper's classes I/II/III",
        "LUNG1-008": "unparseable stage: 'early'",
        "LUNG1-011": "DICOM mask: ",
        "LUNG1-012": "no CT: expected LUNG1-012.nii.gz",
        "LUNG1-013": "several masks: mask_GTV-1.nii.gz, mask_GTV-2.nii.gz match '*gtv*'",
        "LUNG9-999": "not in the clinical table: ",
    }
    assert set(reasons) == set(expected)
    for cid, start in expected.items():
        assert reasons[cid].startswith(start), (cid, reasons[cid])
    assert "convert the GTV to NIfTI or NRRD" in reasons["LUNG1-011"]
    assert validate_datalist(out) == []
    header, rows = cohorts.cohort_table(doc["training"], doc["label_map"])
    assert header == ["class", "Total"] and rows == [["I", 1], ["II", 1], ["III", 2], ["Total", 4]]
    assert "4 cases, 9 excluded" in capsys.readouterr().out

    # a stage map keeps stage IV as III and a mask pattern resolves the two GTVs
    out = cohorts.build_nsclc_datalist(
        images, masks, clinical, tmp_path / "b.json", stage_map={"IV": 3}, mask_pattern="*GTV-1*", log=lambda s: None
    )
    labels = {it["id"]: it["label"] for it in json.loads(out.read_text(encoding="utf-8"))["training"]}
    assert labels["LUNG1-007"] == 3 and labels["LUNG1-013"] == 2
    with pytest.raises(ValueError, match=r"clinical.csv: no column 'Stage' \(columns: PatientID, age"):
        cohorts.build_nsclc_datalist(images, masks, clinical, tmp_path / "c.json", stage_column="Stage")


def test_cli_brats_nsclc_and_summary(brats2020, nsclc, tmp_path, monkeypatch, capsys):
    root, table = brats2020
    out = tmp_path / "cli" / "brats.json"
    argv = ["datasets", "brats", "--root", str(root), "--grades", str(table), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--modalities", "flair,t2", "--validate", "false"])
    datasets.main()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert cohorts.image_channels(out) == 2
    (cohorts.summary_paths(out)["excluded"]).unlink()
    monkeypatch.setattr(sys, "argv", ["datasets", "summary", str(out)])
    datasets.main()
    printed = capsys.readouterr().out
    assert "| class | CBICA | TCIA | TMC | others | unknown | Total |" in printed
    assert "BraTS20_Training_009: unknown grade: 'GBM'" in printed
    assert cohorts.summary_paths(out)["excluded"].is_file()

    images, masks, clinical = nsclc
    out = tmp_path / "cli" / "nsclc.json"
    monkeypatch.setattr(
        sys,
        "argv",
        ["datasets", "nsclc", "--images", str(images), "--masks", str(masks), "--clinical", str(clinical)]
        + ["--out", str(out), "--stage_map", '{"IV": 3}', "--validate", "false"],
    )
    datasets.main()
    assert {it["id"]: it["label"] for it in json.loads(out.read_text(encoding="utf-8"))["training"]}["LUNG1-007"] == 3


# ------------------------------------------------------------------------------------------------------ profiles


def _profile(name: str, datalist: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "data" / f"{name}.json")])
    parser["datalist"] = str(datalist)
    return parser


def _run(transforms, item: dict) -> dict:
    d = dict(item)
    for t in transforms:
        d = t(d)
    return d


def test_brats_profile_gives_96_cube_with_4_or_1_channels(brats2020, tmp_path):
    root, table = brats2020
    profile = _profile("brats", tmp_path / "unused.json")  # the profile over train.json, as every command layers it
    assert profile["label_map"] == {"1": "HGG", "0": "LGG"} and profile["positive_label"] == 1
    for mods, channels in (("all", 4), ("flair", 1)):
        out = cohorts.build_brats_datalist(
            root, tmp_path / f"{mods}.json", table, modalities=mods, validate=False, log=lambda s: None
        )
        parser = _profile("brats", out)
        assert parser.get_parsed_content("in_channels") == channels
        assert parser.get_parsed_content("encoder_def").in_channels == channels
        item = next(it for it in load_datalist(out) if it["id"] == "BraTS20_Training_001")
        d = _run(parser.get_parsed_content("deterministic_transforms"), item)
        assert tuple(d["image"].shape) == (channels, 96, 96, 96) and tuple(d["mask"].shape) == (1, 96, 96, 96)
        seg = nib.load(root / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz").get_fdata()
        assert int((d["mask"] > 0).sum()) == int((seg > 0).sum())  # the whole tumour is inside the box
        assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 255.0


def test_nsclc_profile_gives_112_cube_around_the_lungs(nsclc, tmp_path):
    images, masks, clinical = nsclc
    out = cohorts.build_nsclc_datalist(images, masks, clinical, tmp_path / "n.json", validate=False, log=print)
    profile = json.loads((ROOT / "configs" / "data" / "nsclc.json").read_text(encoding="utf-8"))
    assert profile["label_map"] == {"1": "I", "2": "II", "3": "III"}
    parser = _profile("nsclc", out)
    assert parser.get_parsed_content("in_channels") == 1
    transforms = parser.get_parsed_content("load_transforms") + parser.get_parsed_content("roi_transforms")
    for item in load_datalist(out):
        if item["id"] not in ("LUNG1-001", "LUNG1-010"):  # a NIfTI CT and the DICOM-converted one
            continue
        d = _run(transforms, item)
        assert tuple(d["image"].shape) == (1, 112, 112, 112) and tuple(d["lung_mask"].shape) == (1, 112, 112, 112)
        assert d["lung_mask_box"]["size_voxels"] == [28, 28, 22]  # 224 mm at 8 x 8 x 10 mm
        assert int(d["mask"].sum()) > 0 and int(d["lung_mask"].sum()) > 0
        d = _run(parser.get_parsed_content("deterministic_transforms")[-3:], d)  # intensity + typing
        assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 255.0


def test_profiles_without_a_datalist_say_how_to_get_one(monkeypatch):
    monkeypatch.delenv("SIAM3D_DATALIST", raising=False)
    with pytest.raises(ValueError, match=r"the nsclc profile needs a datalist: pass --datalist PATH"):
        cohorts.profile_datalist("nsclc")
    monkeypatch.setenv("SIAM3D_DATALIST", "/data/d.json")
    assert cohorts.profile_datalist("brats") == "/data/d.json"


def test_image_channels_refuses_mixed_datalists(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"training": [{"id": "a", "image": ["x", "y"]}, {"id": "b", "image": "z"}]}))
    with pytest.raises(ValueError, match=r"mixes image channel counts \(2 channel\(s\): a; 1 channel\(s\): b\)"):
        cohorts.image_channels(p)


def test_summary_of_the_demo_cohort(tiny_cohort, tmp_path):
    """Any datalist can be summarised; the demo cohort's centres and classes come out as a Table 1."""
    copy = tmp_path / "demo.json"
    copy.write_text(Path(tiny_cohort).read_text(encoding="utf-8"))
    paths = cohorts.summarise(copy, log=lambda s: None)
    with open(paths["table_csv"]) as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "class" and rows[0][-1] == "Total" and rows[-1][-1] == "12"
    assert paths["excluded"].read_text(encoding="utf-8") == "id,reason\n"
