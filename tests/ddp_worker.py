"""Run by ``torchrun --nproc_per_node=2`` from tests/test_distributed.py (not collected by pytest).

Each rank holds half of a fixed global batch, runs the bundle's DDP helpers and the RE/SE decision, and saves
what it saw to ``OUT/rank<r>.pt`` for the test to compare with the single-process result.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from scripts import distributed
from scripts.pretrain.balance import balance_step
from scripts.pretrain.losses import weighted_mean


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """12 rows in 3 blobs of 6:4:2 (rows interleaved so every rank holds some of each), plus regression targets."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [6.0] * 8, [-6.0] * 8])
    blob = torch.tensor([0, 1, 0, 2, 0, 1, 0, 1, 0, 2, 0, 1])
    x = centres[blob] + 0.3 * torch.randn(12, 8, generator=g)
    y = torch.randn(12, generator=g)
    return x, y


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    r, n_local = dist.get_rank(), 6
    x, y = global_batch()
    x_local, y_local = x[r * n_local : (r + 1) * n_local], y[r * n_local : (r + 1) * n_local]
    ids = distributed.all_gather_list([f"case{r * n_local + i}" for i in range(n_local)])

    # SE: cluster the gathered batch, agree on the selection, share the selected rows out evenly
    emb = distributed.all_gather_rows(x_local)
    se = balance_step(emb, "se", k=3, m=4, seed=5)
    chosen = distributed.broadcast_from_rank0(se.indices)
    mine = distributed.rows_for_this_rank(x_local, chosen)

    # RE: this rank's share of the global weighted mean, through a real DDP model
    re = balance_step(emb, "re", k=3, seed=5)
    w_local = distributed.local_rows(re.weights, n_local)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    per_sample = (model(x_local).squeeze(1) - y_local) ** 2
    loss = weighted_mean(per_sample, w_local) * distributed.global_weight_scale(w_local)
    loss.backward()
    torch.save(
        {
            "ids": ids,
            "emb": emb,
            "se_indices": chosen,
            "se_rows": mine,
            "re_weights": re.weights,
            "grad": [p.grad.clone() for p in model.module.parameters()],
        },
        f"{out_dir}/rank{r}.pt",
    )
    distributed.shutdown()  # not destroy_process_group alone: see its docstring


if __name__ == "__main__":
    main(sys.argv[1])
