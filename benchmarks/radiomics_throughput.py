"""Radiomics throughput: serial vs worker processes vs a cached rerun, on synthetic cases or a datalist.

    python benchmarks/radiomics_throughput.py [--n 40] [--workers 2] [--datalist path.json] [--out results.json]

Synthetic cases are 32^3-48^3 volumes with intensities in [0, 255] (what the preprocessing hands pyradiomics) and
an irregular lesion (~1k-9k voxels). Each timing is one full ``extract_cohort`` call, worker start-up included, so
the speedup is what a user sees; each configuration runs ``--repeats`` times and the best run counts. On a shared
machine other jobs steal cores: ``in_worker_slowdown`` (per-case seconds in the workers / in the serial loop, from
the cache entries) says how much. Prints cases/s and writes a JSON of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_cohort(folder: Path, n: int, seed: int = 0, sizes: tuple[int, int] = (32, 48)) -> list[dict]:
    """``n`` NIfTI cases with edges drawn from ``sizes``: smooth texture in [0, 255] and a bumpy ellipsoid lesion."""
    import nibabel as nib  # here, not at the top: worker processes re-import this script as their __main__
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(sizes[0], sizes[1] + 1, size=3))
        texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=rng.uniform(0.8, 2.0))
        image = np.clip(128 + 60 * texture / texture.std() + rng.normal(0, 10, shape), 0, 255).astype(np.float32)
        grid = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
        radii = rng.uniform(0.18, 0.32, size=3) * np.array(shape)
        bumps = ndimage.gaussian_filter(rng.normal(size=shape), 3) * 4
        mask = (sum((g / r) ** 2 for g, r in zip(grid, radii)) + bumps <= 1).astype(np.uint8)
        spacing = (1.0, 1.0, float(rng.choice([1.0, 1.5, 2.0])))
        affine = np.diag([*spacing, 1.0])
        item = {"id": f"syn{i:03d}", "image": str(folder / f"syn{i:03d}_img.nii.gz")}
        item["mask"] = str(folder / f"syn{i:03d}_seg.nii.gz")
        nib.save(nib.Nifti1Image(image, affine), item["image"])
        nib.save(nib.Nifti1Image(mask, affine), item["mask"])
        items.append(item)
    return items


def timed(label: str, repeats: int, **kwargs) -> tuple[list[float], object]:
    """Wall times of ``repeats`` identical ``extract_cohort`` calls (the machine may be shared: report the best)."""
    from scripts.downstream.radiomics import extract_cohort

    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = extract_cohort(**kwargs)
        times.append(time.perf_counter() - t0)
    n = len(kwargs["items"])
    best = min(times)
    print(
        f"{label:<28} best {best:7.2f} s  {n / best:8.2f} cases/s  (runs: {', '.join(f'{t:.2f}' for t in times)})"
        f"  ok={result.n_ok} cached={result.n_cached}"
    )
    return times, result


def case_seconds(cache_dir: Path) -> float:
    """Sum of per-case extraction seconds, as recorded in the cache entries of one run."""
    return sum(json.loads(p.read_text(encoding="utf-8"))["seconds"] for p in cache_dir.glob("*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=40, help="number of synthetic cases")
    parser.add_argument("--sizes", type=int, nargs=2, default=(32, 48), help="synthetic volume edge range")
    parser.add_argument("--datalist", help="benchmark on this datalist instead of synthetic cases")
    parser.add_argument("--section", default="training", help="datalist section")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--params", default=str(ROOT / "configs" / "radiomics_params.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "radiomics_throughput.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="runs per configuration; the best is reported")
    args = parser.parse_args()
    if str(ROOT) not in sys.path:  # run as a plain script from anywhere
        sys.path.insert(0, str(ROOT))
    from scripts.data.datalist import load_datalist
    from scripts.downstream.radiomics import _mp_context
    from scripts.feature_table import read_feature_table
    from scripts.io_utils import atomic_write_json

    load_start = round(os.getloadavg()[0], 2)

    with tempfile.TemporaryDirectory(prefix="radiomics_bench_") as tmp:
        tmp = Path(tmp)
        if args.datalist:
            items = load_datalist(args.datalist, args.section)
        else:
            t0 = time.perf_counter()
            items = synthetic_cohort(tmp, args.n, args.seed, tuple(args.sizes))
            print(f"wrote {len(items)} synthetic cases in {time.perf_counter() - t0:.1f} s")
        n = len(items)
        common = {"items": items, "params_file": args.params, "progress": False}
        # every computing run gets a fresh cache dir, so it computes every case and records each case's seconds
        # serial and parallel runs alternate, so a load change on a shared machine hits both alike
        serial_t, serial_case_s, par_t, par_case_s = [], [], [], []
        for r in range(args.repeats):
            t, serial = timed(
                "serial (1 process)", 1, **common, num_workers=1, out_csv=tmp / "s.csv", cache_dir=tmp / f"s{r}"
            )
            serial_t += t
            serial_case_s.append(case_seconds(tmp / f"s{r}"))
            t, _ = timed(
                f"{args.workers} workers",
                1,
                **common,
                num_workers=args.workers,
                out_csv=tmp / "p.csv",
                cache_dir=tmp / f"p{r}",
            )
            par_t += t
            par_case_s.append(case_seconds(tmp / f"p{r}"))
        cached_t, cached = timed(
            "cached rerun",
            args.repeats,
            **common,
            num_workers=args.workers,
            out_csv=tmp / "c.csv",
            cache_dir=tmp / "p0",
        )
        tables = [read_feature_table(tmp / f"{name}.csv") for name in ("s", "p", "c")]
        identical = all(t[:2] == tables[0][:2] and np.array_equal(t[2], tables[0][2]) for t in tables[1:])
        n_features = len(tables[0][1])

    serial_s, par_s, cached_s = min(serial_t), min(par_t), min(cached_t)
    best_par = par_t.index(par_s)
    # > 1 when worker processes ran slower than the serial loop, i.e. they competed for the cores with other jobs
    in_worker_slowdown = par_case_s[best_par] / serial_case_s[serial_t.index(serial_s)]
    speedup = serial_s / par_s
    paired = float(np.median(np.array(serial_t) / np.array(par_t)))
    print(
        f"speedup {args.workers} workers vs serial: {speedup:.2f}x (best runs), {paired:.2f}x (median of paired runs); "
        f"cached rerun {cached_s:.2f} s"
    )
    print(
        f"per-case seconds in workers / serial: {in_worker_slowdown:.2f} (>1: other jobs shared the cores); "
        f"1-min load average at start {load_start}"
    )
    print(f"tables identical: {identical}; {serial.n_ok} ok, {serial.n_failed} failed, {n_features} features")
    figures = {
        "n_cases": n,
        "source": args.datalist or f"synthetic {args.sizes[0]}^3-{args.sizes[1]}^3, seed {args.seed}",
        "n_ok": serial.n_ok,
        "n_failed": serial.n_failed,
        "n_features": n_features,
        "workers": args.workers,
        "start_method": _mp_context().get_start_method(),
        "repeats": args.repeats,
        "serial_runs_s": [round(t, 3) for t in serial_t],
        "parallel_runs_s": [round(t, 3) for t in par_t],
        "cached_runs_s": [round(t, 3) for t in cached_t],
        "parallel_first_s": round(par_t[0], 3),
        "serial_s": round(serial_s, 3),
        "parallel_s": round(par_s, 3),
        "cached_s": round(cached_s, 3),
        "serial_cases_per_s": round(n / serial_s, 3),
        "parallel_cases_per_s": round(n / par_s, 3),
        "cached_cases_per_s": round(n / cached_s, 3),
        "serial_case_seconds_sum": round(serial_case_s[serial_t.index(serial_s)], 3),
        "parallel_case_seconds_sum": round(par_case_s[best_par], 3),
        "in_worker_slowdown": round(in_worker_slowdown, 3),
        "parallel_efficiency": round(par_case_s[best_par] / (args.workers * par_s), 3),
        "speedup": round(speedup, 3),
        "speedup_paired_median": round(paired, 3),
        "speedup_first_parallel_run": round(serial_s / par_t[0], 3),
        "load_average_1min_at_start": load_start,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "n_cached_on_rerun": cached.n_cached,
        "tables_identical": identical,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    atomic_write_json(args.out, figures)
    print(f"wrote {args.out}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
