"""Embedding and radiomics extraction spread over torchrun processes: disjoint shards, per-rank parts, one merge.

Each of the ``world`` processes takes the cases whose position in the *sorted* case ids is ``rank`` modulo
``world`` (no case twice, none dropped, the same split on every machine whatever order it reads the datalist in),
writes its rows to ``<table>.part<rank>of<world>.csv`` (+ ``.meta.json``, + ``.failures.csv`` for radiomics) with
the usual atomic writes, and reports the SHA-256 of what it wrote. After every rank has reported, rank 0 checks that
it sees exactly those files (on several machines the output folder must be shared), merges them into the table a
single process would have written (same ids, same row order, same values), with one provenance sidecar, and
removes the parts. Plain functions on paths and lists; the one collective is :func:`gather_reports`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist

from scripts.feature_table import (
    failures_path,
    meta_path,
    read_failures,
    read_feature_table,
    write_feature_table,
)
from scripts.io_utils import output_lock, sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaRules:
    """How the parts' provenance sidecars become one: what must be equal on every rank (else the parts were made
    with different code, checkpoints or settings and must not be mixed), what adds up, and what is per case."""

    must_agree: tuple[str, ...] = ()
    sum_keys: tuple[str, ...] = ()
    max_keys: tuple[str, ...] = ()
    per_case_keys: tuple[str, ...] = ()  # {case id: value} dicts, merged in case order
    with_failures: bool = False  # parts come with a ``.failures.csv`` (radiomics)


RULES = {
    "embeddings": MetaRules(must_agree=("kind", "bundle_version", "checkpoint_sha256", "roi_size", "profile")),
    "radiomics": MetaRules(
        must_agree=(
            "kind",
            "bundle_version",
            "pyradiomics_version",
            "params_sha256",
            "image_types",
            "feature_classes",
            "cache_salt",
            "channel_names",
            "min_voxels",
            "roi_size",
            "profile",
        ),
        sum_keys=("n_cached",),
        max_keys=("seconds",),
        # every per-case record of the sidecar, joined over the parts (rank 0's alone would describe its cases only)
        per_case_keys=(
            "lesion_at_border",
            "mask_rules",
            "constant_image_channels",
            "lesion_cut_by_box",
            "roi_geometry",
        ),
        with_failures=True,
    ),
}
# set to the merge time, each in the format its writer uses (scripts.pretrain.embed, scripts.downstream.radiomics)
TIME_KEYS = {
    "written": lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "created": lambda: datetime.now(UTC).isoformat(timespec="seconds"),
}


@dataclass
class Part:
    """One rank's rows as read back from disk."""

    rank: int
    ids: list[str]
    columns: list[str]
    values: np.ndarray
    meta: dict
    failures: list[list[str]] = field(default_factory=list)  # rows of FAILURE_COLUMNS


@dataclass(frozen=True)
class MergeResult:
    table_path: Path
    n_rows: int
    n_failed: int
    world: int


# ------------------------------------------------------------------------------------------------------ the shards


def case_ids(items: Sequence[dict]) -> list[str]:
    """The case ids of datalist items, in datalist order (the order of the merged table)."""
    return [str(item["id"]) for item in items]


def shard_positions(ids: Sequence[str], rank: int, world: int) -> list[int]:
    """Positions (in ``ids``' order) of the cases of process ``rank`` of ``world``.

    Round robin over the sorted ids: disjoint, complete, and independent of the order the ids arrive in; shards
    differ in size by at most one case. A process with no case is refused: it would be a configuration mistake.
    """
    world, rank = int(world), int(rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not a process of a world of {world}")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate case ids cannot be sharded (each id is one table row): {dupes}")
    if world > len(ids):
        raise ValueError(
            f"{world} processes for {len(ids)} case(s): some processes would have nothing to do; "
            f"use at most {len(ids)} (--nproc_per_node x --nnodes)"
        )
    by_id = sorted(range(len(ids)), key=ids.__getitem__)
    return sorted(by_id[rank::world])


def shard_items(items: Sequence[dict], rank: int, world: int) -> list[dict]:
    """This process's datalist items, in datalist order (see :func:`shard_positions`)."""
    return [items[i] for i in shard_positions(case_ids(items), rank, world)]


def workers_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """Worker processes per rank so that ranks on this machine x workers <= its cores (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // max(1, int(local_world_size)))


# ------------------------------------------------------------------------------------------------------ part files


def part_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """``eval/ssl_features.csv`` -> ``eval/ssl_features.part0of4.csv`` (its sidecars follow the part's stem)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.part{int(rank)}of{int(world)}{p.suffix}")


def part_files(path: str | os.PathLike, rank: int, world: int, with_failures: bool = False) -> list[Path]:
    """Every file rank ``rank`` writes: the table, its sidecar and, for radiomics, the failure report."""
    table = part_path(path, rank, world)
    return [table, meta_path(table)] + ([failures_path(table)] if with_failures else [])


def read_part(path: str | os.PathLike, rank: int, world: int, with_failures: bool = False) -> Part:
    table = part_path(path, rank, world)
    ids, columns, values, meta = read_feature_table(table)
    failures = read_failures(failures_path(table)) if with_failures else []
    return Part(rank, ids, columns, values, meta, failures)


# ----------------------------------------------------------------------------------------------------------- merge


def _part_problems(path: Path, world: int, with_failures: bool, reports: list[dict] | None) -> list[str]:
    hosts = {int(r["rank"]): r.get("host", "?") for r in reports or []}
    # by file name: the ranks of a multi-node job may see the shared folder under different mount points
    written = {name: sha for r in reports or [] for name, sha in r.get("files", {}).items()}
    problems = []
    for rank in range(world):
        for f in part_files(path, rank, world, with_failures):
            who = f"rank {rank} on host {hosts.get(rank, '?')}"
            if not f.is_file():
                problems.append(f"missing: {f} ({who})")
            elif reports is not None and written.get(f.name) != sha256_file(f):
                problems.append(f"not the file {who} wrote (stale part of an earlier run, or another machine's): {f}")
    return problems


def check_parts_present(
    path: str | os.PathLike,
    world: int,
    with_failures: bool = False,
    reports: list[dict] | None = None,
    wait_s: float = 0.0,
) -> None:
    """Every part file is visible here and, when the ranks' ``reports`` are given, is the one that rank wrote.

    Parts written on another machine are invisible unless the output folder is shared; a part left by an earlier
    run is caught by its content hash. A network file system may show another machine's new file a few seconds
    late, so the check is repeated for up to ``wait_s`` seconds. One error lists every problem, with the rank and
    host that wrote the file.
    """
    deadline = time.monotonic() + float(wait_s)
    problems = _part_problems(Path(path), world, with_failures, reports)
    if problems and wait_s > 0:
        logger.info("waiting up to %.0f s for %d part file(s) to show up: %s", wait_s, len(problems), problems[:3])
    while problems and time.monotonic() < deadline:
        time.sleep(min(2.0, float(wait_s)))
        problems = _part_problems(Path(path), world, with_failures, reports)
    if problems:
        raise FileNotFoundError(
            f"cannot merge the {world} parts of {path} on {socket.gethostname()}:\n  "
            + "\n  ".join(problems)
            + "\nOn several machines the output folder must be shared by all of them: rank 0 merges every rank's "
            "part. Otherwise copy the parts here and run: python -m scripts.run.sharding merge TABLE --datalist DATALIST "
            f"--world {world} --kind embeddings|radiomics"
        )


def _reference_part(parts: list[Part], position: dict[str, int]) -> Part | None:
    """The part holding the earliest case of the datalist among all rows: its columns are the table's, as in a
    single run, where the first successful case sets the columns (its part's first row never differs from it)."""
    with_rows = [p for p in parts if p.ids]
    return min(with_rows, key=lambda p: position.get(p.ids[0], len(position))) if with_rows else None


def _align_columns(parts: list[Part], reference: Part | None, with_failures: bool) -> list[str]:
    """Put every part in the reference column order; a part with other columns is an error (embeddings) or, like a
    single radiomics run, turns its rows into failures (a case with other channels)."""
    if reference is None:
        return parts[0].columns if parts else []
    columns, expected = reference.columns, set(reference.columns)
    for p in parts:
        if not p.ids or p.columns == columns:
            continue
        got = set(p.columns)
        if got == expected:
            index = [p.columns.index(c) for c in columns]
            p.values, p.columns = p.values[:, index], list(columns)
            continue
        missing, extra = sorted(expected - got), sorted(got - expected)
        if not with_failures:
            raise ValueError(
                f"part of rank {p.rank} has other columns than rank {reference.rank}'s: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})"
            )
        reason = (
            f"feature columns differ from case {reference.ids[0]!r} (different channels?): "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})"
        )
        p.failures += [[case_id, "", reason] for case_id in p.ids]
        p.ids, p.columns, p.values = [], list(columns), np.zeros((0, len(columns)))
    return list(columns)


def _check_coverage(ids: list[str], parts: list[Part]) -> None:
    """Each case of the datalist is in exactly one part, as a row or a failure; nothing else is."""
    owner: dict[str, list[int]] = {}
    for p in parts:
        for case_id in p.ids + [f[0] for f in p.failures]:
            owner.setdefault(case_id, []).append(p.rank)
    known = set(ids)
    twice = {i: r for i, r in owner.items() if len(r) > 1}
    unknown = sorted(set(owner) - known)
    missing = [i for i in ids if i not in owner]
    problems = []
    if twice:
        problems.append(f"{len(twice)} case(s) in several parts (case: ranks): {dict(list(twice.items())[:10])}")
    if unknown:
        problems.append(f"{len(unknown)} case(s) not in the datalist: {unknown[:10]}")
    if missing:
        problems.append(f"{len(missing)} case(s) of the datalist in no part: {missing[:10]}")
    if problems:
        raise ValueError(
            "the parts do not cover the datalist exactly once (were they written from another datalist or number of "
            "processes?): " + "; ".join(problems)
        )


def _same(values: dict[int, object]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) <= 1


def merge_meta(parts: list[Part], rules: MetaRules, ids: list[str], hosts: dict[int, str] | None = None) -> dict:
    """Rank 0's sidecar, with keys that must agree checked, counts summed, per-case dicts joined, times updated."""
    base = dict(parts[0].meta)
    for key in rules.must_agree:
        values = {p.rank: p.meta.get(key) for p in parts}
        if not _same(values):
            raise ValueError(
                f"the parts disagree on {key!r} (rank: value) {values}: every process must run the same bundle, "
                "checkpoint and settings"
            )
    for key in rules.sum_keys:
        base[key] = sum(int(p.meta.get(key, 0)) for p in parts)
    for key in rules.max_keys:
        base[key] = max(p.meta.get(key, 0) for p in parts)
    for key in rules.per_case_keys:
        joined = {k: v for p in parts for k, v in (p.meta.get(key) or {}).items()}
        base[key] = {i: joined[i] for i in ids if i in joined}
    for key, now in TIME_KEYS.items():
        if key in base:
            base[key] = now()
    base["sharded"] = {
        "world_size": len(parts),
        "parts": [
            {"rank": p.rank, "host": (hosts or {}).get(p.rank, "?"), "n_rows": len(p.ids), "n_failed": len(p.failures)}
            for p in parts
        ],
    }
    return base


def merge_parts(
    path: str | os.PathLike,
    ids: Sequence[str],
    world: int,
    rules: MetaRules | str = "embeddings",
    reports: list[dict] | None = None,
    remove_parts: bool = True,
    wait_s: float = 0.0,
) -> MergeResult:
    """The ``world`` parts of ``path`` -> ``path`` (+ sidecar, + failure report), rows in the order of ``ids``.

    ``ids`` are the datalist's case ids in datalist order; every one must be in exactly one part (as a row or, for
    radiomics, a failure). ``reports`` (from :func:`gather_reports`) lets the merge prove each part is the file its
    rank wrote; a missing or different part is looked for again for up to ``wait_s`` seconds (network file systems).
    The parts are removed once the merged files are in place.
    """
    rules = RULES[rules] if isinstance(rules, str) else rules
    path, ids, world = Path(path), [str(i) for i in ids], int(world)
    check_parts_present(path, world, rules.with_failures, reports, wait_s)
    parts = [read_part(path, r, world, rules.with_failures) for r in range(world)]
    position = {case_id: i for i, case_id in enumerate(ids)}
    _check_coverage(ids, parts)
    columns = _align_columns(parts, _reference_part(parts, position), rules.with_failures)

    rows = {case_id: row for p in parts for case_id, row in zip(p.ids, p.values)}
    out_ids = [i for i in ids if i in rows]
    values = np.array([rows[i] for i in out_ids], dtype=np.float64).reshape(len(out_ids), len(columns))
    failures = sorted((f for p in parts for f in p.failures), key=lambda f: position[f[0]])

    hosts = {int(r["rank"]): str(r.get("host", "?")) for r in reports or []}
    meta = merge_meta(parts, rules, out_ids, hosts)
    meta["n_cases"] = len(ids)
    if rules.with_failures:
        meta.update(n_ok=len(out_ids), n_failed=len(failures))
    if "n_features" in meta:
        meta["n_features"] = len(columns)
    if "n_nonfinite_values" in meta:
        meta["n_nonfinite_values"] = int((~np.isfinite(values)).sum())

    with output_lock(path.parent):  # table, meta.json and failures of one run: never mixed with a concurrent run's
        write_feature_table(path, out_ids, columns, values, meta, failures if rules.with_failures else None)
    if remove_parts:
        for rank in range(world):
            for f in part_files(path, rank, world, rules.with_failures):
                f.unlink(missing_ok=True)
    logger.info("merged %d parts into %s: %d rows, %d failures", world, path, len(out_ids), len(failures))
    return MergeResult(path, len(out_ids), len(failures), world)


# ----------------------------------------------------------------------------------------------- the ranks together


def wait_group(world: int, hours: float = 48.0):
    """A gloo process group with a long timeout for the final rendezvous (None without torchrun).

    Shards finish at different times (a rank of large lesions, a rank resumed from a full cache), often far beyond
    the default 10-30 min collective timeout. Created right after ``init_process_group``, while the ranks are
    together; gloo works beside nccl and carries only a few bytes here.
    """
    if int(world) <= 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(hours=float(hours)))


def gather_reports(report: dict, world: int, group=None) -> list[dict]:
    """Every rank's ``report`` in rank order, once all ranks have sent theirs (this is the barrier)."""
    if int(world) <= 1:
        return [report]
    if not dist.is_initialized():
        raise RuntimeError(f"WORLD_SIZE is {world} but no process group is initialised: launch with torchrun")
    if dist.get_world_size() != int(world):
        raise RuntimeError(f"WORLD_SIZE {world} != process group size {dist.get_world_size()}")
    out: list = [None] * int(world)
    dist.all_gather_object(out, report, group=group)
    return out


def finish_shard(
    path: str | os.PathLike,
    ids: Sequence[str],
    rank: int,
    world: int,
    rules: MetaRules | str = "embeddings",
    group=None,
    wait_s: float = 60.0,
) -> MergeResult | None:
    """Called by every rank after writing its part: report it, wait for all ranks, and on rank 0 merge the parts."""
    rules = RULES[rules] if isinstance(rules, str) else rules
    files = part_files(path, rank, world, rules.with_failures)
    report = {
        "rank": int(rank),
        "host": socket.gethostname(),
        "files": {f.name: sha256_file(f) if f.is_file() else None for f in files},
    }
    reports = gather_reports(report, world, group)
    if int(rank) != 0:
        return None
    return merge_parts(path, ids, world, rules, reports=reports, wait_s=wait_s)


def merge_cli(
    table: str,
    datalist: str,
    world: int,
    kind: str = "embeddings",
    sections: Sequence[str] = ("training", "testing"),
    data_root: str | None = None,
) -> str:
    """Merge parts by hand, e.g. after copying the parts of an unshared multi-node run next to ``table``.

    ``kind`` is ``embeddings`` or ``radiomics``; ``datalist`` and ``sections`` must be the run's (they give the
    row order and the cases to expect).
    """
    from scripts.data.datalist import load_sections

    ids = case_ids(load_sections(datalist, tuple(sections), data_root))
    return str(merge_parts(table, ids, int(world), kind).table_path)


def main(argv: list[str] | None = None) -> str:
    from scripts import cli

    ap = cli.parser("python -m scripts.run.sharding", "Sharded feature tables: merge the per-rank parts by hand.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("merge", help=merge_cli.__doc__.splitlines()[0], description=merge_cli.__doc__)
    p.add_argument("table", help="the merged table to write (its parts lie next to it)")
    p.add_argument("datalist", help="the run's datalist")
    p.add_argument("world", type=int, help="number of ranks (parts) of the run")
    p.add_argument("--kind", default="embeddings", choices=sorted(RULES), help="(default: %(default)s)")
    p.add_argument("--sections", default="training,testing", help="the run's datalist sections (default: %(default)s)")
    p.add_argument("--data_root", default=None, help="refuse any path that resolves outside this folder")
    args = vars(ap.parse_args(argv))
    args.pop("command")
    args["sections"] = [s.strip() for s in args["sections"].split(",") if s.strip()]
    out = merge_cli(**args)
    print(out)
    return out


if __name__ == "__main__":
    main()
