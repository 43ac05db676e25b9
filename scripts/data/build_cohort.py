"""Cohort commands: ``python -m scripts.data.build_cohort <command> ...`` (``<command> --help`` for its options).

validate DATALIST [--profile configs/data/demo.json] [--data_root DIR] [--roi_size 32,32,32]
         [--roi_spacing_mm 1,1,1] [--geometry_csv FILE]
                                                        every problem, one line each; exit 1 if any; warnings
                                                        for anisotropic voxels and lesions the box cuts
demo [--out DIR] [--n_cases 120] [--seed 0]           write the embedded default cohort (NIfTI + datalist)
vesselmnist NPZ --out DIR [--limit N]                 MedMNIST VesselMNIST3D npz -> NIfTI cohort + datalist (resumable)
brats --root DIR [--grades CSV] --out datalist.json     BraTS 2018-2021 folder -> validated datalist (+ table, exclusions)
      [--modalities all|flair|flair,t1ce] [--grade_map '{"HGG": 1, "LGG": 0}'] [--mask_labels 1,4] [--validate false]
nsclc --images DIR --masks DIR --clinical CSV --out datalist.json
      [--stage_map '{"IV": 3}'] [--mask_pattern '*GTV-1*'] [--id_column PatientID] [--stage_column Overall.Stage]
summary DATALIST                                        class x centre table + excluded cases (printed and written)

The builders and the summary live in scripts/data/cohorts/ (brats, nsclc, summary); these are thin command-line wrappers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scripts import cli
from scripts.config_utils import as_bool, setting_problem
from scripts.data import cohorts
from scripts.data.datalist import read_datalist_doc
from scripts.data.demo_cohort import ensure_demo_cohort
from scripts.data.geometry import collect, geometry_warnings
from scripts.data.validation import validate_datalist
from scripts.data.vesselmnist import cli as vesselmnist_cli

BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train.json"


def _label_map(profile: str | None, label_map: dict | str | None) -> dict | None:
    """``--label_map``, else the profile's; a profile sets only what differs from ``train.json``, so a profile
    without a ``label_map`` (``configs/data/demo.json``) has the base's."""
    if label_map is not None:
        return json.loads(label_map) if isinstance(label_map, str) else dict(label_map)
    if profile:
        conf = json.loads(Path(profile).read_text(encoding="utf-8"))
        if "label_map" in conf:
            return conf["label_map"]
        return json.loads(BASE_CONFIG.read_text(encoding="utf-8")).get("label_map")
    return None


def _profile_value(profile: str | None, key: str):
    """A setting of the profile, else of the base ``train.json`` (a profile sets only what differs)."""
    if profile:
        conf = json.loads(Path(profile).read_text(encoding="utf-8"))
        if key in conf:
            return conf[key]
    return json.loads(BASE_CONFIG.read_text(encoding="utf-8")).get(key)


def _tumour_box(profile: str | None, roi_size, roi_spacing_mm) -> dict:
    """``roi_size`` / ``roi_spacing_mm`` of the tumour box (options, else the profile's, else the base's); empty
    when the profile's ROI is not ``TumourBoxd`` (the NSCLC lung box is in mm already, VesselMNIST a plain crop)."""
    if "TumourBoxd" not in json.dumps(_profile_value(profile, "roi_transforms")):
        return {}
    box = {
        "roi_size": _numbers(roi_size, int) if roi_size is not None else _profile_value(profile, "roi_size"),
        "roi_spacing_mm": (
            _numbers(roi_spacing_mm, float) if roi_spacing_mm is not None else _profile_value(profile, "roi_spacing_mm")
        ),
    }
    problems = [setting_problem(k, v, prefix="--") for k, v in box.items()]
    if any(problems):
        raise ValueError("; ".join(p for p in problems if p))
    return box


def _numbers(value, kind):
    """``32,32,32`` / ``[32,32,32]`` / ``none`` from the command line."""
    text = str(value).strip().strip("[]")
    if text.lower() in ("none", "null", ""):
        return None
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        return value  # refused by name by setting_problem


def _write_geometry(path: str, geometry: dict) -> None:
    """One row per case: what the tumour box does to its lesion (``scripts.data.geometry.box_record``)."""
    import csv
    import io

    from scripts.io_utils import atomic_write_text

    columns = ["id", *next(iter(geometry.values()), {})]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for case_id, record in geometry.items():
        writer.writerow(
            [case_id, *(json.dumps(record[c]) if isinstance(record[c], list) else record[c] for c in columns[1:])]
        )
    atomic_write_text(path, buf.getvalue())


def validate(
    datalist: str,
    profile: str | None = None,
    label_map: dict | str | None = None,
    data_root: str | None = None,
    roi_size=None,
    roi_spacing_mm=None,
    geometry_csv: str | None = None,
) -> None:
    """Print one line per problem (case id, file, problem) and exit 1 when there is any; a summary line when clean.

    ``data_root`` confines every path as training and inference do: a path outside it is a problem. What the
    tumour box (``roi_size`` voxels, or ``roi_size`` x ``roi_spacing_mm`` mm; the profile's unless given) will do
    to each lesion is checked too: anisotropic voxels and lesions the box cuts are printed as warning lines
    (``case id <TAB> file <TAB> warning: ...``; they do not change the exit code), and ``geometry_csv`` receives
    every case's record (voxel size, anisotropy, box and lesion in mm, the share of the lesion outside the box).
    """
    geometry: dict = {}
    try:
        box = _tumour_box(profile, roi_size, roi_spacing_mm)
        problems = validate_datalist(
            datalist,
            label_map=_label_map(profile, label_map),
            data_root=data_root,
            on_lesion=collect(geometry, **box) if box else None,
        )
    except ValueError as e:  # e.g. a path that escapes --data_root: the datalist cannot be used at all
        print(f"{datalist}: {e}", file=sys.stderr)
        sys.exit(1)
    n_warnings = 0
    for case_id, record in geometry.items():
        for warning in geometry_warnings(record):
            print(f"{case_id}\t{record['mask']}\twarning: {warning}")
            n_warnings += 1
    if geometry_csv:
        _write_geometry(geometry_csv, geometry)
    warned = f"; {n_warnings} geometry warning(s) above" if n_warnings else ""
    if problems:
        for p in problems:
            print(p)
        n_cases = len({p.case_id for p in problems})
        print(f"{len(problems)} problem(s) in {n_cases} case(s) of {datalist}{warned}", file=sys.stderr)
        sys.exit(1)
    doc = read_datalist_doc(datalist)  # a UTF-8 byte-order mark is fine
    n = sum(len(doc.get(s, [])) for s in ("training", "validation", "testing"))
    print(f"OK: {n} cases in {datalist}, no problems found{warned}")


def demo(out: str | None = None, n_cases: int = 120, seed: int = 0) -> str:
    """Generate (or reuse) the embedded default cohort and print its datalist path."""
    return ensure_demo_cohort(out, n_cases=n_cases, seed=seed)


def _names(value) -> list[str]:
    """'flair,t1' / ('flair', 't1') / 'flair' -> a list."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")


def _mapping(value, what: str) -> dict | None:
    """A dict, a JSON object or the unquoted form ``{HGG: 1}`` that ``monai.bundle`` commands accept; None stays
    None."""
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        out = cli.literal(value)
        if not isinstance(out, dict):
            raise ValueError(f"--{what} must be a JSON object such as '{{\"IV\": 3}}', got {value!r}") from e
    if not isinstance(out, dict):
        raise ValueError(f"--{what} must be a JSON object, got {value!r}")
    return out


def _ints(value) -> list[int] | None:
    if value is None:
        return None
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [int(v) for v in parts]


def brats(
    root: str,
    out: str = "datalist.json",
    grades: str | None = None,
    modalities="all",
    grade_map=None,
    id_column: str | None = None,
    grade_column: str = "Grade",
    mask_labels=None,
    validate=True,
) -> str:
    """Build a BraTS datalist from ROOT (one folder per case) and print the class x centre table and exclusions."""
    return str(
        cohorts.build_brats_datalist(
            root,
            out,
            grades=grades,
            modalities=_names(modalities),
            grade_map=_mapping(grade_map, "grade_map"),
            id_column=id_column,
            grade_column=grade_column,
            mask_labels=_ints(mask_labels),
            validate=as_bool(validate, "validate"),
        )
    )


def nsclc(
    images: str,
    masks: str,
    clinical: str,
    out: str = "datalist.json",
    id_column: str = "PatientID",
    stage_column: str = "Overall.Stage",
    stage_map=None,
    mask_pattern: str = "*gtv*",
    validate=True,
) -> str:
    """Build an NSCLC-Radiomics datalist (stage I/II/III -> 1/2/3) and print the class table and exclusions."""
    return str(
        cohorts.build_nsclc_datalist(
            images,
            masks,
            clinical,
            out,
            id_column=id_column,
            stage_column=stage_column,
            stage_map=_mapping(stage_map, "stage_map"),
            mask_pattern=mask_pattern,
            validate=as_bool(validate, "validate"),
        )
    )


def summary(datalist: str) -> None:
    """Print the class x centre table and the excluded cases; write <stem>_table.csv/.md and <stem>_excluded.csv."""
    cohorts.summarise(datalist)


def build_parser():
    ap = cli.parser("python -m scripts.data.build_cohort", __doc__)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, fn):
        doc = (fn.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc, allow_abbrev=False)
        p.set_defaults(func=fn)
        return p

    p = command("validate", validate)
    p.add_argument("datalist")
    p.add_argument("--profile", help="data profile whose label_map the labels must match")
    p.add_argument("--label_map", help="JSON object of label -> class name (instead of --profile)")
    p.add_argument("--data_root", help="refuse any path that resolves outside this folder")
    p.add_argument("--roi_size", help="the tumour box in voxels, e.g. 32,32,32 (default: the profile's)")
    p.add_argument(
        "--roi_spacing_mm",
        help="a box in mm on voxels resampled to this spacing, e.g. 1,1,1 (default: the profile's, none)",
    )
    p.add_argument("--geometry_csv", help="write each case's box geometry (voxel size, box and lesion in mm, cut) here")
    p = command("demo", demo)
    p.add_argument("--out", help="output folder (default: the bundle's cache)")
    p.add_argument("--n_cases", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p = command("vesselmnist", vesselmnist_cli)
    p.add_argument("npz", help="vesselmnist3d.npz (MedMNIST)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="first N cases of each split only")
    p = command("brats", brats)
    p.add_argument("--root", required=True, help="BraTS folder, one sub-folder per case")
    p.add_argument("--out", default="datalist.json")
    p.add_argument("--grades", help="name_mapping.csv (or any CSV with an id and a grade column)")
    p.add_argument("--modalities", default="all", help="all, or comma-separated such as flair,t1ce")
    p.add_argument("--grade_map", help='JSON object, e.g. \'{"HGG": 1, "LGG": 0}\'')
    p.add_argument("--id_column")
    p.add_argument("--grade_column", default="Grade")
    p.add_argument("--mask_labels", help="comma-separated label values that make the lesion, e.g. 1,4")
    p.add_argument("--validate", type=cli.boolean, default=True)
    p = command("nsclc", nsclc)
    p.add_argument("--images", required=True, help="CT NIfTI/NRRD files or one DICOM series folder per patient")
    p.add_argument("--masks", required=True, help="GTV masks (NIfTI/NRRD)")
    p.add_argument("--clinical", required=True, help="NSCLC-Radiomics-Lung1.clinical.csv")
    p.add_argument("--out", default="datalist.json")
    p.add_argument("--id_column", default="PatientID")
    p.add_argument("--stage_column", default="Overall.Stage")
    p.add_argument("--stage_map", help="JSON object, e.g. '{\"IV\": 3}'")
    p.add_argument("--mask_pattern", default="*gtv*")
    p.add_argument("--validate", type=cli.boolean, default=True)
    p = command("summary", summary)
    p.add_argument("datalist")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    result = args.pop("func")(**args)
    if result is not None:
        print(result)


if __name__ == "__main__":
    main()
