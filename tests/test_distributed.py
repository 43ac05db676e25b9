"""DDP on CPU with 2 gloo processes (torchrun): the RE/SE decision is global and identical on every rank, the
loss weighting equals the single-process weighted mean, and the bundle's multi_gpu_train.json trains end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.pretrain.balance import balance_step
from scripts.pretrain.losses import weighted_mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ddp_worker import global_batch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_two_ranks_agree_on_the_global_re_se_decision(tmp_path):
    _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    x, y = global_batch()
    # both ranks clustered the whole global batch, in rank order, and know every case id
    torch.testing.assert_close(r0["emb"], x)
    torch.testing.assert_close(r1["emb"], x)
    assert r0["ids"] == r1["ids"] == [f"case{i}" for i in range(12)]
    # SE: the same selection everywhere, equal to the single-process one, split evenly without overlap
    single = balance_step(x, "se", k=3, m=4, seed=5)
    assert r0["se_indices"].tolist() == r1["se_indices"].tolist() == single.indices.tolist()
    assert r0["se_rows"].shape[0] == r1["se_rows"].shape[0] == 2
    torch.testing.assert_close(torch.cat([r0["se_rows"], r1["se_rows"]]), x[single.indices])
    # RE: DDP-averaged gradients equal the gradient of the single-process weighted mean over the global batch
    weights = balance_step(x, "re", k=3, seed=5).weights
    torch.testing.assert_close(r0["re_weights"], weights)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    weighted_mean((model(x).squeeze(1) - y) ** 2, weights).backward()
    for g_single, g0, g1 in zip([p.grad for p in model.parameters()], r0["grad"], r1["grad"]):
        torch.testing.assert_close(g0, g1)
        torch.testing.assert_close(g0, g_single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["se", "re", "bank"])
def test_multi_gpu_config_trains_with_two_gloo_processes(tiny_cohort, tmp_path, mode):
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    proc = _torchrun(
        [
            "-m", "monai.bundle", "run", "training",
            "--config_file", configs,
            "--meta_file", "configs/metadata.json",
            "--logging_file", "configs/logging.conf",
            "--bundle_root", str(tmp_path),
            "--datalist", str(tiny_cohort),
            "--cache_dir", str(tmp_path / "cache"),
            "--roi_size", "[28,28,28]",
            "--epochs", "2",
            "--batch_size", "4",
            "--num_workers", "0",
            "--balance#mode", mode,
            "--balance#q", "2",
            "--balance#m", "4",
        ]
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert "epoch 2 balance diagnostics" in log, log[-3000:]
    # rank 0 alone writes the encoder, the checkpoints and the TensorBoard events
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert "fc8.weight" in state
    assert sorted(p.name for p in (tmp_path / "models" / "checkpoints").iterdir()) == [
        "checkpoint_epoch=1.pt",
        "checkpoint_epoch=2.pt",
        "model_best.input.json",
        "model_best.pt",  # rank 0 alone validates (no cross-rank gather in the read-out) and keeps the best encoder
        "model_init.input.json",
        "model_init.pt",
        "run.json",  # the run's training inputs, which a resume is checked against
    ]
    assert len(list((tmp_path / "eval" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    if mode == "bank":  # the bank (rows of both ranks) and its clusters are in the checkpoint
        bank = torch.load(tmp_path / "models" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)["bank"]
        assert bool(bank["seen"].all()) and bool((bank["assignments"] >= 0).all())
        assert "balance/bank_ari" in log
    assert not (ROOT / "runs").exists()


def test_reshuffling_sampler_draws_a_new_order_per_pass_and_replays_after_set_epoch():
    from scripts.distributed import ReshufflingDistributedSampler

    data = list(range(20))
    ranks = [ReshufflingDistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(4)
    first = [list(s) for s in ranks]
    second = [list(s) for s in ranks]
    assert sorted(first[0] + first[1]) == data and sorted(second[0] + second[1]) == data  # a partition each pass
    assert first != second  # a new permutation for the second pass of the same epoch
    for s in ranks:
        s.set_epoch(4)
    assert [list(s) for s in ranks] == first  # resume-exact: the pass count restarts with the epoch
