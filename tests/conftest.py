"""Shared fixtures: a tiny on-disk cohort (real NIfTI files + datalist) built by the bundle's own generator."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """12 cases of 36³ (9 necrotic : 3 homogeneous), written as NIfTI with a datalist; returns the datalist path."""
    from scripts.data.demo_cohort import CohortSpec, generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "tiny"
    return generate_cohort(out, CohortSpec(n_cases=12, shape=(36, 36, 36), seed=3))


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return ROOT
