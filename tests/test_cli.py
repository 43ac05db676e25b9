"""Every command line prints its usage for --help/-h and exits 0 without side effects, and refuses an unknown or
misspelt option (exit 2, naming it) before doing any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(ROOT.glob("benchmarks/*.py"))
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _tree() -> dict[str, float]:
    """Every file of the repository (caches and the venv aside) with its modification time."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for f in files:
            p = os.path.join(folder, f)
            out[p] = os.stat(p).st_mtime_ns
    return out


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_all(cmds: list[list[str]], cwd: Path) -> list[tuple[list[str], int, str, str]]:
    """Run the commands side by side (each is a cold Python start) and return (cmd, rc, stdout, stderr)."""
    procs = [(c, _start(c, cwd)) for c in cmds]
    results = []
    for c, p in procs:
        out, err = p.communicate(timeout=300)
        results.append((c, p.returncode, out, err))
    return results


def _check_help_and_refusals(tmp_path: Path, helps: list[list[str]], refusals: list[tuple[list[str], object]]) -> None:
    """``helps`` exit 0 printing a usage; each refusal exits 2 naming its option(s); nothing is written anywhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    before = _tree()
    results = _run_all(helps + [cmd for cmd, _ in refusals], cwd)
    for cmd, rc, out, err in results[: len(helps)]:
        assert rc == 0, f"{cmd}: exit {rc}\n{out[-2000:]}\n{err[-2000:]}"
        assert re.search(r"^usage: ", out, re.MULTILINE), f"{cmd} printed no usage:\n{out[-2000:]}"
    for (cmd, rc, out, err), (_, named) in zip(results[len(helps) :], refusals):
        assert rc == 2, f"{cmd} was not refused (exit {rc}):\n{out[-2000:]}\n{err[-2000:]}"
        for name in (named,) if isinstance(named, str) else named:
            assert name in err and "usage:" in err, f"{cmd}: the refusal does not name {name}:\n{err[-2000:]}"
    assert not list(cwd.iterdir()), f"wrote into the working directory: {list(cwd.iterdir())}"
    after = _tree()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"--help or a refused option changed the repository: {changed[:10]}"


def test_pipeline_help_and_unknown_options(tmp_path):
    out = str(tmp_path / "run")
    _check_help_and_refusals(
        tmp_path,
        [["-m", "scripts.run.pipeline", "--help"], ["-m", "scripts.run.pipeline", "-h", "--epochs", "3"]],
        [
            (["-m", "scripts.run.pipeline", "--out", out, "--epoch", "3"], "--epoch"),  # misspelt --epochs
            (["-m", "scripts.run.pipeline", "--out", out, "--balance#mod", "re"], "--balance#mod"),  # not a config id
            (["-m", "scripts.run.pipeline", "--out", out, "--n_folds", "3", "stray"], "stray"),
            (["-m", "scripts.run.pipeline", "--out", out, "--supervised", "maybe"], "--supervised"),
        ],
    )
    assert not (tmp_path / "run").exists()


def test_pipeline_accepts_config_ids_of_every_stage(tmp_path):
    """``--balance#mode`` (training), ``--n_folds`` (evaluation), ``--supervised#epochs``: ids of the merged configs."""
    cmd = ["-m", "scripts.run.pipeline", "--out", str(tmp_path / "dry"), "--modes", "plain", "--dry_run", "true"]
    cmd += ["--balance#q", "5", "--n_folds=3", "--supervised#epochs", "2", "--roi_size", "[28,28,28]"]
    ((_, rc, out, err),) = _run_all([cmd], tmp_path)
    assert rc == 0, err[-3000:]
    train = json.loads((tmp_path / "dry" / "args" / "pretrain_plain.json").read_text(encoding="utf-8"))
    assert train["balance#q"] == 5 and train["roi_size"] == [28, 28, 28] and "supervised#epochs" not in train
    sup = json.loads((tmp_path / "dry" / "args" / "supervised.json").read_text(encoding="utf-8"))
    assert sup["supervised#epochs"] == 2 and sup["n_folds"] == 3


def test_datasets_help_and_unknown_options(tmp_path):
    _check_help_and_refusals(
        tmp_path,
        [["-m", "scripts.data.build_cohort", "--help"], ["-m", "scripts.data.build_cohort", "validate", "-h"]],
        [
            (["-m", "scripts.data.build_cohort", "validate", "x.json", "--data_roo", "/"], "--data_roo"),
            (["-m", "scripts.data.build_cohort", "demo", "--out", str(tmp_path / "demo"), "--n_case", "3"], "--n_case"),
            (["-m", "scripts.data.build_cohort", "valdate", "x.json"], "valdate"),
        ],
    )
    assert not (tmp_path / "demo").exists()


def test_validate_takes_data_root(tiny_cohort, tmp_path):
    ok = _run_all(
        [["-m", "scripts.data.build_cohort", "validate", str(tiny_cohort), "--data_root", str(tiny_cohort.parent)]],
        ROOT,
    )
    elsewhere = _run_all(
        [["-m", "scripts.data.build_cohort", "validate", str(tiny_cohort), "--data_root", str(tmp_path)]], ROOT
    )
    (_, rc, out, err), (_, rc2, out2, err2) = ok[0], elsewhere[0]
    assert rc == 0 and "OK: 12 cases" in out, err[-2000:]
    assert rc2 == 1 and "outside the configured data root" in out2 + err2, out2 + err2


def test_package_and_sharding_help_and_unknown_options(tmp_path):
    _check_help_and_refusals(
        tmp_path,
        [
            ["-m", "scripts.run.package", "--help"],
            ["-m", "scripts.run.sharding", "-h"],
            ["-m", "scripts.run.sharding", "merge", "-h"],
        ],
        [
            (["-m", "scripts.run.package", "--outt", str(tmp_path / "dist")], "--outt"),
            (["-m", "scripts.run.package", "--ou", str(tmp_path / "dist")], "--ou"),  # abbreviations are refused too
            (["-m", "scripts.run.sharding", "merge", "t.csv", "d.json", "2", "--kinds", "radiomics"], "--kinds"),
        ],
    )
    assert not (tmp_path / "dist").exists()


def _long_options(usage: str) -> list[str]:
    return sorted(set(re.findall(r"(--[a-z][a-z0-9_-]{3,})", usage)) - {"--help"})


def test_benchmarks_help_and_unknown_options(tmp_path):
    """Each ``benchmarks/*.py``: usage for --help; an unknown option and an abbreviated one are both refused."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    helps = _run_all([[str(script), "--help"] for script in BENCHMARKS], cwd)
    refusals = []
    for script, (_, rc, out, err) in zip(BENCHMARKS, helps):
        assert rc == 0 and "usage:" in out, f"{script.name} --help: exit {rc}\n{err[-2000:]}"
        abbreviated = _long_options(out)[0][:-1]
        refusals.append(([str(script), "--no_such_option", "1", abbreviated, "1"], ("--no_such_option", abbreviated)))
    _check_help_and_refusals(tmp_path, [], refusals)
