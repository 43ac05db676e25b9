"""pyradiomics over a cohort for the downstream protocol: 107 "original" features per case, parallel, cached, with
failures.

The paper's traditional features (Section 3, "Feature extraction and aggregation") are pyradiomics' shape, first
order, GLCM, GLRLM, GLSZM, GLDM and NGTDM features of the lesion. One case is ``scripts.downstream.radiomics_case``
(``extract_case``, ``load_case_files``); ``extract_cohort`` runs it over a datalist in worker processes, caches each
case's result on disk (so a rerun or a resumed run recomputes nothing that is unchanged) and writes a feature table
plus a failure report, all or nothing, so one bad case never costs a whole cohort and is never silently dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import os
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nibabel  # noqa: F401 - read lazily by scripts.data.datalist; imported here so the fork server preloads it
import numpy as np
import radiomics
import SimpleITK as sitk
from radiomics import featureextractor
from tqdm.auto import tqdm

from scripts.data.geometry import geometry_level, geometry_warnings
from scripts.data.lesion_mask import MIN_MASK_VOXELS, rule_level
from scripts.data.validation import validate_items
from scripts.data.volumes import file_problem
from scripts.downstream.radiomics_case import (
    EXTRACTORS,
    RadiomicsCaseError,
    extract_case,
    extractor_key,
    get_extractor,
    image_paths,
    load_case_files,
    quiet_pyradiomics,
)
from scripts.feature_table import failures_path, meta_path, write_feature_table
from scripts.io_utils import atomic_write_json, ensure_writable_dir, output_lock, sha256_file

logger = logging.getLogger(__name__)

# MIN_MASK_VOXELS (from scripts.data.datalist, shared with the validator): a lesion of fewer voxels has no meaningful
# shape or texture (pyradiomics itself refuses a single voxel).
# Part of every cache key: bump it when what a cache entry means changes (e.g. a new column naming scheme).
# "2": entries also record whether the lesion touches the border of the described volume.
# "3": the mask rule (labels merged, soft mask thresholded, components) and notes are recorded.
# "4": the ROI loader's box geometry (cut, padded, resampled, in mm) is recorded in the notes.
CACHE_VERSION = "4"
# Worker processes run one case each; nested thread pools would only oversubscribe the cores.
_THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)

LoadCase = Callable[[dict], tuple[np.ndarray, np.ndarray, tuple]]


@dataclass(frozen=True)
class CaseFailure:
    case_id: str
    file: str
    reason: str


@dataclass(frozen=True)
class CohortResult:
    table_path: Path
    failures_path: Path
    n_ok: int
    n_failed: int
    n_cached: int
    failures: tuple[CaseFailure, ...] = field(default=())
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------------------ caching


def _file_hashes(item: dict) -> list[tuple[str, str]]:
    """(role, sha256) of each image and mask file; a missing file is a case failure that names it."""
    case_id = str(item["id"])
    for key in ("image", "mask"):
        if item.get(key) in (None, "", []):
            raise RadiomicsCaseError(case_id, f"datalist item has no {key!r} entry")
    files = [("image", p) for p in image_paths(item)] + [("mask", str(item["mask"]))]
    out = []
    for role, path in files:
        problem = file_problem(path)  # never raises: a 300-byte name is this case's failure, not the cohort's
        if problem == "missing file":
            raise RadiomicsCaseError(case_id, f"missing {role} file", path)
        if problem:
            raise RadiomicsCaseError(case_id, f"{role} {problem}", path)
        out.append((role, sha256_file(path)))
    return out


def case_cache_key(
    item: dict,
    params_sha256: str,
    cache_salt: str = "",
    channel_names: Sequence[str] | None = None,
    min_voxels: int = MIN_MASK_VOXELS,
) -> str:
    """sha256 over everything a case's features depend on: file bytes, params, preprocessing salt, naming, versions."""
    h = hashlib.sha256()

    def part(label: str, value: str) -> None:
        data = value.encode("utf-8")
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    part("cache_version", CACHE_VERSION)
    part("pyradiomics", str(radiomics.__version__))
    for role, digest in _file_hashes(item):
        part(role, digest)
    part("params", params_sha256)
    part("salt", str(cache_salt))
    part("channel_names", json.dumps(list(channel_names) if channel_names is not None else None))
    part("min_voxels", str(int(min_voxels)))
    return h.hexdigest()


def _read_cache(cache_dir: Path, key: str) -> tuple[dict[str, float], tuple[str, ...], dict] | None:
    """(features, border sides, notes) of a cached case, or None (absent, or unreadable: then it is recomputed)."""
    path = cache_dir / f"{key}.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") != key or not isinstance(entry.get("features"), dict):
            raise ValueError("unexpected content")
        features = {str(k): float(v) for k, v in entry["features"].items()}
        notes = entry.get("notes", {})
        if not isinstance(notes, dict):
            raise ValueError("notes is not an object")
        return features, tuple(str(side) for side in entry.get("lesion_at_border", [])), notes
    except (ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring unreadable radiomics cache entry %s (%s); recomputing", path, e)
        return None


def _write_cache(cache_dir: Path, key: str, outcome: _Outcome) -> None:
    entry = {
        "cache_version": CACHE_VERSION,
        "key": key,
        "id": outcome.case_id,
        "pyradiomics_version": str(radiomics.__version__),
        "seconds": round(outcome.seconds, 4),
        "lesion_at_border": list(outcome.border),
        "notes": outcome.notes,
        "features": outcome.features,
    }
    atomic_write_json(cache_dir / f"{key}.json", entry)


# ----------------------------------------------------------------------------------------------- workers and cohort


@dataclass(frozen=True)
class _Job:
    """What every case needs besides its item; pickled once per task (small)."""

    params_file: str  # absolute: a fork server may run in another working directory
    load_case: LoadCase
    channel_names: tuple[str, ...] | None
    min_voxels: int
    # the parent's extractor (~600 bytes pickled) spares every worker pyradiomics' ~0.1 s YAML schema validation
    extractor_key: tuple[str, str]
    extractor: featureextractor.RadiomicsFeatureExtractor


@dataclass(frozen=True)
class _Outcome:
    case_id: str
    features: dict[str, float] | None
    failure: CaseFailure | None
    seconds: float
    border: tuple[str, ...] = ()  # faces of the volume the lesion touches, e.g. ("x-",)
    notes: dict = field(default_factory=dict)  # "mask_rule" when not "binary", "constant_channels"


def _root_cause(e: BaseException) -> BaseException:
    """The error inside MONAI's "applying transform <object at 0x...>" wrappers, which say nothing about the case."""
    while isinstance(e, RuntimeError) and str(e).startswith("applying transform") and e.__cause__ is not None:
        e = e.__cause__
    return e


def _load_failure(item: dict, e: Exception) -> RadiomicsCaseError:
    """Why a case could not be loaded: the validator's diagnosis of its files when it finds one (the same words as
    ``python -m scripts.data.build_cohort validate``), else the loader's own error."""
    case_id = str(item["id"])
    try:
        problems = validate_items([item])
    except Exception:  # noqa: BLE001 - the diagnosis is a courtesy; the loader's error below is the fallback
        problems = []
    if len(problems) == 1:
        return RadiomicsCaseError(case_id, problems[0].problem, problems[0].file)
    if problems:
        reason = "; ".join(f"{p.problem} [{Path(p.file).name or '-'}]" for p in problems)
        return RadiomicsCaseError(case_id, reason, problems[0].file)
    cause = _root_cause(e)
    return RadiomicsCaseError(
        case_id, f"could not load case: {type(cause).__name__}: {cause}", ";".join(image_paths(item))
    )


def _run_case(item: dict, job: _Job) -> _Outcome:
    """Load and extract one case; every problem becomes a failure record instead of an exception.

    ``load_case`` may return a fourth element, a dict with what the raw volume said and the ROI no longer shows:
    ``lesion_at_border`` (faces of the scanned volume, hidden by the box's padding) and ``mask_rule``.
    """
    case_id = str(item["id"])
    t0 = time.perf_counter()
    EXTRACTORS.setdefault(job.extractor_key, job.extractor)
    try:
        try:
            loaded = job.load_case(item)
        except RadiomicsCaseError:
            raise
        except Exception as e:  # a reader/preprocessing error is this case's failure
            raise _load_failure(item, e) from e
        image, mask, spacing = loaded[:3]
        info = dict(loaded[3]) if len(loaded) > 3 and loaded[3] else {}
        notes: dict = {}
        features = extract_case(
            image,
            mask,
            spacing,
            job.params_file,
            case_id,
            channel_names=job.channel_names,
            min_voxels=job.min_voxels,
            notes=notes,
        )
        border = info.get("lesion_at_border", notes.pop("lesion_at_border", []))
        notes.pop("lesion_at_border", None)
        if info.get("mask_rule"):  # the rule applied to the raw mask (the ROI's mask is already binary)
            notes["mask_rule"] = info["mask_rule"]
        if info.get("roi_geometry"):
            notes["roi_geometry"] = info["roi_geometry"]
        if notes.get("mask_rule") == "binary":
            del notes["mask_rule"]
        return _Outcome(case_id, features, None, time.perf_counter() - t0, tuple(border), notes)
    except RadiomicsCaseError as e:
        file = e.file or (str(item.get("mask", "")) if e.about == "mask" else ";".join(image_paths(item)))
        return _Outcome(case_id, None, CaseFailure(case_id, file, e.reason), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - an unforeseen error in one case is that case's failure, not the cohort's
        cause = _root_cause(e)
        reason = f"unexpected error: {type(cause).__name__}: {cause}"
        return _Outcome(case_id, None, CaseFailure(case_id, ";".join(image_paths(item)), reason), 0.0)


def _die_with(parent_pid: int) -> None:
    """End this worker as soon as the extraction process is gone (kill -9 included), so no worker computes on for
    minutes holding memory: the kernel's parent-death signal where there is one, and a watcher thread as well
    (a fork-server worker's parent is the fork server, which outlives a killed main process by a moment)."""
    import threading

    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process: ours is gone
                os._exit(1)

    threading.Thread(target=watch, name="radiomics-parent-watch", daemon=True).start()


def _init_worker(parent_pid: int | None = None) -> None:
    """Single-threaded workers (N processes x M threads on N cores only adds contention) that die with the run."""
    if parent_pid is not None:
        _die_with(parent_pid)
    for var in _THREAD_ENV_VARS:
        os.environ[var] = "1"
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        from threadpoolctl import threadpool_limits

        globals()["_THREADPOOL_LIMITS"] = threadpool_limits(limits=1)
    except ImportError:
        pass
    quiet_pyradiomics()


def _mp_context() -> mp.context.BaseContext:
    """forkserver where available (fork is unsafe in a process that already runs threads, e.g. torch), else spawn.

    The fork server imports this module (hence pyradiomics and SimpleITK) once and forks workers from it: a pool
    starts in ~0.02 s instead of ~0.5 s of imports per worker, which matters when a case takes ~0.05 s. The server
    lives as long as this process, so later pools are as cheap. (This replaces the process-wide forkserver preload
    list, which only takes effect if no fork server is running yet.)
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _compute(tasks: list[dict], job: _Job, num_workers: int, on_outcome: Callable[[_Outcome], None]) -> None:
    """Run ``tasks`` serially or in worker processes, handing each outcome to ``on_outcome`` as soon as it is done."""
    if num_workers <= 1 or len(tasks) <= 1:
        for item in tasks:
            on_outcome(_run_case(item, job))
        return
    try:
        pickle.dumps(job.load_case)
    except Exception as e:  # any pickling error means the same thing
        raise TypeError(
            f"load_case must be picklable to run in worker processes (a module-level function or a picklable "
            f"object), got {job.load_case!r}: {e}; or use num_workers=1"
        ) from e
    pool = cf.ProcessPoolExecutor(
        max_workers=min(num_workers, len(tasks)),
        mp_context=_mp_context(),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    try:
        futures = [pool.submit(_run_case, item, job) for item in tasks]
        for future in cf.as_completed(futures):
            try:
                outcome = future.result()
            except cf.process.BrokenProcessPool as e:
                raise RuntimeError(
                    f"a radiomics worker process died ({e}), e.g. out of memory; finished cases are cached, "
                    "rerun to resume or use num_workers=1 to find the case"
                ) from e
            on_outcome(outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_items(items: list[dict]) -> list[str]:
    ids = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"datalist item {i} must be a dict with an 'id', got {item!r}")
        ids.append(str(item["id"]))
    seen, dupes = set(), set()
    for case_id in ids:
        (dupes if case_id in seen else seen).add(case_id)
    if dupes:
        raise ValueError(f"duplicate case ids in the radiomics cohort: {sorted(dupes)}")
    return ids


failures_path_for = failures_path  # the failure report's name (``scripts.feature_table``), kept for callers


def extract_cohort(
    items: list[dict],
    out_csv: str | os.PathLike,
    *,
    params_file: str | os.PathLike,
    load_case: LoadCase | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_salt: str = "",
    channel_names: Sequence[str] | None = None,
    min_voxels: int = MIN_MASK_VOXELS,
    num_workers: int = 2,
    strict: bool = False,
    progress: bool = True,
    provenance: dict | None = None,
) -> CohortResult:
    """Features of every datalist item -> ``out_csv`` (+ ``.meta.json``) and ``<stem>.failures.csv``.

    ``load_case(item) -> (image [C, ...], mask, spacing)`` must be picklable when ``num_workers > 1``; default
    :func:`load_case_files`. ``cache_salt`` must describe whatever ``load_case`` does to the files (preprocessing),
    since the cache key only sees file bytes, params and salt; every file is hashed in this process (fast next to
    pyradiomics). A failed case is reported and skipped, or raised when ``strict`` (then no table or failure report
    is written; cache entries of finished cases stay). Rows follow ``items``' order; columns come from the first
    successful case. ``provenance`` is merged into the table's sidecar (the keys this function sets win).
    """
    t0 = time.time()
    ids = _check_items(items)
    if not ids:
        raise ValueError(
            f"radiomics: no cases to extract (empty cohort); {out_csv} and its reports are left as they are"
        )
    check_output_names(out_csv)
    params_file = Path(params_file)
    extractor = get_extractor(params_file)  # a bad params file is a configuration error, not 100 case failures
    key = extractor_key(params_file)
    params_sha = key[1]
    names = tuple(str(n) for n in channel_names) if channel_names is not None else None
    job = _Job(key[0], load_case or load_case_files, names, int(min_voxels), key, extractor)
    # a table that cannot be written should fail now, not after hours of extraction
    ensure_writable_dir(Path(out_csv).parent, "radiomics output directory")
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        ensure_writable_dir(cache, "radiomics cache directory")
        if re.search(r" at 0x[0-9a-fA-F]+", cache_salt):
            logger.warning(
                "radiomics cache_salt contains object addresses (' at 0x...', e.g. a repr() of transform objects); "
                "they change every run, so the cache will never be reused. Describe the preprocessing by its settings."
            )

    features: dict[str, dict[str, float]] = {}
    border: dict[str, tuple[str, ...]] = {}
    notes: dict[str, dict] = {}
    failures: dict[str, CaseFailure] = {}
    keys: dict[str, str] = {}
    n_cached = 0

    def fail(failure: CaseFailure) -> None:
        if strict:
            raise RadiomicsCaseError(failure.case_id, failure.reason, failure.file)
        logger.warning("radiomics failed for case %r: %s [%s]", failure.case_id, failure.reason, failure.file)
        failures[failure.case_id] = failure

    with tqdm(total=len(items), desc="radiomics", unit="case", disable=not progress) as bar:
        todo = []
        for item, case_id in zip(items, ids):
            try:
                keys[case_id] = case_cache_key(item, params_sha, cache_salt, names, min_voxels)
            except RadiomicsCaseError as e:
                fail(CaseFailure(case_id, e.file, e.reason))
                bar.update()
                continue
            cached = _read_cache(cache, keys[case_id]) if cache is not None else None
            if cached is not None:
                features[case_id], border[case_id], notes[case_id] = cached
                n_cached += 1
                bar.update()
            else:
                todo.append(item)

        def on_outcome(outcome: _Outcome) -> None:
            bar.update()
            if outcome.failure is not None:
                fail(outcome.failure)
                return
            features[outcome.case_id] = outcome.features
            border[outcome.case_id] = outcome.border
            notes[outcome.case_id] = outcome.notes
            if cache is not None:
                _write_cache(cache, keys[outcome.case_id], outcome)

        _compute(todo, job, num_workers, on_outcome)

    ok_ids, columns = _consistent_rows(ids, features, fail)
    if not ok_ids:
        shown = "; ".join(f"{f.case_id!r}: {f.reason}" for f in list(failures.values())[:5])
        raise RuntimeError(
            f"radiomics: all {len(ids)} case(s) failed, no table written ({out_csv} and its reports are left as they "
            f"are): {shown}" + (f" ... and {len(failures) - 5} more" if len(failures) > 5 else "")
        )
    mask_rules = {i: notes[i]["mask_rule"] for i in ok_ids if notes.get(i, {}).get("mask_rule")}
    constant = {i: notes[i]["constant_channels"] for i in ok_ids if notes.get(i, {}).get("constant_channels")}
    for case_id, rule in mask_rules.items():
        logger.log(rule_level(rule), "radiomics case %r: mask rule applied: %s", case_id, rule)
    for case_id, chans in constant.items():
        logger.warning(
            "radiomics case %r: image channel(s) %s constant inside the lesion: intensity and texture features are "
            "degenerate (kept, listed in the table's meta.json)",
            case_id,
            chans,
        )
    geometry = {i: notes[i]["roi_geometry"] for i in ok_ids if notes.get(i, {}).get("roi_geometry")}
    cut = {i: g["lesion_cut_fraction"] for i, g in geometry.items() if g["lesion_outside_box"]}
    for case_id in cut:
        for warning in geometry_warnings(geometry[case_id]):
            logger.log(geometry_level(geometry[case_id]), "radiomics case %r: %s", case_id, warning)
    at_border = {i: ",".join(border[i]) for i in ok_ids if border.get(i)}
    for case_id, sides in at_border.items():
        logger.warning(
            "radiomics case %r: the lesion touches the border of the described volume (%s); it may continue outside "
            "it, so its shape features describe only the visible part (kept, listed in the table's meta.json)",
            case_id,
            sides,
        )
    values = np.array([[features[i][c] for c in columns] for i in ok_ids], dtype=np.float64).reshape(
        len(ok_ids), len(columns)
    )
    n_nonfinite = int((~np.isfinite(values)).sum())
    if n_nonfinite:
        bad = [i for i, row in zip(ok_ids, values) if not np.isfinite(row).all()]
        logger.warning("%d non-finite radiomics value(s) kept as NaN/Inf in cases %s", n_nonfinite, bad)
    seconds = time.time() - t0
    meta = {
        **(provenance or {}),
        "kind": "radiomics",
        "pyradiomics_version": str(radiomics.__version__),
        "params_file": str(params_file),
        "params_sha256": params_sha,
        "image_types": sorted(extractor.enabledImagetypes),
        "feature_classes": sorted(extractor.enabledFeatures),
        "cache_salt": cache_salt,
        "channel_names": list(names) if names is not None else None,
        "min_voxels": int(min_voxels),
        "n_cases": len(items),
        "n_ok": len(ok_ids),
        "n_failed": len(failures),
        "n_cached": n_cached,
        "n_features": len(columns),
        "n_nonfinite_values": n_nonfinite,
        "lesion_at_border": at_border,
        "mask_rules": mask_rules,
        "constant_image_channels": constant,
        "lesion_cut_by_box": cut,
        "roi_geometry": geometry,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    table_path = Path(out_csv)
    ordered_failures = [failures[i] for i in ids if i in failures]
    rows = [[f.case_id, f.file, f.reason] for f in ordered_failures]
    with output_lock(table_path.parent):  # table, meta.json and failures of one run, never mixed with another's
        write_feature_table(table_path, ok_ids, columns, values, provenance=meta, failures=rows)  # all or nothing
    logger.info(
        "radiomics: %d ok (%d from cache), %d failed, %d features, %.1f s -> %s",
        len(ok_ids),
        n_cached,
        len(failures),
        len(columns),
        seconds,
        table_path,
    )
    return CohortResult(
        table_path,
        failures_path(table_path),
        len(ok_ids),
        len(failures),
        n_cached,
        tuple(ordered_failures),
        seconds,
    )


def _consistent_rows(
    ids: list[str], features: dict[str, dict[str, float]], fail: Callable[[CaseFailure], None]
) -> tuple[list[str], list[str]]:
    """Rows that share the cohort's column set: the set most cases have (the first such case's order; a tie goes
    to the set seen first), so one odd case (e.g. a 2-channel image among 1-channel ones) fails alone wherever it
    is listed. A case with other columns is a failure naming both counts."""
    ok_ids = [i for i in ids if i in features]
    if not ok_ids:
        return [], []
    groups: dict[frozenset, list[str]] = {}
    for case_id in ok_ids:
        groups.setdefault(frozenset(features[case_id]), []).append(case_id)
    majority = max(groups.values(), key=len)  # max keeps the first of equal lengths: insertion = file order
    columns = list(features[majority[0]])
    expected = set(columns)
    kept = []
    for case_id in ok_ids:
        got = set(features[case_id])
        if got == expected:
            kept.append(case_id)
            continue
        missing, extra = sorted(expected - got), sorted(got - expected)
        reason = (
            f"{len(got)} feature columns where {len(majority)} other case(s) (e.g. {majority[0]!r}) have "
            f"{len(expected)} (different image channels?): {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} extra (e.g. {extra[:2]})"
        )
        fail(CaseFailure(case_id, "", reason))
    return kept, columns


def check_output_names(table_path: str | os.PathLike) -> None:
    """Refuse, before any work, a table name the file system cannot hold with its sidecars and temporary files, and
    a table (or sidecar) path that is an existing folder (``--radiomics_path eval/``): the rename would fail only
    after the whole extraction."""
    path = Path(table_path)
    for p in (path, meta_path(path), failures_path(path)):
        if p.is_dir():
            raise ValueError(
                f"radiomics output {p} is an existing folder: radiomics_path must name a table file such as "
                f"{p / 'radiomics_features.csv'} (nothing was extracted or written)"
            )
    try:
        name_max = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max(len(n.encode("utf-8")) for n in (path.name, meta_path(path).name, failures_path(path).name))
    longest += len(".") + 8 + len(".tmp") + 2  # atomic writes use ".<name>.XXXXXXXX.tmp"
    if longest > name_max:
        raise ValueError(
            f"radiomics output name {path.name!r} is {len(path.name)} characters: with its sidecars and temporary "
            f"files ({longest} bytes) it exceeds the file system's {name_max}-byte limit for a file name; choose "
            "a shorter name (nothing was extracted or written)"
        )
