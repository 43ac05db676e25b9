"""The one-command pipeline (pretrain -> embed -> radiomics -> supervised -> report) on a small on-disk cohort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """24 cases of 36³ (18:6): enough for 3-fold CV with a 20% validation split inside each training fold."""
    from scripts.demo_cohort import CohortSpec, generate_cohort

    return generate_cohort(
        tmp_path_factory.mktemp("cohort") / "small", CohortSpec(n_cases=24, shape=(36, 36, 36), seed=5)
    )


def _pipeline(out: Path, datalist: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "scripts.pipeline",
        "--out", str(out), "--datalist", str(datalist),
        "--modes", "plain,se", "--epochs", "1", "--seeds", "0", "--balance#warmup_epochs", "0", "--supervised#epochs", "1",
        "--roi_size", "[28,28,28]", "--num_workers", "0", "--batch_size", "4",
        "--balance#q", "2", "--balance#m", "4",
        "--n_folds", "3", "--label_fractions", "[1.0]", "--n_bootstrap", "50", "--radiomics_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_pipeline_writes_the_report_and_resumes(small_cohort, tmp_path):
    out = tmp_path / "run"
    _pipeline(out, small_cohort)
    results = json.loads((out / "report" / "results.json").read_text())
    rows = results["rows"]
    for name in ("trad", "ssl (plain)", "ssl (se)", "trad+ssl (plain)", "trad+ssl (se)", "supervised (weighted CE)"):
        assert name in rows, f"{name} missing from the report rows {sorted(rows)}"
    report = (out / "report" / "report.md").read_text()
    assert "supervised (weighted CE)" in report and "ssl (se)" in report
    assert list((out / "se" / "models").glob("model.pt"))
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) >= {"pretrain_plain", "pretrain_se", "embed_plain", "embed_se", "radiomics", "evaluate"}

    again = _pipeline(out, small_cohort)  # a rerun finds every stage done
    assert again.stdout.count("skipped") == len(stages)
