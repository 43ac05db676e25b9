"""Cohort commands: ``python -m scripts.datasets <command> ...`` (a fire CLI).

validate DATALIST [--profile configs/data/demo.json]   every problem, one line each; exit 1 if any
demo [--out DIR] [--n_cases 120] [--seed 0]           write the embedded default cohort (NIfTI + datalist)
vesselmnist NPZ --out DIR [--limit N]                 MedMNIST VesselMNIST3D npz -> NIfTI cohort + datalist (resumable)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

from scripts.datalist import validate_datalist
from scripts.demo_cohort import ensure_demo_cohort
from scripts.vesselmnist import cli as vesselmnist_cli


def _label_map(profile: str | None, label_map: dict | str | None) -> dict | None:
    if label_map is not None:
        return json.loads(label_map) if isinstance(label_map, str) else dict(label_map)
    if profile:
        return json.loads(Path(profile).read_text()).get("label_map")
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
    doc = json.loads(Path(datalist).read_text())
    n = sum(len(doc.get(s, [])) for s in ("training", "validation", "testing"))
    print(f"OK: {n} cases in {datalist}, no problems found")


def demo(out: str | None = None, n_cases: int = 120, seed: int = 0) -> str:
    """Generate (or reuse) the embedded default cohort and print its datalist path."""
    return ensure_demo_cohort(out, n_cases=n_cases, seed=seed)


def main() -> None:
    fire.Fire({"validate": validate, "demo": demo, "vesselmnist": vesselmnist_cli})


if __name__ == "__main__":
    main()
