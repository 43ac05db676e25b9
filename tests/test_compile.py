"""``torch_compile``: the training step compiled in place gives the eager step's losses and the same checkpoints.

The tests use the "aot_eager" backend: it runs Dynamo's graph capture and AOTAutograd (where a step that cannot be
compiled, or a state dict renamed by ``torch.compile``'s wrapper, would show) without Inductor's code generation,
which takes minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D
from scripts.pretrain.simsiam_trainer import SimSiamTrainer
from scripts.pretrain.step import compile_backend
from tests.workflows import train_workflow


def test_compile_backend_reads_booleans_and_backend_names_and_refuses_others():
    assert compile_backend(False) is None and compile_backend("false") is None and compile_backend(0) is None
    assert compile_backend(True) == "inductor" and compile_backend("true") == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match=r"torch_compile must be true, false or a torch.compile backend .*'fastest'"):
        compile_backend("fastest")


def _losses(torch_compile) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    network = SimSiam3D(Encoder3D(width=2, out_dim=16, hidden_dim=16), Predictor(dim=16, hidden_dim=8))
    g = torch.Generator().manual_seed(1)
    batches = [
        {"image": torch.rand(4, 1, 27, 27, 27, generator=g), "image_2": torch.rand(4, 1, 27, 27, 27, generator=g)}
    ]
    trainer = SimSiamTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=batches * 2,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
        cpu_bf16=False,
        torch_compile=torch_compile,
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses, network.state_dict()


def test_a_compiled_step_trains_like_the_eager_one_and_keeps_the_state_dict_keys():
    eager_losses, eager_state = _losses(False)
    compiled_losses, compiled_state = _losses("aot_eager")
    assert len(compiled_losses) == len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert list(compiled_state) == list(eager_state)  # no "_orig_mod." prefix: checkpoints load into eager networks
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5)


def test_train_json_passes_torch_compile_to_the_trainer(tmp_path, tiny_cohort):
    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, knn_monitor=False, torch_compile="aot_eager")
    wf.initialize()
    assert wf.parser.get_parsed_content("train#trainer").compile_backend == "aot_eager"
    wf = train_workflow(tmp_path, tiny_cohort, epochs=1, batch_size=4, knn_monitor=False)
    wf.initialize()
    assert wf.parser.get_parsed_content("train#trainer").compile_backend is None  # eager by default
