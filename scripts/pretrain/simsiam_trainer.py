"""Ignite glue for 3DSiam pretraining: the training step, shaped by a balancing strategy's hooks.

The step is plain PyTorch around the core pieces (``SimSiam3D``, ``simsiam_loss_per_sample``, ``weighted_mean``);
this module only adapts it to MONAI's ``Trainer`` so bundle handlers (checkpoints, TensorBoard, LR schedule,
stats) and ``ConfigWorkflow`` work unchanged. Balancing (none, RE, SE, bank) lives in ``scripts.pretrain.strategies``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Events
from monai.engines import Trainer

from scripts import distributed
from scripts.pretrain.device_augment import DeviceViews, step_generator
from scripts.pretrain.step import plain_tensor, simsiam_step, views_on_device
from scripts.pretrain.strategies import NoBalancing, StepContext, Strategy
from scripts.pretrain.trainer import PretrainTrainer

logger = logging.getLogger(__name__)


class SimSiamTrainer(PretrainTrainer):
    """Trains a ``SimSiam3D`` on batches ``{"image": view 1, "image_2": view 2}``.

    Device, epochs, loader, network, optimiser, AMP, layout and compile are ``PretrainTrainer``'s arguments
    (``trainer_args``); ``cpu_bf16`` defaults to ``auto`` here (native bf16 CPUs only).

    ``balancing`` (a ``scripts.pretrain.strategies.Strategy``; default: none) shapes each step through its hooks:
    the batch the step trains on, what it sees of the embeddings, the per-sample loss weights, its epoch-end work and
    the epoch's ``balance/...`` diagnostics. ``view_transform`` makes the two views of one case, for strategies that
    augment inside the step (SE). ``device_views`` (a ``scripts.pretrain.device_augment.DeviceViews``; the config's
    ``augmentation#device``) makes the views on the training device instead: the loader yields the cached ROI only,
    each step draws both views of its batch (or SE's selected cases) from a generator seeded by (``view_seed``,
    epoch, iteration, rank), so a resumed run makes the same views. ``regularizer`` (``scripts.pretrain.regularizers``; default none: the paper's
    loss) adds label-free terms on the step's features; their epoch means are logged as ``regularizer/...``.
    The step's output dict holds the loss, the per-sample losses, the weights and the
    detached ``z1`` used by the collapse monitor. A non-finite loss raises ``FloatingPointError`` before the
    optimiser step, so the last checkpoint stays good.
    """

    def __init__(
        self,
        *,
        train_handlers: Sequence | None = None,
        view_keys: tuple[str, str] = ("image", "image_2"),
        balancing: Strategy | None = None,
        view_transform: Callable[[dict], dict] | None = None,
        device_views: DeviceViews | None = None,
        view_seed: int = 0,
        summary_writer=None,
        regularizer: Callable | None = None,
        cpu_bf16: bool | str = "auto",
        **trainer_args,
    ) -> None:
        super().__init__(
            cpu_bf16=cpu_bf16,
            empty_hint="SE's candidate batch is k*q: lower balance#k/balance#q or batch_size",
            **trainer_args,
        )
        self.view_keys = view_keys
        self.view_transform = view_transform
        self.device_views = device_views
        self.view_seed = int(view_seed)
        self.summary_writer = summary_writer
        self.regularizer = regularizer
        self._penalties: dict[str, list[float]] = {}
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: self._penalties.clear())
        self.balancing = balancing if balancing is not None else NoBalancing()
        self.balancing.attach(self.context())
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: self.balancing.epoch_started(self.context()))
        # before the checkpoint handlers save the strategy's state
        self.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: self.balancing.epoch_completed(self.context()))
        self.add_event_handler(Events.EPOCH_COMPLETED, self._log_diagnostics)  # before StatsHandler reads metrics
        if train_handlers:
            self._register_handlers(train_handlers)

    def context(self) -> StepContext:
        """What the balancing strategy may see of this trainer now (``scripts.pretrain.strategies.StepContext``)."""
        epoch, iteration = int(self.state.epoch or 0), int(self.state.iteration or 0)
        return StepContext(
            epoch=epoch,
            iteration=iteration,
            device=self.state.device,
            embed=self.embed_originals,
            make_views=self.view_transform if self.device_views is None else self._case_views(epoch, iteration),
        )

    def _case_views(self, epoch: int, iteration: int) -> Callable[[dict], dict]:
        """``make_views`` on the training device: the two views of one case ``{"image": x}`` [C, D, H, W], drawn
        from this step's generator (successive cases continue its stream)."""
        generator = step_generator(self.view_seed, epoch, iteration, distributed.rank())
        device = self.state.device

        def make_views(case: dict) -> dict:
            x = plain_tensor(case["image"]).to(device).unsqueeze(0)
            return {"image": self.device_views(x, generator)[0], "image_2": self.device_views(x, generator)[0]}

        return make_views

    def _views_on_device(self, ctx: StepContext, batch: dict) -> dict:
        """The batch with both views made on the training device from its ROI (``image``), which stays as
        ``image_0`` (the un-augmented original that RE's paper-exact variant embeds)."""
        x = plain_tensor(batch[self.view_keys[0]]).to(ctx.device, non_blocking=self.non_blocking)
        v1, v2 = self.device_views.two_views(x, self.view_seed, ctx.epoch, ctx.iteration, distributed.rank())
        return {**batch, "image_0": x, self.view_keys[0]: v1, self.view_keys[1]: v2}

    @torch.no_grad()
    def embed_originals(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Embeddings of un-augmented volumes from the current encoder (eval mode: BN statistics untouched),
        gathered from every rank.

        On CPU the volumes go through in chunks of ``chunk`` (SE's m): SE's 30 volumes in one batch were 28% slower
        than five batches of 6 (measured at 32³, 2 threads: large activations cost more in page faults than they
        save)."""
        encoder = distributed.unwrap(self.network).encoder
        was_training = encoder.training
        encoder.eval()
        chunk = max(1, int(chunk)) if x.device.type == "cpu" else x.shape[0]
        with self._autocast(x.device):
            z = torch.cat([encoder(part) for part in x.split(chunk)])
        encoder.train(was_training)
        return distributed.all_gather_rows(z.float())

    def _log_diagnostics(self, engine: Trainer) -> None:
        """The strategy's epoch diagnostics and the regularizer's mean terms into the epoch metrics, the log and
        TensorBoard (rank 0)."""
        balance = self.balancing.diagnostics()
        terms = {f"regularizer/{k}": float(sum(v) / len(v)) for k, v in self._penalties.items() if v}
        engine.state.metrics.update(balance | terms)
        for what, metrics in (("balance diagnostics", balance), ("regularizer terms", terms)):
            if metrics:
                logger.info("epoch %d %s: %s", engine.state.epoch, what, {k: round(v, 3) for k, v in metrics.items()})
        if self.summary_writer is not None and distributed.is_rank0():
            for k, v in (balance | terms).items():
                self.summary_writer.add_scalar(k, v, engine.state.epoch)

    def _iteration(self, engine: Trainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("empty batch from the data loader")
        ctx = self.context()
        batchdata = self.balancing.before_step(ctx, batchdata)
        if self.device_views is not None and self.view_keys[1] not in batchdata:
            # the loader gave the ROI only; a strategy that augments its own selection (SE) already made the views
            batchdata = self._views_on_device(ctx, batchdata)
        x1, x2 = views_on_device(
            batchdata[self.view_keys[0]],
            batchdata[self.view_keys[1]],
            engine.state.device,
            self.channels_last,
            self.non_blocking,
        )

        def weigh(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor | None:
            self.balancing.after_forward(ctx, batchdata, z1, z2)
            return self.balancing.weights(ctx, batchdata, z1, z2)

        penalty = None
        if self.regularizer is not None:
            ids = [str(i) for i in batchdata.get("id", [])]
            penalty = lambda z1, z2: self.regularizer(z1, z2, ids)  # noqa: E731

        out = simsiam_step(
            self.network,
            self.optimizer,
            x1,
            x2,
            autocast=self._autocast(engine.state.device),
            scaler=self.scaler,
            weigh=weigh,
            loss_scale=distributed.global_weight_scale,
            penalty=penalty,
            context=f"epoch {engine.state.epoch} iteration {engine.state.iteration}",
        )
        for name, value in out.get("penalty", {}).items():
            self._penalties.setdefault(name, []).append(value)
        engine.state.output = out
        return out
