"""One 3DSiam training step: the bundle's trainer vs a bare PyTorch loop, throughput and peak memory per ROI size.

For each ROI (32^3, 64^3, 96^3) and batch size this times

* ``bundle``: ``scripts.pretrain.simsiam_trainer.SimSiamTrainer`` built from ``configs/train.json`` by ``monai.bundle.ConfigWorkflow``
  with every handler of the config attached (kNN monitor off), timed with Ignite iteration events;
* ``bare``: a plain loop on the same model (``network_def``), the same data pipeline (deterministic transforms of
  the config + ``scripts.pretrain.augment.view_transforms``), the bundle's own step (``scripts.pretrain.step.simsiam_step``),
  Adam, and AMP on CUDA like the bundle,

and, with ``--device-augment``, ``devaug``: the bundle with ``augmentation#device`` true (the loader yields the cached ROI,
the trainer makes both views on the training device, ``scripts.pretrain.device_augment``), in two regimes, so the
bundle/bare (and devaug/bundle) ratio means something:

* ``compute``: two batches of views generated once and kept in memory, cycled: the cost of a step alone;
* ``e2e``: the PersistentDataset loader with augmentation in worker processes, as the bundle runs.

A step's time is the wall time from one ITERATION_COMPLETED to the next (data wait + step + per-iteration
handlers), skipping ``--warmup`` iterations; ``step_s`` is ITERATION_STARTED -> COMPLETED (no data wait).
volumes/s counts training samples (each is two augmented views). Every (roi, batch, variant, regime) runs in a
fresh subprocess that reports its peak RSS (VmHWM), its loader workers' peak RSS and, on CUDA,
``torch.cuda.max_memory_allocated``. The augmentation chain of one volume is timed too (ms per view on 1 and 2
threads, per transform), which says whether ``num_workers`` loader workers can keep up with the step.

    python benchmarks/train_step.py [--rois 32 64 96] [--batch N ...] [--iters N] [--warmup N]
                                    [--device cpu|cuda] [--num-workers N] [--out PATH] [--quick] [--device-augment]

Defaults: CPU batch 2, 1 warm-up + 5 / 3 / 2 timed iterations at 32^3 / 64^3 / 96^3 (a 32^3 step is ~0.3 s on 2
quiet cores, a 96^3 one an estimated ~10 s and ~7.5 GiB of RAM; the run is an estimated ~5 minutes on 2 quiet
cores, several times that when other jobs share them: 2 OpenMP threads on busy cores slow down ~5-10x); CUDA
batches 6 12 24, 3 warm-up + 10 timed iterations. ``--quick``: 1 + 1 iterations, for a smoke run. Variants run in
ABBA order per regime so that a drifting machine load favours neither. Prints tables and writes JSON (default
``benchmarks/results/train_step.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train.json"
VARIANTS = ("bare", "bundle")
DEVICE_AUG_VARIANT = "devaug"  # --device-augment: the bundle with augmentation#device true
REGIMES = ("compute", "e2e")
CPU_ITERS = {32: 5, 64: 3}  # timed iterations per ROI on CPU; larger ROIs get 2 (a 96^3 step: ~10 s on 2 cores)
CUDA_ITERS, CUDA_WARMUP, CPU_WARMUP = 10, 3, 1
COHORT_MARGIN = 16  # synthetic volumes are roi + margin per side, so the tumour box fits (mostly) inside
MAX_UNIQUE_CASES = 8  # the datalist repeats these under distinct ids: generating 100s of 112^3 cases is slow
TARGET_OVERHEAD = 0.10  # the bundle may cost at most 10% more than the bare loop

if str(ROOT) not in sys.path:  # run as a plain script from anywhere, and as the --worker subprocess
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------- helpers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """VmHWM of this process (peak resident set), MiB; the loader workers are separate processes."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM line in /proc/self/status (not Linux?)")


def children_peak_rss_mib() -> float | None:
    """Largest peak RSS among finished child processes (the DataLoader workers), MiB; None when none finished."""
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 1024 if kib > 0 else None


def bundle_default(key: str):
    """A top-level value of configs/train.json (the defaults a user gets)."""
    return json.loads(CONFIG.read_text(encoding="utf-8"))[key]


def config_overrides(spec: dict) -> dict:
    """The overrides shared by the bundle run, the bare loop and the cache warm-up: same data, ROI and device."""
    return {
        "bundle_root": spec["bundle_root"],
        "datalist": spec["datalist"],
        "cache_dir": spec["cache_dir"],
        "roi_size": [spec["roi"]] * 3,
        "batch_size": spec["batch"],
        "num_workers": spec["num_workers"],
        "knn_monitor": False,
        "epochs": 1,
        "device": f"$torch.device('{spec['device']}')",
        "amp": spec["device"] == "cuda",
    }


def make_parser(overrides: dict):
    """train.json with ``overrides``: the single source of the model, preprocessing and augmentation settings."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update(overrides)
    return parser


def count_files(folder: str) -> int:
    return sum(1 for _ in Path(folder).glob("*")) if Path(folder).is_dir() else 0


class BatchCycle:
    """In-memory stand-in for the training DataLoader: cycles pre-collated batches, so a step costs compute only.

    ``dataset``/``num_workers`` are what the bundle's ``EpochSeeder`` reads from a loader (nothing to reseed here).
    """

    dataset = None
    num_workers = 0

    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, int(length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def in_memory_batches(items_path: str, batch: int) -> list[dict]:
    """Two batches collated (like the loader does) from the augmented items the parent generated once."""
    from monai.data.utils import list_data_collate

    items = torch.load(items_path, weights_only=True)
    if len(items) < 2 * batch:
        raise ValueError(f"{items_path} holds {len(items)} pre-generated items, need {2 * batch} for batch {batch}")
    return [list_data_collate(items[i * batch : (i + 1) * batch]) for i in range(2)]


def timing_summary(starts: list[float], ends: list[float], warmup: int, batch: int) -> dict:
    """Per-iteration times after the warm-up: step = started -> completed, cycle = completed -> next completed."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first cycle has no previous iteration to measure from")
    if len(ends) <= warmup:
        raise RuntimeError(f"only {len(ends)} iterations ran, fewer than warmup + 1 = {warmup + 1}")
    steps = [e - s for s, e in zip(starts[warmup:], ends[warmup:])]
    cycles = [ends[i] - ends[i - 1] for i in range(warmup, len(ends))]
    mean_cycle = statistics.fmean(cycles)
    return {
        "timed_iterations": len(cycles),
        "step_s": steps,
        "cycle_s": cycles,
        "step_s_median": statistics.median(steps),
        "cycle_s_median": statistics.median(cycles),
        "cycle_s_mean": mean_cycle,
        "volumes_per_s": batch / mean_cycle,
    }


# ------------------------------------------------------------------------------------------ worker: one timing


class IterationTimer:
    """Ignite events -> wall clock (synchronised on CUDA); attached last, so it includes the bundle's handlers."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.epoch_end: float | None = None
        self.input_type: str | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def _started(self, engine) -> None:
        self.starts.append(self._now())
        self.input_type = self.input_type or type(engine.state.batch["image"]).__name__

    def _completed(self, engine) -> None:
        self.ends.append(self._now())

    def _epoch_completed(self, engine) -> None:
        self.epoch_end = self._now()


def time_bundle(spec: dict) -> dict:
    """The bundle as users run it (ConfigWorkflow on train.json), one epoch of warmup + iters iterations."""
    from monai.bundle import ConfigWorkflow

    n = spec["warmup"] + spec["iters"]
    over = config_overrides(spec)
    over["train#trainer#epoch_length"] = n
    device_aug = spec["variant"] == DEVICE_AUG_VARIANT
    if device_aug:
        over["augmentation#device"] = True
    if spec["regime"] == "compute":
        batches = in_memory_batches(spec["items"], spec["batch"])
        if device_aug:  # the ROI only: the step makes the views (its cost is part of the step here)
            batches = [{k: v for k, v in b.items() if k != "image_2"} for b in batches]
        over["train#dataloader"] = BatchCycle(batches, n)
        over["num_workers"] = 0
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=str(CONFIG),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **over,
    )
    wf.initialize()
    timer = IterationTimer(spec["device"])
    timer.attach(wf.trainer)
    wf.run()
    wf.finalize()
    out = timing_summary(timer.starts, timer.ends, spec["warmup"], spec["batch"])
    out["epoch_end_handlers_s"] = timer.epoch_end - timer.ends[-1]  # checkpoint, encoder export, LR step, logs
    out["input_type"] = timer.input_type
    del wf, timer
    return out


def bare_loader(parser, spec: dict):
    """The bundle's data pipeline written out by hand: same items, preprocessing, views, cache and loader args."""
    from monai.data import DataLoader, PersistentDataset
    from monai.transforms import Compose, CopyItemsd

    from scripts.pretrain.augment import view_transforms

    roi, aug = [spec["roi"]] * 3, parser.get_parsed_content("augmentation")
    transform = Compose(
        parser.get_parsed_content("deterministic_transforms")
        + [CopyItemsd(keys="image", names=["image_2"])]
        + view_transforms("image", roi, **aug)
        + view_transforms("image_2", roi, **aug)
    )
    dataset = PersistentDataset(parser.get_parsed_content("train#data"), transform, cache_dir=spec["cache_dir"])
    return DataLoader(
        dataset,
        batch_size=spec["batch"],
        shuffle=True,
        drop_last=True,
        num_workers=spec["num_workers"],
        generator=torch.Generator().manual_seed(0),
    )


def time_bare(spec: dict) -> dict:
    """Plain PyTorch: the bundle's ``simsiam_step`` in a bare loop, without Ignite, handlers or strategy hooks."""
    from monai.utils import set_determinism

    from scripts.config_utils import as_bool
    from scripts.pretrain.step import simsiam_step, step_autocast, uses_cpu_bf16, views_on_device

    set_determinism(seed=0)  # the bundle does this too (cudnn.deterministic on CUDA): same kernels in both
    device, n = spec["device"], spec["warmup"] + spec["iters"]
    parser = make_parser(config_overrides(spec))
    model = parser.get_parsed_content("network_def").to(device)
    # the trainer's layout and precision (configs/train.json: channels_last, cpu_bf16, amp), so that bundle / bare
    # measures the bundle's overhead alone: a bare NCDHW loop was 3.1x slower than the bundle on an H200 at 96^3
    channels_last = as_bool(parser["channels_last"], "channels_last")
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    cpu_bf16 = uses_cpu_bf16(parser["cpu_bf16"], device)
    optimizer = torch.optim.Adam(model.parameters(), lr=parser["learning_rate"], weight_decay=parser["weight_decay"])
    amp = device == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if spec["regime"] == "compute":
        loader = BatchCycle(in_memory_batches(spec["items"], spec["batch"]), n)
    else:
        loader = bare_loader(parser, spec)
    batches = iter(loader)
    starts, ends, input_type = [], [], None
    for _ in range(n):
        batch = next(batches)
        _sync(device)
        starts.append(time.perf_counter())
        input_type = input_type or type(batch["image"]).__name__
        x1, x2 = views_on_device(batch["image"], batch["image_2"], device, channels_last)
        simsiam_step(model, optimizer, x1, x2, autocast=step_autocast(device, amp, cpu_bf16), scaler=scaler)
        _sync(device)
        ends.append(time.perf_counter())
    del batches, loader  # shuts the loader workers down, so their peak RSS is counted below
    out = timing_summary(starts, ends, spec["warmup"], spec["batch"])
    out["input_type"] = input_type
    return out


def train_worker(spec: dict) -> dict:
    """One (roi, batch, variant, regime) in this fresh process, with its own peak-memory figures."""
    torch.manual_seed(0)
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache_before = count_files(spec["cache_dir"])
    out = time_bundle(spec) if spec["variant"] in ("bundle", DEVICE_AUG_VARIANT) else time_bare(spec)
    gc.collect()
    out["cache_files_added"] = count_files(spec["cache_dir"]) - cache_before  # 0: the parent warmed the cache
    out["peak_rss_mib"] = peak_rss_mib()
    out["loader_workers_peak_rss_mib"] = children_peak_rss_mib()
    if spec["device"] == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------- worker: augmentation cost


def _one_volume(parser) -> dict:
    """One preprocessed (un-augmented) ROI of the benchmark cohort, as the cache holds it."""
    from monai.transforms import Compose

    item = parser.get_parsed_content("train#data")[0]
    return Compose(parser.get_parsed_content("deterministic_transforms"))(item)


def time_chain(chain, volume: dict, repeats: int, device: str) -> float:
    """Median ms per view of the two-view chain (one call makes both views), after one warm-up call."""
    chain(dict(volume))
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        chain(dict(volume))
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / 2


def per_transform_ms(chain, volume: dict, repeats: int) -> dict:
    """Mean ms per view spent in each transform class of the chain (both views' instances added up)."""
    totals: dict[str, float] = {}
    for _ in range(repeats):
        d = dict(volume)
        for t in chain.transforms:
            t0 = time.perf_counter()
            d = t(d)
            name = type(t).__name__
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
    return {k: 1e3 * v / (2 * repeats) for k, v in totals.items()}


def chain_on_device(chain, device: str):
    """A copy of the chain whose RandAffined builds its grid and resamples on ``device`` (MONAI's ``device=``)."""
    import copy

    from monai.transforms import RandAffined

    chain = copy.deepcopy(chain)
    found = False
    for t in chain.transforms:
        if isinstance(t, RandAffined):
            t.rand_affine.rand_affine_grid.device = torch.device(device)
            t.rand_affine.resampler.device = torch.device(device)
            found = True
    if not found:
        raise ValueError("the view chain has no RandAffined to move to the device")
    return chain


def batched_affine(x: torch.Tensor, rotate_deg: float, scale: float, shift_fraction: float) -> torch.Tensor:
    """Random rotation/scale/shift of a whole [B, C, D, H, W] batch with ``affine_grid`` + ``grid_sample``.

    The ranges of the bundle's RandAffined (a cost proxy for augmenting on the device after collation; the
    convention of the grid differs from MONAI's, the distribution of the parameters does not).
    """
    b = x.shape[0]
    angles = (torch.rand(b, 3, device=x.device) * 2 - 1) * math.radians(rotate_deg)
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones(b, device=x.device), torch.zeros(b, device=x.device)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(b, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(b, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
    zoom = 1 + (torch.rand(b, 3, device=x.device) * 2 - 1) * scale
    theta = torch.cat(
        [
            rx @ ry @ rz @ torch.diag_embed(1 / zoom),
            ((torch.rand(b, 3, 1, device=x.device) * 2 - 1) * 2 * shift_fraction),
        ],
        dim=2,
    )
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def time_batched_affine(roi: int, batch: int, aug: dict, repeats: int, device: str) -> float:
    """Median ms per view of ``batched_affine`` on a batch of ``batch`` views on ``device``."""
    x = torch.rand(batch, 1, roi, roi, roi, device=device) * 255
    args = (aug["rotate_deg"], aug["scale"], aug["shift_fraction"])
    batched_affine(x, *args)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        batched_affine(x, *args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / batch


def time_device_views(roi: int, batch: int, aug: dict, repeats: int, device: str) -> float:
    """Median ms per view of ``DeviceViews`` (the whole chain of ``augmentation#device``) on a batch on ``device``."""
    from scripts.pretrain.device_augment import DeviceViews

    views = DeviceViews([roi] * 3, **aug)
    x = torch.rand(batch, 1, roi, roi, roi, device=device) * 255
    generator = torch.Generator().manual_seed(0)
    views(x, generator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        views(x, generator)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / batch


def aug_worker(spec: dict) -> dict:
    """ms per view of the bundle's two-view chain (``train#view_transform``) on one ROI, 1 and 2 threads."""
    parser = make_parser(config_overrides(spec))
    chain = parser.get_parsed_content("train#view_transform")
    chain.set_random_state(seed=0)
    volume, repeats = _one_volume(parser), spec["repeats"]
    out: dict = {"roi": spec["roi"], "repeats": repeats}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[f"ms_per_view_{threads}_thread"] = time_chain(chain, volume, repeats, "cpu")
    torch.set_num_threads(1)  # what a DataLoader worker gets
    out["per_transform_ms_1_thread"] = per_transform_ms(chain, volume, repeats)
    torch.set_num_threads(spec["threads"])
    aug = parser.get_parsed_content("augmentation")
    batch = spec["batch"]
    out["batched_affine_batch"] = batch
    out["batched_affine_cpu_ms_per_view"] = time_batched_affine(spec["roi"], batch, aug, repeats, "cpu")
    out["device_views_cpu_ms_per_view"] = time_device_views(spec["roi"], batch, aug, repeats, "cpu")
    if spec["device"] == "cuda":  # options, so a failure is recorded and printed instead of ending the benchmark
        gpu_volume = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in volume.items()}
        options = {
            "chain_on_cuda_ms_per_view": lambda: time_chain(
                chain_on_device(chain, "cuda"), gpu_volume, repeats, "cuda"
            ),
            "batched_affine_cuda_ms_per_view": lambda: time_batched_affine(spec["roi"], batch, aug, repeats, "cuda"),
            "device_views_cuda_ms_per_view": lambda: time_device_views(spec["roi"], batch, aug, repeats, "cuda"),
        }
        for key, measure in options.items():
            try:
                out[key] = measure()
            except Exception as e:  # noqa: BLE001 - reported in the JSON and the table
                out[key] = None
                out[key.replace("_ms_per_view", "_error")] = f"{type(e).__name__}: {e}"
    return out


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out = train_worker(spec) if spec["kind"] == "train" else aug_worker(spec)
    Path(spec["result"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent: orchestration


def write_cohort(work: Path, roi: int, n_items: int) -> Path:
    """A small synthetic cohort of (roi + margin)^3 cases and a datalist repeating it to ``n_items`` distinct ids."""
    from scripts.data.demo_cohort import CohortSpec, generate_cohort

    size = roi + COHORT_MARGIN
    spec = CohortSpec(n_cases=min(n_items, MAX_UNIQUE_CASES), shape=(size, size, size), seed=0)
    datalist = generate_cohort(work / f"cohort_{roi}", spec)
    cases = json.loads(datalist.read_text(encoding="utf-8"))["training"]
    entries = [
        {**cases[i % len(cases)], "id": f"{cases[i % len(cases)]['id']}_r{i // len(cases)}"} for i in range(n_items)
    ]
    out = datalist.parent / "bench_datalist.json"
    out.write_text(json.dumps({"training": entries, "testing": []}, indent=1))
    return out


def warm_cache(base_spec: dict, n_keep: int, workers: int) -> str:
    """Fill the PersistentDataset cache with every item (as epoch 1 of a real run would) and keep ``n_keep``
    augmented items for the ``compute`` regime; returns the path of those items."""
    from torch.utils.data import DataLoader

    dataset = make_parser(config_overrides(base_spec)).get_parsed_content("train#dataset")
    kept = []
    for item in DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=False):
        if len(kept) < n_keep:  # plain tensors, so the items reload with torch.load(weights_only=True)
            kept.append({k: v.as_tensor() if hasattr(v, "as_tensor") else v for k, v in item.items()})
    path = str(Path(base_spec["cache_dir"]).parent / f"items_{base_spec['roi']}.pt")
    torch.save(kept, path)
    return path


def run_subprocess(spec: dict, work: Path, name: str) -> dict:
    """Run one ``--worker`` in a fresh interpreter (clean peak-memory counters); raise with its log on failure."""
    spec = {**spec, "result": str(work / f"result_{name}.json")}
    spec_path, log_path = work / f"spec_{name}.json", work / f"log_{name}.txt"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
    if rc != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8").splitlines()[-40:])
        raise RuntimeError(f"benchmark worker {name} failed with exit code {rc}; last lines of its log:\n{tail}")
    out = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def platform_info(device: str) -> dict:
    import ignite
    import monai

    return {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "ignite": ignite.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0)
        if device == "cuda"
        else platform.processor() or platform.machine(),
    }


def ratios(runs: list[dict]) -> list[dict]:
    """bundle / bare mean cycle time for each (roi, batch, regime) measured in this run."""
    index = {(r["roi"], r["batch"], r["variant"], r["regime"]): r for r in runs}
    out = []
    for (roi, batch, variant, regime), bare in index.items():
        bundle = index.get((roi, batch, "bundle", regime))
        if variant != "bare" or bundle is None:
            continue
        ratio = bundle["cycle_s_mean"] / bare["cycle_s_mean"]
        out.append(
            {
                "roi": roi,
                "batch": batch,
                "regime": regime,
                "bundle_over_bare": ratio,
                "overhead_pct": 100 * (ratio - 1),
                "within_target": ratio <= 1 + TARGET_OVERHEAD,
            }
        )
    return out


def device_aug_ratios(runs: list[dict]) -> list[dict]:
    """devaug / bundle mean cycle time for each (roi, batch, regime) where both ran (``--device-augment``)."""
    index = {(r["roi"], r["batch"], r["variant"], r["regime"]): r for r in runs}
    out = []
    for (roi, batch, variant, regime), dev in index.items():
        bundle = index.get((roi, batch, "bundle", regime))
        if variant != DEVICE_AUG_VARIANT or bundle is None:
            continue
        ratio = dev["cycle_s_mean"] / bundle["cycle_s_mean"]
        out.append({"roi": roi, "batch": batch, "regime": regime, "devaug_over_bundle": ratio})
    return out


def pipeline(runs: list[dict], aug: dict[int, dict], num_workers: int) -> list[dict]:
    """Can ``num_workers`` loader workers (1 thread each) augment a batch in the time the model takes a step?"""
    out = []
    for r in runs:
        if r["variant"] != "bare" or r["regime"] != "compute" or r["roi"] not in aug:
            continue
        aug_batch = 2 * r["batch"] * aug[r["roi"]]["ms_per_view_1_thread"] / 1e3
        step = r["cycle_s_mean"]
        e2e = next(
            (
                e
                for e in runs
                if (e["roi"], e["batch"], e["variant"], e["regime"]) == (r["roi"], r["batch"], "bare", "e2e")
            ),
            None,
        )
        out.append(
            {
                "roi": r["roi"],
                "batch": r["batch"],
                "num_workers": num_workers,
                "aug_s_per_batch_1_thread": aug_batch,
                "loader_s_per_batch": aug_batch / max(num_workers, 1),
                "step_s": step,
                "keeps_up": aug_batch / max(num_workers, 1) <= step,
                "workers_needed": max(1, math.ceil(aug_batch / step)),
                "e2e_over_compute_bare": e2e["cycle_s_mean"] / step if e2e else None,
            }
        )
    return out


def print_tables(report: dict) -> None:
    p = report["platform"]
    print(
        f"\n3DSiam training step, device={p['device']} ({p['device_name']}), torch {p['torch']}, monai {p['monai']}, "
        f"threads={p['threads']}, cpus={p['cpu_count']}, load at start {p['load_average_1min_at_start']}"
    )
    cuda = p["device"] == "cuda"
    columns = ("roi", 4), ("batch", 5), ("regime", 8), ("variant", 7), ("iters", 5), ("s/step", 8), ("s/cycle", 8)
    columns += ("vol/s", 7), ("RSS MiB", 8), ("workers MiB", 11)
    print(" ".join(f"{name:>{width}}" for name, width in columns) + (f" {'CUDA MiB':>9}" if cuda else ""))
    for r in report["runs"]:
        workers = r["loader_workers_peak_rss_mib"]
        line = (
            f"{r['roi']:>4} {r['batch']:>5} {r['regime']:>8} {r['variant']:>7} {r['timed_iterations']:>5} "
            f"{r['step_s_median']:>8.3f} {r['cycle_s_mean']:>8.3f} {r['volumes_per_s']:>7.2f} "
            f"{r['peak_rss_mib']:>8.0f} {(f'{workers:.0f}' if workers else '-'):>11}"
        )
        print(line + (f" {r['cuda_max_allocated_mib']:>9.0f}" if cuda else ""))
    print(f"\nbundle / bare (mean s per iteration, target <= {1 + TARGET_OVERHEAD:.2f})")
    for q in report["ratios"]:
        verdict = "ok" if q["within_target"] else "OVER"
        print(
            f"  roi {q['roi']:>3} batch {q['batch']:>3} {q['regime']:>8}: {q['bundle_over_bare']:.3f} "
            f"({q['overhead_pct']:+.1f}%) {verdict}"
        )
    if report.get("device_aug_ratios"):
        print("\ndevaug / bundle (mean s per iteration; views on the training device vs in the loader workers)")
        for q in report["device_aug_ratios"]:
            print(f"  roi {q['roi']:>3} batch {q['batch']:>3} {q['regime']:>8}: {q['devaug_over_bundle']:.3f}")
    print("\naugmentation, two-view chain of configs/train.json, ms per view")
    for a in report["augmentation"]:
        affine = a["per_transform_ms_1_thread"].get("RandAffined", float("nan"))
        extra = f", batched affine_grid {a['batched_affine_cpu_ms_per_view']:.1f} cpu"
        if "device_views_cpu_ms_per_view" in a:
            extra += f", DeviceViews {a['device_views_cpu_ms_per_view']:.1f} cpu"
        for key, label in (
            ("chain_on_cuda", "chain on CUDA"),
            ("batched_affine_cuda", "batched affine_grid CUDA"),
            ("device_views_cuda", "DeviceViews CUDA"),
        ):
            if f"{key}_ms_per_view" in a:
                value = a[f"{key}_ms_per_view"]
                extra += f", {label} " + (f"{value:.2f}" if value is not None else f"FAILED ({a[f'{key}_error']})")
        print(
            f"  roi {a['roi']:>3}: {a['ms_per_view_1_thread']:.1f} (1 thread), "
            f"{a['ms_per_view_2_thread']:.1f} (2 threads); RandAffined {affine:.1f} of it{extra}"
        )
    print("\ndata pipeline vs model step (loader s/batch = aug s/batch on 1 thread / num_workers)")
    for q in report["pipeline"]:
        e2e = q["e2e_over_compute_bare"]
        measured = f"; measured e2e/compute {e2e:.2f}" if e2e else ""
        print(
            f"  roi {q['roi']:>3} batch {q['batch']:>3}: aug {q['aug_s_per_batch_1_thread']:.2f} s/batch, loader "
            f"{q['loader_s_per_batch']:.2f} s/batch with {q['num_workers']} workers vs step {q['step_s']:.2f} s -> "
            f"{'keeps up' if q['keeps_up'] else 'LOADER-BOUND'}, needs >= {q['workers_needed']} workers{measured}"
        )


def resolve_settings(args: argparse.Namespace) -> dict:
    """Device-dependent defaults: CPU batch 2 and few iterations, CUDA batches 6/12/24 and 10 iterations."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    cpu = device == "cpu"
    batches = args.batch or ([2] if cpu else [6, 12, 24])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or cpu else CUDA_WARMUP)
    if args.iters is not None:
        iters = dict.fromkeys(args.rois, args.iters)
    elif args.quick:
        iters = dict.fromkeys(args.rois, 1)
    else:
        iters = {r: (CPU_ITERS.get(r, 2) if cpu else CUDA_ITERS) for r in args.rois}
    num_workers = args.num_workers if args.num_workers is not None else int(bundle_default("num_workers"))
    repeats = args.aug_repeats or (2 if args.quick else (5 if cpu else 20))
    return {
        "device": device,
        "rois": list(args.rois),
        "batches": batches,
        "warmup": warmup,
        "iters": iters,
        "num_workers": num_workers,
        "regimes": list(args.regimes),
        "aug_repeats": repeats,
        "quick": bool(args.quick),
        "variants": list(VARIANTS) + ([DEVICE_AUG_VARIANT] if args.device_augment else []),
    }


def run_benchmark(settings: dict, work: Path) -> dict:
    device, batches, warmup = settings["device"], settings["batches"], settings["warmup"]
    prep_workers = min(os.cpu_count() or 1, 8)
    runs, failures, aug = [], [], {}
    for roi in settings["rois"]:
        n_items = max(batches) * (warmup + settings["iters"][roi])
        t0 = time.perf_counter()
        datalist = write_cohort(work, roi, n_items)
        base = {
            "roi": roi,
            "batch": max(batches),
            "device": device,
            "num_workers": settings["num_workers"],
            "datalist": str(datalist),
            "cache_dir": str(work / f"cache_{roi}"),
            "warmup": warmup,
            "iters": settings["iters"][roi],
        }
        items = warm_cache({**base, "bundle_root": str(work / "warm")}, 2 * max(batches), prep_workers)
        print(f"roi {roi}: cohort of {n_items} items and cache ready in {time.perf_counter() - t0:.1f} s", flush=True)
        aug_spec = {
            **base,
            "kind": "aug",
            "bundle_root": str(work / "aug"),
            "repeats": settings["aug_repeats"],
            "threads": torch.get_num_threads(),
        }
        aug[roi] = run_subprocess(aug_spec, work, f"aug_{roi}")
        print(f"roi {roi}: augmentation {aug[roi]['ms_per_view_1_thread']:.1f} ms/view on 1 thread", flush=True)
        for batch in batches:
            for k, regime in enumerate(settings["regimes"]):
                # ABBA order (bare, bundle, bundle, bare): a drift in machine load does not favour one variant
                variants = settings.get("variants", list(VARIANTS))
                for variant in variants if k % 2 == 0 else variants[::-1]:
                    name = f"{variant}_{regime}_{roi}_b{batch}"
                    spec = {
                        **base,
                        "kind": "train",
                        "batch": batch,
                        "variant": variant,
                        "regime": regime,
                        "items": items,
                        "bundle_root": str(work / name),
                    }
                    r = {"roi": roi, "batch": batch, "variant": variant, "regime": regime}
                    try:
                        r.update(run_subprocess(spec, work, name))
                    except RuntimeError as e:  # e.g. CUDA out of memory at the largest batch: keep the other runs
                        failures.append({**r, "error": str(e)})
                        print(f"roi {roi} batch {batch} {regime} {variant}: FAILED\n{e}", flush=True)
                        continue
                    runs.append(r)
                    print(
                        f"roi {roi} batch {batch} {regime:>7} {variant:>6}: {r['cycle_s_mean']:.3f} s/iteration, "
                        f"{r['volumes_per_s']:.2f} volumes/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    return {"runs": runs, "failures": failures, "augmentation": list(aug.values()), "aug_by_roi": aug}


# variant -> (channels_last_3d, bf16 autocast, torch.compile)
LAYOUTS = {
    "fp32": (False, False, False),
    "channels_last": (True, False, False),
    "channels_last+bf16": (True, True, False),
    "channels_last+compile": (True, False, True),
}


def _layout_step(name: str, net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """Seconds of one forward + backward + Adam step of ``net`` on (x, x) in the layout of variant ``name``."""
    from scripts.pretrain.step import simsiam_step, step_autocast

    cl, bf16, _ = LAYOUTS[name]
    xin = x.contiguous(memory_format=torch.channels_last_3d) if cl else x
    t0 = time.perf_counter()
    simsiam_step(net, opt, xin, xin, autocast=step_autocast("cpu", cpu_bf16=bf16))
    return time.perf_counter() - t0


def layout_comparison(
    rois: list[int], batches: list[int], iters: int, warmup: int, variants: list[str] | None = None
) -> dict:
    """Old (fp32, contiguous NCDHW) vs new (channels_last_3d, optionally bf16 autocast or ``torch.compile``) training
    steps, in one process.

    The same SimSiam3D forward + backward + Adam step on fixed random [0, 255] volumes; variants interleaved
    (ABC, CBA, ...) so a drifting machine load favours none; the median step time per variant and the speed-up over
    fp32 measured in the same run. bf16 is emulated (slower) on CPUs without AVX512-BF16/AMX, which is why the
    trainer's ``cpu_bf16: auto`` only turns it on where ``scripts.pretrain.step.cpu_has_native_bf16()`` is true.
    The compiled variant compiles in place (``nn.Module.compile``, as the trainer does with ``torch_compile: true``)
    during two untimed steps before the loop; their time is reported as ``compile_s`` (it depends on Inductor's on-disk cache:
    ``TORCHINDUCTOR_CACHE_DIR``, by default a folder under the system's temp dir that later runs reuse).
    """
    from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D
    from scripts.pretrain.step import cpu_has_native_bf16

    variants = list(variants or LAYOUTS)
    cache_set = "TORCHINDUCTOR_CACHE_DIR" in os.environ  # torch sets it itself on the first optimizer step
    rows = []
    for roi in rois:
        for batch in batches:
            x = torch.rand(batch, 1, roi, roi, roi, generator=torch.Generator().manual_seed(0)) * 255
            nets, times, compile_s = {}, {k: [] for k in variants}, {}

            for name in variants:
                cl, _, compiled = LAYOUTS[name]
                torch.manual_seed(0)
                net = SimSiam3D(Encoder3D(1), Predictor(256, 64))
                if cl:
                    net = net.to(memory_format=torch.channels_last_3d)
                nets[name] = (net, torch.optim.Adam(net.parameters(), 1e-3))
                if compiled:  # forward graph on the first step, backward graph on the first backward; settle twice
                    net.compile()
                    compile_s[name] = _layout_step(name, *nets[name], x) + _layout_step(name, *nets[name], x)
            for rep in range(warmup + iters):
                for name in variants if rep % 2 == 0 else variants[::-1]:
                    t = _layout_step(name, *nets[name], x)
                    if rep >= warmup:
                        times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med.get("fp32", med[variants[0]])
            row = {"roi": roi, "batch": batch, "median_step_s": med, "step_times_s": times,
                   "speedup_vs_fp32": {k: base / v for k, v in med.items()}, "compile_s": compile_s}  # fmt: skip
            for name, c in compile_s.items():  # steps after which compiling has paid for itself, against the next best
                rest = [med[k] for k in med if k != name]
                saving = (min(rest) - med[name]) if rest else 0.0
                row.setdefault("break_even_steps", {})[name] = round(c / saving) if saving > 0 else None
            print(f"{roi}^3 batch {batch}: " + ", ".join(
                f"{k} {med[k]:.2f} s ({row['speedup_vs_fp32'][k]:.2f}x)" for k in variants)
                + "".join(f"; {k} compiled in {c:.0f} s" for k, c in compile_s.items()))  # fmt: skip
            rows.append(row)
    return {"benchmark": "train_step_layouts", "cpu_has_native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0], "iters": iters, "warmup": warmup, "variants": variants,
            "inductor_cache_dir": "TORCHINDUCTOR_CACHE_DIR" if cache_set else "torch's default", "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rois", type=int, nargs="+", default=[32, 64, 96], help="cubic ROI edges")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 2 on CPU, 6 12 24 on CUDA)")
    parser.add_argument("--iters", type=int, help="timed iterations (default: per ROI on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--num-workers", type=int, help="loader workers in e2e (default: the bundle's, 2)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    parser.add_argument("--aug-repeats", type=int, help="timed calls of the augmentation chain per setting")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 timed iteration")
    parser.add_argument(
        "--device-augment", action="store_true",
        help="also time the bundle with augmentation#device true (variant devaug: views made on the training device)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement from a spec file
    parser.add_argument(
        "--layouts", action="store_true",
        help="only compare fp32 / channels_last_3d / +bf16 / +compile steps in one process (writes "
        "train_step_layouts.json next to --out)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", choices=list(LAYOUTS), default=None,
        help="with --layouts: which variants (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.variants and not args.layouts:
        parser.error("--variants needs --layouts")
    if args.layouts:
        from scripts.io_utils import atomic_write_json

        report = layout_comparison(
            args.rois, args.batch or [2], args.iters or 3, 1 if args.warmup is None else args.warmup, args.variants
        )
        out = args.out.with_name("train_step_layouts.json")
        atomic_write_json(out, report)
        print(f"wrote {out}")
        return report
    if args.worker:
        worker_main(args.worker)
        return None
    from scripts.io_utils import atomic_write_json

    settings = resolve_settings(args)
    load_start, t0 = round(os.getloadavg()[0], 2), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_step_bench_") as tmp:
        measured = run_benchmark(settings, Path(tmp))
    info = platform_info(settings["device"])  # after the runs: the parent forks loader workers before touching CUDA
    info["load_average_1min_at_start"] = load_start
    info["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    report = {
        "benchmark": "train_step",
        "platform": info,
        "settings": {**settings, "iters": {str(k): v for k, v in settings["iters"].items()}},
        "notes": [
            "volumes/s = training samples per second; each sample is two augmented views",
            "cycle = ITERATION_COMPLETED to the next (data wait + step + per-iteration handlers); step = "
            "ITERATION_STARTED to COMPLETED; ratios use the mean cycle",
            "compute: 2 pre-collated batches in host memory, cycled; e2e: PersistentDataset (warm cache) + "
            "augmentation in num_workers loader workers",
            "epoch_end_handlers_s (bundle only) is paid once per epoch: checkpoint, encoder export, LR step",
            "both variants run under monai set_determinism (cudnn.deterministic on CUDA), as the bundle does",
        ],
        "runs": measured["runs"],
        "failures": measured["failures"],
        "ratios": ratios(measured["runs"]),
        "device_aug_ratios": device_aug_ratios(measured["runs"]),
        "augmentation": measured["augmentation"],
        "pipeline": pipeline(measured["runs"], measured["aug_by_roi"], settings["num_workers"]),
        "total_wall_s": time.perf_counter() - t0,
    }
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {args.out}")
    if report["failures"]:
        names = ", ".join(f"roi {f['roi']} batch {f['batch']} {f['regime']} {f['variant']}" for f in report["failures"])
        raise SystemExit(f"{len(report['failures'])} run(s) failed (errors in {args.out}): {names}")
    return report


if __name__ == "__main__":
    main()
