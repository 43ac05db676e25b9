"""What every pretraining trainer shares (Ignite glue): the device, precision, layout and compile set-up of one network.

``PretrainTrainer`` is MONAI's ``Trainer`` with the set-up that the 3DSiam trainer (``simsiam_trainer``) and the
Rubik's cube trainer (``rubik``) need alike: a refusal of a loader that yields no batch, the channels-last-3d layout,
``torch.compile`` in place, fp16 AMP on CUDA with a checkpointable ``GradScaler``, bf16 on CPUs with native bf16,
and ``run`` keeping that scaler. Subclasses write ``_iteration`` (through ``scripts.pretrain.step``) and register
their own epoch events before calling ``_register_handlers``, so their metrics exist when the handlers read them.
"""

from __future__ import annotations

import torch
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch.utils.data import DataLoader

from scripts.config_utils import as_bool
from scripts.pretrain.step import compile_backend, step_autocast, uses_cpu_bf16


class PretrainTrainer(Trainer):
    """A ``Trainer`` of ``network`` with ``optimizer``; ``empty_hint`` says how to fix an empty loader.

    ``channels_last``: NDHWC, oneDNN's fast 3D convolution layout on CPU (the weights follow). ``cpu_bf16``: bf16
    autocast on the CPU (``auto``: only with native bf16 instructions). ``torch_compile``: false, true (Inductor) or
    a backend's name; compiled in place, so state-dict keys, checkpoints and the encoder export stay unchanged.
    ``amp``: fp16 autocast and a ``GradScaler`` on CUDA (``self.scaler``, checkpointed by the handlers).
    """

    def __init__(
        self,
        *,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        amp: bool = False,
        channels_last: bool = False,
        cpu_bf16: bool | str = False,
        torch_compile: bool | str = False,
        empty_hint: str = "lower batch_size",
    ) -> None:
        if hasattr(train_data_loader, "__len__") and len(train_data_loader) == 0:
            dataset = getattr(train_data_loader, "dataset", [])
            raise ValueError(
                f"the training loader yields no batch: {len(dataset)} cases < batch size "
                f"{getattr(train_data_loader, 'batch_size', '?')} with drop_last; {empty_hint}"
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length or len(train_data_loader),
            non_blocking=non_blocking,
            iteration_update=None,
            handlers=None,
            amp=amp,
            decollate=False,
        )  # subclasses attach the handlers at the end, once the AMP scaler they checkpoint exists
        self.channels_last = as_bool(channels_last, "channels_last")
        self.cpu_bf16 = uses_cpu_bf16(cpu_bf16, device)
        if self.channels_last:
            network.to(memory_format=torch.channels_last_3d)
        self.compile_backend = compile_backend(torch_compile)
        if self.compile_backend:
            network.compile(backend=self.compile_backend)
        self.network = network
        self.optimizer = optimizer
        self.amp = as_bool(amp, "amp") and torch.device(device).type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def run(self) -> None:  # keep our own GradScaler (checkpointed) instead of Trainer.run's fresh one
        Workflow.run(self)

    def _autocast(self, device) -> torch.autocast:
        """fp16 AMP on CUDA (``amp``); bf16 on a CPU with native bf16 instructions (``cpu_bf16``); else fp32."""
        return step_autocast(device, self.amp, self.cpu_bf16)
