"""Fingerprints of short same-seed training runs, for checking that a refactoring of the training step changes nothing.

Every balance mode (none, RE with both embedding sources, SE, bank) and the Rubik's cube trainer trains for a few
steps on a small generated cohort, one thread, in this process; the script records the sha256 of the exported
encoder's weights (``models/model.pt``) and the loss of every iteration. Run it before and after a change and compare:

    python benchmarks/step_identity.py --out before.json
    # ... refactor ...
    python benchmarks/step_identity.py --out after.json --compare before.json   # exit 1 on any difference

Bit-identical weights after several optimiser steps mean the same forward, loss, weights and update, in the same
floating-point order.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {
    "none": {},
    "re_views": {"balance#mode": "re"},
    "re_original": {"balance#mode": "re", "balance#re_embeddings": "original"},
    "se": {"balance#mode": "se", "balance#k": 2, "balance#q": 6, "balance#m": 4},
    "bank": {"balance#mode": "bank"},
    "rubik": {"_configs": ["rubik.json"]},
}


def fingerprint(name: str, overrides: dict, cohort: Path, work: Path) -> dict:
    """Train one short run; the encoder's sha256 and the per-iteration losses."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    extra = [str(ROOT / "configs" / c) for c in overrides.pop("_configs", [])]
    root = work / name
    args = dict(
        bundle_root=str(root),
        datalist=str(cohort),
        cache_dir=str(work / "cache"),
        roi_size=[28, 28, 28],
        num_workers=0,
        torchscript_path=None,
        epochs=2,
        steps_per_epoch=3,
        batch_size=4,
        knn_monitor=False,
    )
    args.update(overrides)
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(ROOT / "configs" / "train.json"), *extra],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **args,
    )
    wf.initialize()
    losses: list[float] = []
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    wf.run()
    wf.finalize()
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):  # the tensors' bytes: the file's own bytes carry its temporary name
        digest.update(key.encode() + state[key].contiguous().numpy().tobytes())
    return {"weights_sha256": digest.hexdigest(), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    from scripts.cli import parser

    ap = parser("step_identity.py", __doc__)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_identity.json"), help="JSON file")
    ap.add_argument("--compare", help="an earlier --out file: exit 1 if any fingerprint differs")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    args = ap.parse_args(argv)
    import torch

    from scripts.data.demo_cohort import CohortSpec, generate_cohort

    torch.set_num_threads(1)
    names = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        ap.error(f"--runs: unknown run(s) {unknown}; known: {list(RUNS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cohort = generate_cohort(work / "cohort", CohortSpec(n_cases=24, shape=(32, 32, 32), seed=3))
        for name in names:
            results[name] = fingerprint(name, dict(RUNS[name]), cohort, work)
            print(f"{name:12s} {results[name]['weights_sha256'][:16]} losses {results[name]['losses']}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if args.compare:
        before = json.loads(Path(args.compare).read_text(encoding="utf-8"))
        changed = [n for n in names if before.get(n) != results[n]]
        print("identical" if not changed else f"CHANGED: {changed}")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
