"""Rubik's cube pretraining (scripts.pretrain.rubik, configs/rubik.json): puzzle, heads, bundle workflow, resume, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.pretrain.networks import Encoder3D
from scripts.pretrain.rubik import (
    _CELLS,
    MAX_ROTATION_DISTINCT,
    N_CUBES,
    RubikNet,
    cell_parity,
    make_puzzle,
    min_hamming_distance,
    permutation_set,
    pretext_correct,
    rotate_cube,
    rubik_loss,
)

ROOT = Path(__file__).resolve().parent.parent
SEED_BOTH_ORDERS = 0
RUN = {"width": 8, "P": 8, "batch": 4, "epochs": 9, "warmup": 2, "lr": 1e-3}  # the learning test's short run


def test_permutation_set_is_deterministic_distinct_and_spread():
    perms = permutation_set(24)
    assert torch.equal(perms, permutation_set(24)) and perms.shape == (24, N_CUBES)
    assert perms[0].tolist() == list(range(N_CUBES))  # the identity is row 0
    assert all(sorted(p) == list(range(N_CUBES)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 24
    assert min_hamming_distance(perms) >= 6  # greedy max-min Hamming: far apart, unlike 24 random ones
    assert min_hamming_distance(permutation_set(24, rotation_distinct=False)) >= 7
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_set(1)
    with pytest.raises(ValueError, match="parity pattern"):
        permutation_set(MAX_ROTATION_DISTINCT + 1)


def test_rotation_distinct_set_leaves_no_two_puzzles_alike_up_to_cube_turns():
    """A 180-degree turn moves a cube's inner corner to a cell of the same parity; on an orientation-free ROI two
    permutations with the same parity in every slot are one puzzle. The plain greedy set is full of them (its rows
    1-7 are the identity's cells XOR a constant, rows 3, 5, 6 the whole volume turned by 180 degrees)."""
    plain = permutation_set(8, rotation_distinct=False)
    assert all(plain[t].tolist() == [c ^ t for c in range(N_CUBES)] for t in range(8))
    for perms, distinct in ((permutation_set(MAX_ROTATION_DISTINCT), True), (permutation_set(100, False), False)):
        patterns = {tuple(cell_parity(p).tolist()) for p in perms}
        assert (len(patterns) == len(perms)) is distinct


def test_every_slot_shows_a_crop_of_the_named_cell_turned_as_labelled():
    """Label consistency with gaps: undoing a slot's labelled rotation gives exactly a block of the volume that lies
    inside the grid cell the permutation names, and no other rotation class does."""
    x = torch.arange(2 * 32**3, dtype=torch.float32).reshape(2, 1, 32, 32, 32)  # every voxel value unique
    perms = permutation_set(8)
    pz = make_puzzle(x, perms, torch.Generator().manual_seed(5), cube_size=14, gap=0.125)  # 14^3 crops, no resize
    assert pz.rotation.unique().numel() == 4 and pz.order.numel() == 2
    for i in range(2):
        for slot in range(N_CUBES):
            cell = int(perms[pz.order[i], slot])
            cube = pz.cubes[i, slot, 0]
            for r in range(4):
                undone = rotate_cube(cube, r)
                flat = int(undone[0, 0, 0]) - i * 32**3
                start = (flat // 32**2, (flat // 32) % 32, flat % 32)
                block = x[i, 0, start[0] : start[0] + 14, start[1] : start[1] + 14, start[2] : start[2] + 14]
                inside = all(16 * b <= s0 and s0 + 14 <= 16 * b + 16 for s0, b in zip(start, _CELLS[cell]))
                matches = block.shape == undone.shape and torch.equal(block, undone)
                assert (matches and inside) == (r == int(pz.rotation[i, slot])), (i, slot, r, start, cell)


def test_puzzle_answers_reassemble_the_volume_and_depend_only_on_the_generator():
    x = torch.arange(2 * 16**3, dtype=torch.float32).reshape(2, 1, 16, 16, 16)
    perms = permutation_set(6)
    pz = make_puzzle(x, perms, torch.Generator().manual_seed(3), cube_size=8, gap=0.0)  # no gap, no resize
    assert pz.cubes.shape == (2, N_CUBES, 1, 8, 8, 8)
    again = make_puzzle(x, perms, torch.Generator().manual_seed(3), cube_size=8, gap=0.0)
    assert torch.equal(pz.cubes, again.cubes) and torch.equal(pz.rotation, again.rotation)
    for i in range(2):  # undo each slot's rotation and put the cube back in the cell the answer names
        rebuilt = torch.zeros_like(x[i])
        for slot in range(N_CUBES):
            cell = int(perms[pz.order[i], slot])
            d, h, w = (cell >> 2) & 1, (cell >> 1) & 1, cell & 1
            cube = rotate_cube(pz.cubes[i, slot], int(pz.rotation[i, slot]))  # 180-degree turns are involutions
            rebuilt[:, 8 * d : 8 * d + 8, 8 * h : 8 * h + 8, 8 * w : 8 * w + 8] = cube
        assert torch.equal(rebuilt, x[i])
    big = make_puzzle(torch.rand(1, 1, 32, 32, 32), perms, torch.Generator().manual_seed(0))
    assert big.cubes.shape[-3:] == (27, 27, 27)  # 16^3 cells -> 14^3 cubes with gaps -> resized to the encoder's 27


def test_rotations_are_proper_and_distinct():
    x = torch.rand(1, 5, 6, 7)
    outs = [rotate_cube(x, r) for r in range(4)]
    assert all(o.shape == x.shape for o in outs)
    assert len({o.flatten().tolist().__str__() for o in outs}) == 4
    assert torch.equal(rotate_cube(rotate_cube(x, 1), 2), rotate_cube(x, 3))  # the Klein four-group


def _workflow(tmp: Path, datalist: Path, **override) -> ConfigWorkflow:
    args = dict(
        bundle_root=str(tmp),
        datalist=str(datalist),
        cache_dir=str(tmp / "cache"),
        num_workers=0,
        epochs=2,
        batch_size=2,
        steps_per_epoch=1,
        knn_monitor=False,
        **{"encoder_def#width": 16, "rubik#n_permutations": 4, "rubik#hidden_dim": 32},
    )
    args.update(override)
    return ConfigWorkflow(
        workflow_type="train",
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "rubik.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **args,
    )


def _run(wf: ConfigWorkflow) -> None:
    wf.initialize()
    wf.run()
    wf.finalize()


def test_rubik_workflow_exports_the_encoder_logs_accuracy_and_resumes_exactly(tiny_cohort, tmp_path):
    straight = tmp_path / "straight"
    wf = _workflow(straight, tiny_cohort)
    _run(wf)
    state = torch.load(straight / "models" / "model.pt", weights_only=True)
    Encoder3D(in_channels=1, width=16, out_bn=True).load_state_dict(
        state, strict=True
    )  # flat encoder keys, as 3DSiam exports
    ckpt = torch.load(straight / "models" / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)
    assert any(k.startswith("order_head.") for k in ckpt["network"])
    rows = json.loads((straight / "eval" / "training_log.json").read_text(encoding="utf-8"))["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["rubik/order_accuracy"] <= 1.0 and 0.0 <= r["rubik/rotation_accuracy"] <= 1.0
        assert 0.0 < r["collapse_std"] < 1.0 and r["loss_mean"] > 0

    split = tmp_path / "split"
    _run(_workflow(split, tiny_cohort, **{"train#trainer#max_epochs": 1}))
    wf = _workflow(split, tiny_cohort, resume=True)
    _run(wf)
    assert wf.trainer.state.epoch == 2
    resumed = torch.load(split / "models" / "model.pt", weights_only=True)
    for key in state:
        torch.testing.assert_close(state[key], resumed[key], rtol=0, atol=1e-6, msg=f"{key} differs after resume")


def _failure_chain(wf) -> list[str]:
    """Messages of the exception (and its causes) raised when the workflow is set up and run."""
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.run()
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    return chain


def test_rubik_trainer_refuses_a_simsiam_network(tiny_cohort, tmp_path):
    wf = _workflow(
        tmp_path,
        tiny_cohort,
        network_def={"_target_": "scripts.pretrain.networks.SimSiam3D", "encoder": "@encoder_def"},
    )
    chain = _failure_chain(wf)
    assert any("RubikTrainer trains a scripts.pretrain.rubik.RubikNet" in m for m in chain), chain


def test_pipeline_runs_rubik_as_a_pretraining_mode(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "scripts.run.pipeline", "--out", str(tmp_path / "dry"), "--modes", "plain,rubik"]
    cmd += ["--supervised", "false", "--dry_run", "true"]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((tmp_path / "dry" / "args" / "pretrain_rubik.json").read_text(encoding="utf-8"))
    assert [Path(c).name for c in args["config_file"]] == ["train.json", "demo.json", "rubik.json"]
    plain = json.loads((tmp_path / "dry" / "args" / "pretrain_plain.json").read_text(encoding="utf-8"))
    assert [Path(c).name for c in plain["config_file"]] == ["train.json", "demo.json"]
    tables = json.loads((tmp_path / "dry" / "args" / "evaluate.json").read_text(encoding="utf-8"))["tables"]
    assert {"ssl (plain)", "ssl (rubik)", "trad+ssl (rubik)", "trad"} <= set(tables)


def test_rubik_fits_a_fixed_set_of_puzzles():
    """End-to-end check of the heads, loss and labels: a fixed batch of puzzles is learnt (memorised) in a few steps.

    Not a claim about generalisation: on fresh puzzles the task needs far longer runs than a test allows (see
    docs/rubik_and_report.md for the measured training curve)."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1, 1) * 255
    perms = permutation_set(2)
    pz = make_puzzle(x, perms, torch.Generator().manual_seed(SEED_BOTH_ORDERS))  # 2 puzzles of one volume
    assert set(pz.order.tolist()) == {0, 1}  # both permutations: the order head has something to tell apart
    net = RubikNet(Encoder3D(width=16), n_permutations=2, hidden_dim=64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        order_logits, rotation_logits, _ = net(pz.cubes)
        loss, _, _ = rubik_loss(order_logits, rotation_logits, pz.order, pz.rotation)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    n_order, n_rot = pretext_correct(order_logits.detach(), rotation_logits.detach(), pz.order, pz.rotation)
    assert losses[-1] < 0.5 * losses[0], losses
    assert n_order == 2 and n_rot >= 14, (n_order, n_rot, losses)


def test_rubik_refuses_balancing_modes(tiny_cohort, tmp_path):
    wf = _workflow(tmp_path, tiny_cohort, **{"balance#mode": "re"})
    chain = _failure_chain(wf)
    assert any("has no RE/SE/bank balancing" in m for m in chain), chain


def _training_rois(datalist: Path) -> torch.Tensor:
    """The cohort's training ROIs [N, 1, 32, 32, 32] through the bundle's own deterministic transforms, on the whole
    box: with the default's lesion context the sub-cubes beyond the lesion margin are empty and their rotation
    cannot be told (measured: rotation accuracy 0.245, chance 0.25), which is not what this test is about."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "data" / "demo.json")])
    parser["datalist"] = str(datalist)
    parser["context_transforms"] = []
    chain = Compose(parser.get_parsed_content("deterministic_transforms"))
    return torch.stack([chain(dict(item))["image"] for item in parser.get_parsed_content("train#data")])


@torch.no_grad()
def _fresh_puzzle_accuracy(net: RubikNet, rois: torch.Tensor, seed: int) -> tuple[float, float]:
    """Order and rotation accuracy on unseen full-difficulty puzzles of ``rois``, BatchNorm on batch statistics as
    in training (nothing is updated but BN's running averages, which these numbers do not use)."""
    g, n_order, n_rot = torch.Generator().manual_seed(seed), 0, 0
    perms = net.permutations()
    net.train()
    for _ in range(4):  # 4 puzzles per case
        for part in rois.split(RUN["batch"]):
            pz = make_puzzle(part, perms, g)
            o, r, _ = net(pz.cubes)
            a, b = pretext_correct(o, r, pz.order, pz.rotation)
            n_order, n_rot = n_order + a, n_rot + b
    return n_order / (4 * len(rois)), n_rot / (4 * len(rois) * N_CUBES)


def test_rubik_learns_its_pretext_task(tiny_cohort):
    """A short real run (Ignite RubikTrainer, rotation warm-up, then Zhuang's full task) on the cohort's ROIs: on
    fresh full-difficulty puzzles of the training cases, order accuracy ends well above chance and above the
    untrained network's. Broken labels, heads or a set of look-alike permutations keep it near chance."""
    threads = torch.get_num_threads()
    # the end accuracy depends on the thread count (float reduction order): order accuracy 0.44 at 2 threads, 0.33
    # at 1. The run is pinned to CI's 2 threads, whatever the machine's cores or an earlier test left set
    torch.set_num_threads(2)
    try:
        _rubik_short_run(tiny_cohort)
    finally:
        torch.set_num_threads(threads)


def _rubik_short_run(tiny_cohort) -> None:
    from torch.utils.data import DataLoader

    from scripts.pretrain.rubik import RubikTrainer

    torch.manual_seed(0)
    rois = _training_rois(tiny_cohort)
    net = RubikNet(Encoder3D(width=RUN["width"], out_bn=True), n_permutations=RUN["P"], hidden_dim=128)
    before = _fresh_puzzle_accuracy(net, rois, seed=99)
    loader = DataLoader([{"image": r} for r in rois], batch_size=RUN["batch"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    trainer = RubikTrainer(
        device="cpu", max_epochs=RUN["epochs"], train_data_loader=loader, network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=RUN["lr"]), rotation_warmup_epochs=RUN["warmup"],
        eval_volumes=0, channels_last=True, seed=0,
    )  # fmt: skip
    trainer.run()
    assert trainer.state.metrics["rubik/rotation_prob"] == 1.0  # the last epochs played Zhuang's full task
    after = _fresh_puzzle_accuracy(net, rois, seed=99)
    chance = 1 / RUN["P"]
    print(f"pretext accuracy before/after (order chance {chance:.3f}, rotation 0.25): {before} -> {after}")
    assert after[0] > 3 * chance and after[0] > before[0] + 0.2, (before, after)
    assert after[1] > before[1], (before, after)
