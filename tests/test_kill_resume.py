"""Interrupted jobs (issue #7): ``kill -9`` in the middle of real runs, then resume.

* pretraining (``python -m monai.bundle run training``) killed mid-epoch 2 and resumed with ``--resume true``
  reaches bit-identical weights to an uninterrupted run (CPU, same seed, one thread each);
* radiomics extraction killed after a few cases recomputes only the cases it had not finished;
* a process killed while it rewrites a table or a checkpoint never leaves a torn file behind.

Every run is a real subprocess killed with SIGKILL (its whole process group, as a job scheduler does), at a point
read from its own output or files, so no assertion depends on sleeping for the right amount of time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from scripts.data.datalist import load_datalist
from scripts.feature_table import read_feature_table

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds; a hung child is killed and the test fails instead of hanging CI
# One thread per child: the same arithmetic order in every run (bit-identical results), and two children share the
# two CI cores without oversubscribing them.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and everything it started (it leads its own session, so its pid is the group id)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed by _finish
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    watchdog = threading.Timer(TIMEOUT, _kill_group, args=(proc,))
    watchdog.daemon = True
    watchdog.start()
    proc.watchdog = watchdog
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen) -> str:
    proc.wait()
    proc.watchdog.cancel()
    if proc.log is None:
        return proc.stdout.read() if proc.stdout else ""
    return proc.log.read_text(encoding="utf-8")


def _kill_when(proc: subprocess.Popen, pattern: str) -> str:
    """Read the child's output until a line matches ``pattern``, then kill -9 it; returns what it printed."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            _kill_group(proc)
            break
    proc.wait()
    proc.watchdog.cancel()
    text = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before {pattern!r} (rc {proc.returncode}):\n{text[-3000:]}"
    )
    return text


# ------------------------------------------------------------------------------------------------------- pretraining
def _train_cmd(bundle_root: Path, datalist: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--meta_file", "configs/metadata.json",
        "--config_file", "configs/train.json",
        "--logging_file", "configs/logging.conf",
        "--bundle_root", str(bundle_root),
        "--datalist", str(datalist),
        "--cache_dir", str(bundle_root / "cache"),
        "--roi_size", "[28,28,28]",
        "--epochs", "2",
        "--batch_size", "2",
        "--steps_per_epoch", "2",
        "--num_workers", "0",
        "--knn_monitor", "false",
        *extra,
    ]  # fmt: skip


def _same(a, b, where: str = "") -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_kill_9_mid_epoch_then_resume_reaches_the_uninterrupted_weights(tiny_cohort, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": load_datalist(tiny_cohort)[:4]}))  # 2 steps of 2 cases per epoch
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    t0 = time.perf_counter()
    reference = _start(_train_cmd(straight, datalist), straight / "log.txt")  # runs alongside the killed one
    victim = _start(_train_cmd(killed, datalist))
    # StatsHandler prints this when iteration 1 of epoch 2 is done: the job dies in the middle of epoch 2
    printed = _kill_when(victim, r"Epoch: 2/2, Iter: 1/2 ")
    assert "Saved checkpoint at epoch: 1" in printed
    ckpts = killed / "models" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"], (
        "the kill did not land in epoch 2"
    )
    for path in [*ckpts.glob("*.pt"), killed / "models" / "model.pt"]:  # nothing torn: every file loads
        torch.load(path, map_location="cpu", weights_only=True)

    resumed = _start(_train_cmd(killed, datalist, "--resume", "true"), killed / "resume_log.txt")
    resume_log, reference_log = _finish(resumed), _finish(reference)
    seconds = time.perf_counter() - t0
    assert resumed.returncode == 0, resume_log[-3000:]
    assert reference.returncode == 0, reference_log[-3000:]
    assert re.search(r"resuming from .*checkpoint_epoch=1\.pt", resume_log), resume_log[-3000:]
    assert "Epoch: 1/2" not in resume_log  # epoch 1 was not trained again

    def load(root: Path, name: str):
        return torch.load(root / "models" / name, map_location="cpu", weights_only=True)

    _same(load(straight, "model.pt"), load(killed, "model.pt"), "model.pt")
    a, b = load(straight, "checkpoints/checkpoint_epoch=2.pt"), load(killed, "checkpoints/checkpoint_epoch=2.pt")
    for part in ("network", "optimizer", "lr_scheduler"):
        _same(a[part], b[part], part)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 4  # 2 epochs x 2 steps
    print(f"kill/resume training: {seconds:.1f} s wall")


# --------------------------------------------------------------------------------------------------------- radiomics
_EXTRACT = textwrap.dedent(
    """
    import json, sys
    from scripts.data.datalist import load_datalist
    from scripts.downstream.radiomics import extract_cohort
    datalist, out, cache = sys.argv[1:4]
    result = extract_cohort(
        load_datalist(datalist), out, params_file="configs/radiomics_params.yaml", cache_dir=cache,
        num_workers=1, progress=False,
    )
    print("RESULT", json.dumps({"n_ok": result.n_ok, "n_failed": result.n_failed, "n_cached": result.n_cached}))
    """
)


def _cache_state(cache: Path) -> dict[str, tuple[int, bytes]]:
    """{entry name: (mtime_ns, content)} of the finished cache entries (temporary files excluded)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.glob("*.json")}


def test_kill_9_radiomics_then_rerun_recomputes_only_the_missing_cases(tiny_cohort, tmp_path):
    n_cases = len(load_datalist(tiny_cohort))
    out, cache = tmp_path / "eval" / "radiomics.csv", tmp_path / "cache"
    cmd = [sys.executable, "-c", _EXTRACT, str(tiny_cohort), str(out), str(cache)]
    t0 = time.perf_counter()
    victim = _start(cmd, tmp_path / "killed_log.txt")
    while len(list(cache.glob("*.json"))) < 3:  # kill once three cases are done
        assert victim.poll() is None, f"finished before it could be killed:\n{_finish(victim)[-3000:]}"
        time.sleep(0.01)
    _kill_group(victim)
    _finish(victim)
    before = _cache_state(cache)
    assert 3 <= len(before) < n_cases, f"{len(before)} of {n_cases} cases were cached when the kill landed"
    assert not out.exists(), "a killed run must not leave a table"
    for entry in before.values():  # every finished entry is complete JSON, never a torn write
        json.loads(entry[1])

    rerun = _start(cmd, tmp_path / "rerun_log.txt")
    log = _finish(rerun)
    seconds = time.perf_counter() - t0
    assert rerun.returncode == 0, log[-3000:]
    counts = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    assert counts == {"n_ok": n_cases, "n_failed": 0, "n_cached": len(before)}
    after = _cache_state(cache)
    assert len(after) == n_cases
    assert {name: after[name] for name in before} == before, "a finished case was recomputed"
    ids, columns, values, meta = read_feature_table(out)
    assert len(ids) == n_cases and len(columns) == 107 and meta["n_cached"] == len(before)
    print(f"kill/rerun radiomics: {seconds:.1f} s wall, {len(before)} of {n_cases} cases reused")


# -------------------------------------------------------------------------------------------- writes under kill -9
_REWRITE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from ignite.handlers import DiskSaver
    from scripts.io_utils import atomic_path
    from scripts.feature_table import write_feature_table
    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    saver = DiskSaver(folder, require_empty=False)  # what MONAI's CheckpointSaver writes checkpoints with
    state = {"network": {f"w{i}": torch.randn(64, 64) for i in range(40)}}
    i = 0
    while True:  # rewrite the same three files until killed; each version is complete and self-describing
        ids = [f"case{j:04d}" for j in range(2000)]
        write_feature_table(f"{folder}/table.csv", ids, ["version", *[f"f{k}" for k in range(40)]],
                            np.column_stack([np.full(2000, i), rng.normal(size=(2000, 40))]), {"version": i})
        state["version"] = torch.tensor(i)
        saver(state, "checkpoint_epoch=1.pt")
        with atomic_path(f"{folder}/model.pt") as tmp:
            torch.save(state, tmp)
        i += 1
        print("WROTE", i, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.05], ids=["kill_while_formatting", "kill_while_writing"])
def test_kill_9_while_rewriting_tables_and_checkpoints_never_leaves_a_torn_file(delay, tmp_path):
    """Killed in the middle of a rewrite loop: each file is the old or the new version, complete, never a mix.

    The kill follows the first full round by ``delay`` seconds, so it lands in different phases of the next round
    (the assertion holds wherever it lands; the delay only varies the phase).
    """
    proc = _start([sys.executable, "-c", _REWRITE, str(tmp_path)])
    seen = proc.stdout.readline()
    assert seen.strip() == "WROTE 1", seen
    time.sleep(delay)
    _kill_group(proc)
    _finish(proc)
    ids, columns, values, meta = read_feature_table(tmp_path / "table.csv")
    assert len(ids) == 2000 and len(columns) == 41
    version = values[0, 0]
    assert (values[:, 0] == version).all(), "rows from two versions in one table"
    assert meta["version"] in (version, version + 1)  # the sidecar is replaced just before its table
    for name in ("checkpoint_epoch=1.pt", "model.pt"):
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert len(state["network"]) == 40 and int(state["version"]) >= 0
