"""Cohort commands: ``python -m scripts.datasets <command> ...`` (a fire CLI).

validate DATALIST [--profile configs/data/demo.json]   every problem, one line each; exit 1 if any
demo [--out DIR] [--n_cases 120] [--seed 0]           write the embedded default cohort (NIfTI + datalist)
vesselmnist NPZ --out DIR [--limit N]                 MedMNIST VesselMNIST3D npz -> NIfTI cohort + datalist (resumable)
brats --root DIR [--grades CSV] --out datalist.json     BraTS 2018-2021 folder -> validated datalist (+ table, exclusions)
      [--modalities all|flair|flair,t1ce] [--grade_map '{"HGG": 1, "LGG": 0}'] [--mask_labels 1,4] [--validate false]
nsclc --images DIR --masks DIR --clinical CSV --out datalist.json
      [--stage_map '{"IV": 3}'] [--mask_pattern '*GTV-1*'] [--id_column PatientID] [--stage_column Overall.Stage]
summary DATALIST                                        class x centre table + excluded cases (printed and written)

The builders and the summary live in scripts/cohorts.py; these are thin command-line wrappers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

from scripts import cohorts
from scripts.config_utils import as_bool
from scripts.datalist import read_datalist_doc, validate_datalist
from scripts.demo_cohort import ensure_demo_cohort
from scripts.vesselmnist import cli as vesselmnist_cli


def _label_map(profile: str | None, label_map: dict | str | None) -> dict | None:
    if label_map is not None:
        return json.loads(label_map) if isinstance(label_map, str) else dict(label_map)
    if profile:
        return json.loads(Path(profile).read_text(encoding="utf-8")).get("label_map")
    return None


def validate(datalist: str, profile: str | None = None, label_map: dict | str | None = None) -> None:
    """Print one line per problem (case id, file, problem) and exit 1 when there is any; a summary line when clean."""
    problems = validate_datalist(datalist, label_map=_label_map(profile, label_map))
    if problems:
        for p in problems:
            print(p)
        n_cases = len({p.case_id for p in problems})
        print(f"{len(problems)} problem(s) in {n_cases} case(s) of {datalist}", file=sys.stderr)
        sys.exit(1)
    doc = read_datalist_doc(datalist)  # a UTF-8 byte-order mark is fine
    n = sum(len(doc.get(s, [])) for s in ("training", "validation", "testing"))
    print(f"OK: {n} cases in {datalist}, no problems found")


def demo(out: str | None = None, n_cases: int = 120, seed: int = 0) -> str:
    """Generate (or reuse) the embedded default cohort and print its datalist path."""
    return ensure_demo_cohort(out, n_cases=n_cases, seed=seed)


def _names(value) -> list[str]:
    """'flair,t1' / ('flair', 't1') / 'flair' -> a list (fire turns `a,b` into a tuple)."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")


def _mapping(value, what: str) -> dict | None:
    """A dict from fire (it parses `{HGG: 1}`) or a JSON string; None stays None."""
    if value is None or isinstance(value, dict):
        return value
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
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


def main() -> None:
    fire.Fire(
        {
            "validate": validate,
            "demo": demo,
            "vesselmnist": vesselmnist_cli,
            "brats": brats,
            "nsclc": nsclc,
            "summary": summary,
        }
    )


if __name__ == "__main__":
    main()
