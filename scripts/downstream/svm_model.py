"""A deployable linear SVM on the SSL embeddings: fit once on a labelled feature table, save, load, predict one case.

The evaluation workflow (``scripts.downstream.evaluation``) fits many SVMs inside cross-validation and keeps none; a served
model needs ONE, fitted on every labelled case with the protocol's own recipe (``scripts.downstream.protocol.fit_final``:
StandardScaler + LinearSVC, C chosen by balanced accuracy on a stratified held-out part). This module is plain
numpy/scikit-learn (no MONAI Label import) so the evaluation workflow can call :func:`train_and_save_svm` too.
Fitting imports the bundle's ``scripts`` package lazily: loading and predicting need only scikit-learn, so the
MONAI Label server (which puts only the app folder on ``sys.path``) can serve a saved SVM.

The file is a joblib pickle: load only files you produced yourself (unpickling runs code, like ``torch.load``
without ``weights_only``). A JSON sidecar (``<file>.json``) records classes, columns, C and provenance so the
model can be inspected without unpickling it.

An SVM reads one encoder's features: fitted on the embeddings of checkpoint A, it predicts garbage (with no error)
from checkpoint B's. So the provenance records the encoder its embeddings came from (the embeddings table's
``checkpoint_sha256`` and input record, ``scripts.pretrain.embed``), and every consumer checks the pair: ``load_svm``
given the served checkpoint and the MONAI Label app refuse an SVM of another encoder, naming both hashes; an SVM is
never saved beside a ``model.pt`` (``models/svm_ssl.joblib`` beside ``models/model.pt``) that is not its encoder, and
the evaluation workflow writes such an SVM next to its report instead (:func:`svm_destination`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.pipeline import Pipeline

from scripts.downstream.protocol import ProtocolSettings
from scripts.io_utils import py_scalar, sha256_file

SVM_FORMAT = 1
DEFAULT_SVM_NAME = "svm_ssl.joblib"
SERVED_CHECKPOINT = "model.pt"  # the encoder an SVM saved in the same folder is served with (models/)

logger = logging.getLogger(__name__)


@dataclass
class SavedSVM:
    """A fitted scaler + linear SVM and what it needs to be applied to one embedding."""

    pipeline: Pipeline
    classes: list
    columns: list[str]
    class_names: dict[str, str] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def name_of(self, label) -> str:
        return str(self.class_names.get(str(label), label))

    def predict(self, embedding: np.ndarray) -> dict:
        """``{"label", "label_name", "scores": [{"idx", "label", "score"}...]}`` for one embedding.

        Scores are SVM decision values per class (binary: +d for the second class, -d for the first), in the
        ``{"idx", "label", "score"}`` list MONAI Label's classification writer uses.
        """
        x = np.asarray(embedding, dtype=np.float64).reshape(1, -1)
        if x.shape[1] != len(self.columns):
            raise ValueError(
                f"SVM was fitted on {len(self.columns)} features ({self.columns[0]} … {self.columns[-1]}), "
                f"got an embedding of {x.shape[1]}"
            )
        if not np.isfinite(x).all():
            raise ValueError("embedding has non-finite values; refusing to predict")
        label = py_scalar(self.pipeline.predict(x)[0])
        decision = np.asarray(self.pipeline.decision_function(x), dtype=np.float64).reshape(-1)
        per_class = [-decision[0], decision[0]] if len(self.classes) == 2 else list(decision)
        scores = [
            {"idx": i, "label": self.name_of(c), "score": float(s)}
            for i, (c, s) in enumerate(zip(self.classes, per_class))
        ]
        return {"label": label, "label_name": self.name_of(label), "scores": scores}


def train_and_save_svm(
    features_csv: str | os.PathLike,
    datalist: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    sections: Sequence[str] = ("training",),
    label_names: Mapping | None = None,
    protocol: ProtocolSettings | None = None,
) -> Path:
    """Fit the SVM on the labelled cases of ``datalist`` found in ``features_csv`` and save it to ``out_path``.

    Every labelled case must be in the table (``scripts.downstream.feature_sets.load_and_join`` names the missing ones).
    Writes ``out_path`` (joblib) and ``out_path + '.json'`` (classes, columns, C, provenance); returns ``out_path``.
    """
    from scripts.data.datalist import read_labels
    from scripts.downstream.feature_sets import load_and_join
    from scripts.downstream.protocol import fit_final
    from scripts.io_utils import atomic_path, atomic_write_json, sha256_file

    protocol = protocol if protocol is not None else ProtocolSettings()
    C_grid, class_weight, val_fraction, seed = list(protocol.C_grid), protocol.class_weight, protocol.val_fraction, 0
    seed = protocol.seeds[0]  # C is tuned as the protocol's first CV seed tunes it
    encoder = encoder_of(features_csv)
    served = served_beside(out_path)
    if served is not None:  # checked before the fit: nothing is written beside an encoder it does not belong to
        problem = mismatch(encoder, served)
        if problem:
            raise ValueError(
                f"refusing to save the SVM to {out_path}: {problem}. The SVM beside {served} must be fitted on that "
                f"checkpoint's embeddings (embed with it first), or save it elsewhere (svm_path)"
            )
    labels, unlabelled = read_labels(datalist, tuple(sections))
    joined = load_and_join({"ssl": features_csv}, labels, unlabelled=unlabelled)
    X, y = joined.X["ssl"], joined.y
    pipeline, best_C = fit_final(X, y, C_grid, class_weight, val_fraction, seed)
    classes = [py_scalar(c) for c in pipeline.classes_]
    counts = {str(c): int((y == c).sum()) for c in pipeline.classes_}
    info = {
        "format": SVM_FORMAT,
        "classes": classes,
        "class_names": {str(k): str(v) for k, v in (label_names or {}).items()},
        "columns": list(joined.columns["ssl"]),
        "provenance": {
            "kind": "svm_ssl",
            "features": os.path.abspath(features_csv),
            "features_sha256": sha256_file(features_csv),
            "encoder_checkpoint": encoder["checkpoint"],
            "encoder_sha256": encoder["sha256"],
            "input_record": encoder["input_record"],
            "datalist": os.path.abspath(datalist),
            "sections": list(sections),
            "n_cases": int(len(y)),
            "class_counts": counts,
            "C": best_C,
            "C_grid": [float(c) for c in C_grid],
            "class_weight": class_weight,
            "val_fraction": val_fraction,
            "seed": seed,
            "sklearn_version": sklearn.__version__,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        joblib.dump({**info, "pipeline": pipeline}, tmp)
    atomic_write_json(sidecar_path(out_path), info)
    return out_path


def sidecar_path(svm_path: str | os.PathLike) -> Path:
    return Path(f"{svm_path}.json")


def encoder_of(features_csv: str | os.PathLike) -> dict:
    """``{"checkpoint", "sha256", "input_record"}`` of the encoder whose embeddings ``features_csv`` holds, from its
    ``.meta.json`` (``None`` values when the table does not say: then no served encoder can be matched to it)."""
    meta = Path(features_csv).with_name(Path(features_csv).stem + ".meta.json")
    prov = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    return {
        "checkpoint": prov.get("checkpoint"),
        "sha256": prov.get("checkpoint_sha256"),
        "input_record": prov.get("input_record"),
    }


def served_beside(svm_path: str | os.PathLike) -> Path | None:
    """The ``model.pt`` in the SVM's folder (the encoder an app serves with it), or None when there is none."""
    checkpoint = Path(svm_path).parent / SERVED_CHECKPOINT
    return checkpoint if checkpoint.is_file() else None


def mismatch(encoder: Mapping, checkpoint: str | os.PathLike) -> str | None:
    """Why an SVM of ``encoder`` (:func:`encoder_of`, or a saved SVM's provenance) does not belong to
    ``checkpoint`` (its sha256, then its input record ``model.input.json``); None when it does."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        return f"the served encoder {checkpoint} does not exist"
    actual = sha256_file(checkpoint)
    recorded = encoder.get("sha256") or encoder.get("encoder_sha256")
    if not recorded:
        return (
            f"the SVM's embeddings record no encoder checkpoint (no checkpoint_sha256 in their table's meta.json), "
            f"so it cannot be matched to {checkpoint} (sha256 {actual})"
        )
    origin = encoder.get("checkpoint") or encoder.get("encoder_checkpoint")
    if recorded != actual:
        return f"it is fitted on embeddings of {origin} (sha256 {recorded}), not of {checkpoint} (sha256 {actual})"
    record = checkpoint.with_name(checkpoint.stem + ".input.json")
    served_input = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    fitted_input = encoder.get("input_record")
    if served_input is not None and fitted_input is not None and served_input != fitted_input:
        return (
            f"its embeddings were made on the input {json.dumps(fitted_input)}, while {checkpoint} (sha256 {actual}) "
            f"is served on {json.dumps(served_input)} ({record})"
        )
    return None


def svm_destination(
    svm_path: str | os.PathLike, features_csv: str | os.PathLike, fallback_dir: str | os.PathLike
) -> str:
    """Where the evaluation workflow saves its SVM: ``svm_path``, unless a ``model.pt`` beside it is another encoder
    than the one ``features_csv`` was embedded with; then ``fallback_dir/<name>`` (next to the report), with a
    warning naming both, so the shipped ``models/svm_ssl.joblib`` is never replaced by an SVM of another encoder.
    When the SVM goes to ``svm_path``, one an earlier run left in ``fallback_dir`` is removed (it is not this run's)."""
    if not Path(features_csv).is_file():  # no table, no SVM (evaluate.json disables it): nothing to decide
        return str(svm_path)
    served = served_beside(svm_path)
    problem = mismatch(encoder_of(features_csv), served) if served is not None else None
    elsewhere = Path(fallback_dir) / Path(svm_path).name
    if problem is None:
        for earlier in (elsewhere, sidecar_path(elsewhere)):  # an earlier run's SVM of another encoder: not this run's
            if earlier.resolve() != Path(svm_path).resolve() and earlier.is_file():
                earlier.unlink()
        return str(svm_path)
    logger.warning(
        "the SVM on %s is saved to %s, not %s: %s. To serve it, embed with %s and evaluate again (or run "
        "python -m scripts.run.pipeline, which does both)",
        features_csv, elsewhere, svm_path, problem, served,
    )  # fmt: skip
    return str(elsewhere)


def load_svm(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> SavedSVM:
    """Load a file written by :func:`train_and_save_svm` (trusted files only: it is a pickle).

    ``checkpoint``: the encoder that will embed the cases this SVM classifies (the app's ``models/model.pt``); an
    SVM fitted on another encoder's embeddings (or one that does not record its encoder) is refused, naming both
    hashes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVM file not found: {path}")
    payload = joblib.load(path)
    if not isinstance(payload, dict) or payload.get("format") != SVM_FORMAT or "pipeline" not in payload:
        raise ValueError(f"{path} is not an SVM file written by train_and_save_svm (format {SVM_FORMAT})")
    if checkpoint is not None:
        problem = mismatch(dict(payload.get("provenance", {})), checkpoint)
        if problem:
            raise ValueError(
                f"SVM {path} does not belong to the encoder {checkpoint}: {problem}. Refit it on that encoder's "
                f"embeddings (python -m scripts.run.pipeline, or evaluating on a table embedded with {checkpoint})"
            )
    return SavedSVM(
        pipeline=payload["pipeline"],
        classes=list(payload["classes"]),
        columns=list(payload["columns"]),
        class_names=dict(payload.get("class_names", {})),
        provenance=dict(payload.get("provenance", {})),
    )


def describe(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a saved SVM (no unpickling)."""
    return json.loads(sidecar_path(path).read_text(encoding="utf-8"))
