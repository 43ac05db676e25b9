"""Does ``torch.compile`` pay for a 3DSiam training step? Compile time, eager vs compiled step, break-even.

Builds the bundle's network (Table 3 encoder, out BN, predictor; channels_last_3d as the trainer runs it) twice
from the same seed, compiles one, and times forward + backward + Adam on fixed random volumes, eager and compiled
steps interleaved so that a drifting machine load favours neither. ``break_even_steps`` is the compile time (the
first two compiled steps) over the per-step saving: a run shorter than that is slower compiled. The README's run
is 200 steps of batch 6 at 32^3. Inductor keeps compiled kernels on disk: by default the run compiles into a fresh
empty cache (a user's first run, "cold"); ``--inductor-cache DIR`` reuses DIR, so a second run with the same DIR
measures a "warm" compile.

    python benchmarks/compile_step.py [--threads 2] [--roi 32] [--batch 6] [--iters 5] [--inductor-cache DIR]
                                      [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.io_utils import atomic_write_json  # noqa: E402
from scripts.pretrain.networks import Encoder3D, Predictor, SimSiam3D  # noqa: E402
from scripts.pretrain.step import simsiam_step  # noqa: E402


def build(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = SimSiam3D(Encoder3D(1, 256, 324, out_bn=True), Predictor(256, 64)).to(memory_format=torch.channels_last_3d)
    return net, torch.optim.Adam(net.parameters(), 1e-3)


def step(net, opt, x1: torch.Tensor, x2: torch.Tensor) -> None:
    """The bundle's own step (fp32, as the trainer runs on this CPU)."""
    simsiam_step(net, opt, x1, x2)


def measure(roi: int, batch: int, iters: int) -> dict:
    x1, x2 = (
        (torch.rand(batch, 1, roi, roi, roi) * 255).contiguous(memory_format=torch.channels_last_3d) for _ in range(2)
    )
    eager, eager_opt = build()
    compiled_net, compiled_opt = build()
    compiled = torch.compile(compiled_net)
    t0 = time.perf_counter()
    step(compiled, compiled_opt, x1, x2)
    step(compiled, compiled_opt, x1, x2)  # the backward graph compiles on the first backward; the second settles
    compile_s = time.perf_counter() - t0
    step(eager, eager_opt, x1, x2)  # eager warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(iters):
        for name, net, opt in (("eager", eager, eager_opt), ("compiled", compiled, compiled_opt)):
            t = time.perf_counter()
            step(net, opt, x1, x2)
            times[name].append(time.perf_counter() - t)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    saving = eager_s - compiled_s
    return {
        "compile_and_first_two_steps_s": round(compile_s, 2),
        "eager_step_s": round(eager_s, 4),
        "compiled_step_s": round(compiled_s, 4),
        "speedup": round(eager_s / compiled_s, 3),
        "break_even_steps": round(compile_s / saving) if saving > 0 else None,
        "step_times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--iters", type=int, default=5, help="timed steps of each variant")
    ap.add_argument("--inductor-cache", type=Path, default=None, help="inductor's cache folder (default: a fresh one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile_step.json")
    args = ap.parse_args(argv)
    fresh = None if args.inductor_cache else tempfile.TemporaryDirectory(prefix="inductor_cold_")
    cache = args.inductor_cache or Path(fresh.name)
    warm = cache.is_dir() and any(cache.iterdir())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    result = {
        "benchmark": "compile_step",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "roi": args.roi,
        "batch": args.batch,
        "inductor_cache": "warm" if warm else "cold",
        "load_average_1min": [round(load0, 2)],
        **measure(args.roi, args.batch, args.iters),
    }
    result["load_average_1min"].append(round(os.getloadavg()[0], 2))
    print(
        f"{args.roi}^3 batch {args.batch}, {result['threads']} thread(s), {result['inductor_cache']} inductor cache: "
        f"compile + 2 steps "
        f"{result['compile_and_first_two_steps_s']} s; eager {result['eager_step_s']} s, compiled "
        f"{result['compiled_step_s']} s per step ({result['speedup']}x); break-even after "
        f"{result['break_even_steps']} steps"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    if fresh is not None:
        fresh.cleanup()
    return result


if __name__ == "__main__":
    main()
