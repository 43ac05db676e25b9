"""The whole path in one command: radiomics -> pretrain (plain, RE, SE; or Rubik's cube) -> embed -> supervised baseline -> report.

    python -m scripts.run.pipeline [--profile configs/data/demo.json] [--modes plain,re,se] [--epochs 10]
                               [--out eval/pipeline] [--datalist PATH] [--supervised true] [--seeds 0,1,2]
                               [--preset configs/presets/NAME.json ...] [--control true]
                               [--<config id> <value> ...]   (given to the stages whose configs have the id)

Any ``--<config id> <value>`` (e.g. ``--n_folds 3``, ``--roi_size [28,28,28]``, ``--balance#q 5``) must name an id
of the stages' configs; anything else (a typo such as ``--epoch``) is refused before a stage starts.

Every stage is the bundle command a user would type (``python -m monai.bundle run <workflow> --args_file ...``),
run in its own process and printed before it runs, so any stage can be repeated by hand. The overrides of each
stage are written to ``<out>/args/<stage>.json``. Finished stages are recorded in ``<out>/stages.json`` with a key
of everything that changes their output (``Pipeline.key``): the config files' contents, the stage's overrides, the
datalist's content and its image and mask files' contents (labels only for the stages that read them), and the
SHA-256 of the upstream files the stage reads (the checkpoint an embedding reads, the tables the evaluation reads).
A rerun skips a stage whose key is unchanged and reruns the others: a corrected label reruns the evaluation, a
rewritten mask every stage, a retrained encoder its embeddings and the evaluation.

Pretraining resumes from its last checkpoint when its last attempt had the same key (a killed pipeline continues
where it stopped) and starts afresh when the key changed (the earlier run's checkpoints go to
``checkpoints/previous/``); radiomics resumes from its per-case cache, the supervised baseline from its per-fold
cache. One pipeline writes into an output folder at a time: a second one refuses at once, naming the first
(``scripts.io_utils.acquire_writer_lock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from scripts import cli
from scripts.config_utils import as_bool, setting_problem
from scripts.io_utils import (
    FolderInUse,
    acquire_writer_lock,
    atomic_write_json,
    atomic_write_text,
    release_writer_lock,
)

ROOT = Path(__file__).resolve().parents[2]
MODE_CONFIGS = {"rubik": ("rubik.json",)}  # pretraining methods other than SimSiam: override configs over train.json


def run_modes() -> dict[str, str]:
    """{run name: balance#mode} of the runs ``--modes`` accepts: SimSiam with each registered balancing strategy
    (named by its alias where it has one: ``plain``, the name of its report rows, for ``none``) and the other
    pretraining methods, which balance nothing. Imported here, not at the top: ``--help`` needs no torch."""
    from scripts.pretrain import strategies

    alias = {mode: name for name, mode in strategies.ALIASES.items()}
    runs = {alias.get(mode, mode): mode for mode in strategies.modes()}
    return runs | {method: strategies.NoBalancing.name for method in MODE_CONFIGS}


def _cli_value(value):
    """fire leaves ``true``/``false`` as strings; pass real booleans on to the bundle configs."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _raw_config(name: str) -> dict:
    """``configs/<name>`` as plain JSON (what a user's override replaces), not parsed."""
    return json.loads((ROOT / "configs" / name).read_text(encoding="utf-8"))


def _split(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def read_preset(path: str) -> dict:
    """A preset's settings (``_comment`` left out), refusing a missing file or one that is not a JSON object."""
    file = Path(path) if os.path.isabs(path) else ROOT / path
    try:
        preset = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--preset {path}: cannot read it as a JSON config ({e})") from e
    if not isinstance(preset, dict):
        raise SystemExit(f"--preset {path}: expected a JSON object of config ids, got {type(preset).__name__}")
    return {k: v for k, v in preset.items() if not k.startswith("_")}


def _int_list(value) -> list[int] | None:
    """``0,1,2`` / ``[0, 1, 2]`` as ints; None when any item is not an integer."""
    try:
        return [int(v) for v in _split(value)]
    except ValueError:
        return None


def _path_problem(option: str, value: str, want: str) -> str | None:
    """``--out`` must be (or become) a folder and ``--datalist`` an existing file; say which option when not."""
    path = (ROOT / value) if not os.path.isabs(value) else Path(value)
    if want == "file":
        if path.is_dir():
            return f"--{option} {value}: {path} is a folder, expected a datalist JSON file"
        return None if path.is_file() else f"--{option} {value}: no such file ({path})"
    for part in (path, *path.parents):  # the first existing part must be a folder, or mkdir fails
        if part.exists():
            if part.is_dir():
                return None
            what = "is an existing file" if part == path else f"lies under {part}, which is a file"
            return f"--{option} {value}: {path} {what}, not a folder; choose an output folder"
    return None


def option_problems(
    out: str, epochs, seeds, pretrain_seeds=None, datalist: str | None = None, overrides: dict | None = None
) -> list[str]:
    """Every command-line value whose form is known, named by its option (``--epochs must be a positive integer,
    got 0``), checked before any stage runs: a bad value used to pass three stages and fail the fourth, or fail
    inside a stage without naming the option. Config ids are checked by ``scripts.config_utils.SETTINGS``."""
    problems = [setting_problem("epochs", epochs, prefix="--")]
    if _int_list(seeds) in (None, []):
        problems.append(f"--seeds must be comma-separated integers such as 0,1,2, got {seeds!r}")
    if pretrain_seeds not in (None, "") and _int_list(pretrain_seeds) in (None, []):
        problems.append(f"--pretrain_seeds must be comma-separated integers such as 0,1,2, got {pretrain_seeds!r}")
    problems.append(_path_problem("out", str(out), "folder"))
    if datalist:
        problems.append(_path_problem("datalist", str(datalist), "file"))
    problems += [setting_problem(k, v, prefix="--") for k, v in (overrides or {}).items()]
    return [p for p in problems if p]


def check_presets(presets: dict[str, dict], profile: str) -> None:
    """Refuse a preset id that no stage's configs have (a typo would otherwise change nothing), naming both."""
    known = config_ids(profile)
    for path, preset in presets.items():
        unknown = sorted(set(preset) - set(known(preset)))
        if unknown:
            raise SystemExit(f"--preset {path}: {unknown} is not an id of any stage's configs")


class Pipeline:
    """Runs the stages in order; ``stages.json`` makes it resumable."""

    def __init__(
        self,
        out: Path,
        profile: str,
        datalist: str | None,
        common: dict | None = None,
        dry_run: bool = False,
        presets: dict[str, dict] | None = None,
    ) -> None:
        self.out, self.profile, self.datalist, self.dry_run = out, profile, datalist, dry_run
        if datalist is None and not dry_run:  # every stage gets the same file, and its content is in their keys
            self.datalist = resolve_datalist(profile)
        self.common = dict(common or {})
        self.presets = dict(presets or {})
        self.state_path = out / "stages.json"
        self.state = json.loads(self.state_path.read_text(encoding="utf-8")) if self.state_path.is_file() else {}
        self._fingerprints: dict[bool, str] = {}

    def configs(self, *names: str) -> list[str]:
        """Config files in layering order: the first (the base) config, the data profile, each preset's part that
        this stage's configs have (written to ``<out>/args/presets/``), then the other configs."""
        base = [str(ROOT / "configs" / names[0]), str(ROOT / self.profile)]
        rest = [str(ROOT / "configs" / n) for n in names[1:]]
        stage_configs = [json.loads(Path(f).read_text(encoding="utf-8")) for f in base + rest]
        layered = []
        for n, (path, preset) in enumerate(self.presets.items()):
            part = {k: v for k, v in preset.items() if any(_has_id(c, k) for c in stage_configs)}
            if part:
                stem = "_".join(Path(x).stem for x in names)
                file = self.out / "args" / "presets" / f"{stem}_{n}_{Path(path).stem}.json"
                atomic_write_json(file, {"_comment": f"the part of {path} that {names} have", **part})
                layered.append(str(file))
        return base + layered + rest

    def stage(
        self,
        name: str,
        workflow: str,
        configs: list[str],
        overrides: dict,
        outputs: list[Path],
        inputs: Iterable[Path] = (),
        labels: bool = True,
        resumable: bool = False,
    ) -> None:
        """Run one stage unless it finished earlier with the same key (:meth:`key`).

        ``inputs``: the files of earlier stages it reads (a checkpoint, feature tables); ``labels``: whether it reads
        the datalist's labels (pretraining, embedding and radiomics do not: a corrected label reruns only the stages
        that read labels). ``resumable`` (pretraining): resumes from its checkpoints when the last attempt had the same
        key (a killed run continues), and starts afresh when the key changed (the training moves the earlier run's
        checkpoints to ``checkpoints/previous/``), so its output always belongs to the current inputs."""
        overrides = {"bundle_root": str(ROOT), **self.stage_common(workflow, configs), **overrides}
        if self.datalist:
            overrides["datalist"] = self.datalist
        key = self.key(workflow, configs, overrides, inputs, labels)
        done = self.state.get(name)
        if done and done.get("finished") and done["key"] == key and all(p.exists() for p in outputs):
            print(f"[pipeline] {name}: done earlier ({done['seconds']:.0f} s), skipped", flush=True)
            return
        if resumable:  # an unfinished attempt with this key continues; anything else starts afresh
            overrides["resume"] = bool(done and done["key"] == key and not done.get("finished"))
        args_file = self.out / "args" / f"{name}.json"
        atomic_write_json(args_file, {"config_file": configs, **overrides})
        cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--args_file", str(args_file)]
        cmd += ["--meta_file", str(ROOT / "configs" / "metadata.json")]
        cmd += ["--logging_file", str(ROOT / "configs" / "logging.conf")]
        print(f"[pipeline] {name}: {' '.join(cmd)}", flush=True)
        if self.dry_run:
            return
        t0 = time.perf_counter()
        self.state[name] = {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}  # a killed attempt resumes
        atomic_write_json(self.state_path, self.state)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"[pipeline] stage {name!r} failed (exit {proc.returncode}); rerun to resume")
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise SystemExit(f"[pipeline] stage {name!r} finished but did not write {missing}")
        seconds = time.perf_counter() - t0
        self.state[name] = {"key": key, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.state_path, self.state)
        print(f"[pipeline] {name}: finished in {seconds:.0f} s", flush=True)

    def stage_common(self, workflow: str, configs: list[str]) -> dict:
        """The pipeline's ``--<id> <value>`` options this stage gets: those whose id its config files have (nested ids
        only for the workflow that owns them), so an option of another stage (``--n_bootstrap``) neither reaches it
        nor changes its key."""
        nested_for = {
            "training": ("balance#", "train#", "augmentation#"),
            "supervising": ("supervised#", "augmentation#"),
        }
        raw = [json.loads(Path(c).read_text(encoding="utf-8")) for c in configs]
        return {
            k: v
            for k, v in self.common.items()
            if ("#" not in k or k.startswith(nested_for.get(workflow, ("\0",)))) and any(_has_id(c, k) for c in raw)
        }

    def key(self, workflow: str, configs: list[str], overrides: dict, inputs: Iterable[Path], labels: bool) -> str:
        """SHA-256 of everything that changes the stage's output: the workflow, its config files' contents, its
        overrides, the datalist's content and its image and mask files' contents (:func:`datalist_fingerprint`;
        labels left out where the stage reads none) and the SHA-256 of the upstream files it reads (with their
        sidecars), so a retrained encoder re-embeds and a changed table re-evaluates."""
        contents = [hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in configs]  # an edited config reruns
        data = self.data_fingerprint(labels) if not self.dry_run else None
        upstream = {str(p): _digest(p) for p in _with_sidecars(inputs)}
        parts = [workflow, configs, contents, overrides, data, upstream]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def data_fingerprint(self, labels: bool) -> str:
        """:func:`datalist_fingerprint` of this run's datalist, computed once per run with and without labels."""
        if labels not in self._fingerprints:
            datalist = Path(self.datalist) if os.path.isabs(self.datalist) else ROOT / self.datalist  # as stages see it
            self._fingerprints[labels] = datalist_fingerprint(datalist, labels, self.out / ".file_digests")
        return self._fingerprints[labels]


def _with_sidecars(paths: Iterable[Path]) -> list[Path]:
    """Each upstream file with what is read beside it: a table's ``.meta.json`` and ``.failures.csv``, a
    checkpoint's ``.input.json``."""
    out = []
    for p in paths:
        p = Path(p)
        out.append(p)
        if p.suffix == ".csv":
            out += [p.with_name(p.stem + ".meta.json"), p.with_name(p.stem + ".failures.csv")]
        elif p.suffix == ".pt":
            out.append(p.with_name(p.stem + ".input.json"))
    return out


def _digest(path: Path) -> str:
    from scripts.io_utils import sha256_file

    return sha256_file(path) if path.is_file() else "missing"


def datalist_fingerprint(datalist: str | os.PathLike, labels: bool = True, memo_dir: Path | None = None) -> str:
    """SHA-256 of a datalist's content (every section; without the ``label`` keys when ``labels`` is false) and of
    every image and mask file it names, by content: a full SHA-256 per file, remembered per file version (path,
    size, mtime, ctime, inode) under ``memo_dir`` (``roi_loader.file_digest``), so a rerun re-reads only files that
    were rewritten, and a file rewritten in place with the same size (an edited mask) is never missed, which a
    size + mtime or first/last-MiB fingerprint could."""
    from scripts.data.datalist import SECTIONS, read_datalist_doc, section_items
    from scripts.data.roi_loader import file_digest

    path = Path(datalist).resolve()
    doc = read_datalist_doc(path)
    h = hashlib.sha256()
    for section in SECTIONS:
        for item in section_items(doc, path, section, None, strict=False):
            if not labels:
                item.pop("label", None)
            files = {k: [file_digest(f, memo_dir) for f in _paths(item.get(k))] for k in ("image", "mask")}
            h.update(json.dumps([section, item, files], sort_keys=True, default=str).encode())
    other = {k: v for k, v in doc.items() if k not in SECTIONS}
    h.update(json.dumps(other, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _paths(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)] if value else []


def resolve_datalist(profile: str) -> str:
    """The datalist the stages would use when ``--datalist`` is not given: ``datalist`` of train.json + the profile
    (the embedded demo cohort, generated if needed, or the profile's own), so the pipeline can fingerprint it and
    give every stage the same file."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / profile)])
    parser["bundle_root"] = str(ROOT)
    parser.get_parsed_content("imports")
    return str(Path(parser.get_parsed_content("datalist")).resolve())


def run(
    profile: str = "configs/data/demo.json",
    modes: str = "plain,re,se",
    epochs: int = 10,
    out: str = "eval/pipeline",
    datalist: str | None = None,
    supervised: bool = True,
    seeds: str = "0,1,2",
    pretrain_seeds: str | None = None,
    seeded_modes: str | None = None,
    dry_run: bool = False,
    svm_path: str | None = "models/svm_ssl.joblib",
    preset: list[str] | None = None,
    control: bool = True,
    **overrides,
) -> str:
    """Run every stage and return the report path. ``modes``: any of plain, re, se, bank (3DSiam without or with
    balancing) and rubik (the Rubik's cube proxy task, ``configs/rubik.json``), comma-separated.

    ``seeds`` are the SVM protocol's CV seeds. ``pretrain_seeds`` (e.g. ``0,1,2``) pretrains every mode once per
    seed (runs in ``<out>/<mode>_s<seed>``) and adds ``report/balancing.md``: each feature set's metrics as
    mean ± sd over the pretraining seeds, and each mode's step time against plain's. ``seeded_modes`` (e.g.
    ``plain,bank``) limits the seeds after the first to those modes, when there is not time to repeat every mode.

    ``preset``: preset files (``configs/presets/paper.json``), layered in order after the profile on every stage
    whose configs have their ids (the paper preset's ``context_transforms`` reaches the embedding stages too, so they
    embed on the input the encoder was trained on). ``control``: embed the first run's initial encoder
    (``models/checkpoints/model_init.pt``) as the report's ``ssl (random init)`` row, the random-init control.

    ``svm_path`` (relative to the bundle root; ``none`` to skip): the SVM that the MONAI Label app serves, fitted on
    the embeddings of the bundle's own ``models/model.pt`` (the encoder the app serves), saved with its sidecar.

    Any other ``--key value`` is a config override given to every stage (e.g. ``--n_folds 3``,
    ``--roi_size [28,28,28]``, ``--num_workers 0``, ``--steps_per_epoch 60``); nested ids go to the stage
    that owns them (``--balance#q 5`` to pretraining, ``--supervised#epochs 2`` to the supervised baseline). Stage-specific settings take precedence.
    """
    supervised, dry_run = as_bool(supervised, "supervised"), as_bool(dry_run, "dry_run")
    overrides = {k: _cli_value(v) for k, v in overrides.items()}
    problems = option_problems(out, epochs, seeds, pretrain_seeds, datalist, overrides)
    if problems:
        raise SystemExit("[pipeline] " + "; ".join(problems) + " (nothing was run)")
    modes_list, runs = _split(modes), run_modes()
    unknown = [m for m in modes_list if m not in runs]
    if unknown or not modes_list:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {sorted(runs)}")
    presets = {path: read_preset(path) for path in preset or []}
    check_presets(presets, profile)
    control = as_bool(control, "control")
    out_dir = (ROOT / out).resolve() if not os.path.isabs(out) else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # one pipeline per output folder: a second one refuses at once, naming the first
        lock = acquire_writer_lock(out_dir, "pipeline")
    except FolderInUse as e:
        raise SystemExit(f"[pipeline] refused: {e}") from None
    try:
        return _run_stages(
            out_dir, profile, datalist, overrides, dry_run, presets, modes_list, runs, epochs, supervised, seeds,
            pretrain_seeds, seeded_modes, svm_path, control,
        )  # fmt: skip
    finally:
        release_writer_lock(out_dir, lock)


def _run_stages(
    out_dir: Path, profile, datalist, overrides, dry_run, presets, modes_list, runs, epochs, supervised, seeds,
    pretrain_seeds, seeded_modes, svm_path, control,
) -> str:  # fmt: skip
    """The stages of :func:`run`, in order, while it holds the output folder's writer lock."""
    p = Pipeline(out_dir, profile, datalist, common=overrides, dry_run=dry_run, presets=presets)
    t0 = time.perf_counter()

    # radiomics first: they need no encoder, and a pretraining with the radiomics-orthogonality term reads them
    radiomics = out_dir / "radiomics_features.csv"
    p.stage(
        "radiomics",
        "extracting",
        p.configs("inference.json", "radiomics.json"),
        {"radiomics_path": str(radiomics), "output_dir": str(out_dir)},
        [radiomics],
        labels=False,
    )
    tables: dict = {}
    run_dirs: dict[str, list[Path]] = {}
    per_seed = [int(x) for x in _split(pretrain_seeds)] if pretrain_seeds not in (None, "") else [None]
    repeat = set(_split(seeded_modes)) if seeded_modes else set(modes_list)
    for seed in per_seed:
        for mode in modes_list:
            if seed != per_seed[0] and mode not in repeat:
                continue
            tag = mode if seed is None else f"{mode}_s{seed}"
            models = out_dir / tag / "models"
            seed_override = {} if seed is None else {"seed": seed}
            p.stage(
                f"pretrain_{tag}",
                "training",
                p.configs("train.json", *MODE_CONFIGS.get(mode, ())),
                {
                    "ckpt_dir": str(models),
                    "output_dir": str(out_dir / tag),
                    "epochs": int(epochs),
                    "balance#mode": runs[mode],
                    "regularizer#radiomics_table": str(radiomics),
                    **seed_override,
                },
                [models / "model.pt"],
                labels=False,
                resumable=True,
            )
            embeddings = out_dir / f"ssl_{tag}.csv"
            p.stage(
                f"embed_{tag}",
                "inferring",
                p.configs("inference.json"),
                {
                    "checkpoint": str(models / "model.pt"),
                    "embeddings_path": str(embeddings),
                    "output_dir": str(out_dir),
                },
                [embeddings],
                inputs=[models / "model.pt"],
                labels=False,
            )
            tables[f"ssl ({mode})" if seed is None else f"ssl ({mode}, seed {seed})"] = str(embeddings)
            run_dirs.setdefault(mode, []).append(out_dir / tag)
            if control and "ssl (random init)" not in tables:  # the first run's starting point: the control row
                random_init = out_dir / "ssl_random_init.csv"
                p.stage(
                    "embed_random_init",
                    "inferring",
                    p.configs("inference.json"),
                    {
                        "checkpoint": str(models / "checkpoints" / "model_init.pt"),
                        "embeddings_path": str(random_init),
                        "output_dir": str(out_dir),
                    },
                    [random_init],
                    inputs=[models / "checkpoints" / "model_init.pt"],
                    labels=False,
                )
                tables["ssl (random init)"] = str(random_init)

    tables = {"trad": str(radiomics), **tables}
    for name in [n for n in tables if n.startswith("ssl (") and n != "ssl (random init)"]:
        tables["trad+" + name] = [str(radiomics), tables[name]]

    extra_rows = {}
    if supervised:
        predictions = out_dir / "supervised_predictions.json"
        p.stage(
            "supervised",
            "supervising",
            p.configs("train.json", "supervised.json"),
            {"supervised_path": str(predictions), "output_dir": str(out_dir)},
            [predictions],
        )
        extra_rows["supervised (weighted CE)"] = str(predictions)

    svm = {}
    if svm_path not in (None, "", "none", "None"):
        svm_file = Path(svm_path) if os.path.isabs(svm_path) else ROOT / svm_path
        bundle_embeddings = out_dir / "ssl_bundle_model.csv"
        # the app serves models/model.pt on inference.json's own input (ROI size, lesion context), whatever this
        # run's pretraining overrides say: the SVM must see the embeddings the app will give it
        served_input = {
            k: v
            for k, v in _raw_config("inference.json").items()
            if k in ("roi_size", "roi_spacing_mm", "context_transforms")
        }
        p.stage(
            "embed_bundle_model",
            "inferring",
            p.configs("inference.json"),
            {"checkpoint": str(ROOT / "models" / "model.pt"), "embeddings_path": str(bundle_embeddings),
             "output_dir": str(out_dir), **served_input},
            [bundle_embeddings],
            inputs=[ROOT / "models" / "model.pt"],
            labels=False,
        )  # fmt: skip
        svm = {"ssl_table": str(bundle_embeddings), "svm_path": str(svm_file)}

    report_dir = out_dir / "report"
    p.stage(
        "evaluate",
        "evaluating",
        p.configs("train.json", "evaluate.json"),
        {
            "tables": tables,
            "extra_rows": extra_rows,
            "report_dir": str(report_dir),
            "output_dir": str(out_dir),
            "seeds": _int_list(seeds),
            **svm,
        },
        [report_dir / "report.md", *([Path(svm["svm_path"])] if svm else [])],
        inputs=[Path(t) for spec in tables.values() for t in ([spec] if isinstance(spec, str) else spec)]
        + [Path(f) for f in extra_rows.values()]
        + ([Path(svm["ssl_table"])] if svm else []),
    )
    if per_seed == [None] and not dry_run:  # an earlier run's balancing table would sit beside this run's report
        for name in ("balancing.md", "balancing.json"):
            (report_dir / name).unlink(missing_ok=True)
    if per_seed != [None] and not dry_run:
        from scripts.downstream.balancing_table import balancing_table

        md, data = balancing_table(json.loads((report_dir / "results.json").read_text(encoding="utf-8")), run_dirs)
        atomic_write_json(report_dir / "balancing.json", data)
        atomic_write_text(report_dir / "balancing.md", "# Does balancing help?\n\n" + md + "\n")
        print(md)
    print(f"[pipeline] all stages done in {time.perf_counter() - t0:.0f} s; report: {report_dir / 'report.md'}")
    return str(report_dir / "report.md")


STAGE_CONFIGS = (("train.json",), ("inference.json",), ("inference.json", "radiomics.json"),
                 ("train.json", "supervised.json"), ("train.json", "evaluate.json"))  # fmt: skip


def _has_id(config: dict, config_id: str) -> bool:
    """Whether ``a#b#0`` names an item of the (plain JSON) config, as ``monai.bundle`` ids do."""
    node = config
    for part in config_id.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def config_ids(profile: str) -> Callable[[Iterable[str]], list[str]]:
    """A function that keeps the ids (``n_folds``, ``balance#q``) that exist in at least one stage's configs.

    The configs are read as JSON (no ``monai`` import: a refused option costs a fraction of a second)."""
    files = {ROOT / "configs" / n for names in STAGE_CONFIGS for n in names} | {ROOT / profile}
    configs = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(files)]
    return lambda ids: [i for i in ids if any(_has_id(c, i) for c in configs)]


def build_parser():
    ap = cli.parser("python -m scripts.run.pipeline", __doc__)
    ap.add_argument("--profile", default="configs/data/demo.json", help="data profile (default: %(default)s)")
    ap.add_argument(
        "--modes", default="plain,re,se", help="comma-separated: plain, a balance#mode (re, se, bank, ...) or rubik"
    )
    ap.add_argument("--epochs", type=int, default=10, help="pretraining epochs per mode (default: %(default)s)")
    ap.add_argument("--out", default="eval/pipeline", help="output folder (default: %(default)s)")
    ap.add_argument("--datalist", default=None, help="datalist JSON (default: the embedded demo cohort)")
    ap.add_argument("--supervised", type=cli.boolean, default=True, help="run the supervised baseline (true/false)")
    ap.add_argument("--seeds", default="0,1,2", help="the SVM protocol's CV seeds (default: %(default)s)")
    ap.add_argument("--pretrain_seeds", default=None, help="pretrain every mode once per seed, e.g. 0,1,2")
    ap.add_argument("--seeded_modes", default=None, help="only these modes repeat for the seeds after the first")
    ap.add_argument("--dry_run", type=cli.boolean, default=False, help="print and write the stage arguments only")
    ap.add_argument(
        "--preset",
        action="append",
        default=None,
        help="a preset config (e.g. configs/presets/paper.json), layered after the profile on the stages that have "
        "its ids; repeatable, applied in order",
    )
    ap.add_argument(
        "--control",
        type=cli.boolean,
        default=True,
        help="embed the first run's initial encoder as the ssl (random init) control row (true/false)",
    )
    ap.add_argument(
        "--svm_path",
        default="models/svm_ssl.joblib",
        help="SVM for the MONAI Label app, on the embeddings of models/model.pt ('none' to skip; default: %(default)s)",
    )
    return ap


def main(argv: list[str] | None = None) -> str:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if not (ROOT / args.profile).is_file():
        ap.error(f"--profile {args.profile}: no such file (relative to {ROOT})")
    overrides = cli.split_overrides(ap, extra, config_ids(args.profile))
    problems = option_problems(args.out, args.epochs, args.seeds, args.pretrain_seeds, args.datalist, overrides)
    if problems:
        ap.error("; ".join(problems))
    return run(**vars(args), **overrides)


if __name__ == "__main__":
    main()
