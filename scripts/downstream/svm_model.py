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
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.pipeline import Pipeline

SVM_FORMAT = 1
DEFAULT_SVM_NAME = "svm_ssl.joblib"


def _py(v):
    """numpy scalar -> plain Python (JSON-safe); anything else unchanged."""
    return v.item() if isinstance(v, np.generic) else v


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
        label = _py(self.pipeline.predict(x)[0])
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
    C_grid: Sequence[float] | None = None,
    class_weight: str | dict | None = "balanced",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Fit the SVM on the labelled cases of ``datalist`` found in ``features_csv`` and save it to ``out_path``.

    Every labelled case must be in the table (``scripts.downstream.evaluation.load_and_join`` names the missing ones).
    Writes ``out_path`` (joblib) and ``out_path + '.json'`` (classes, columns, C, provenance); returns ``out_path``.
    """
    from scripts.data.datalist import read_labels
    from scripts.downstream.evaluation import load_and_join
    from scripts.downstream.protocol import DEFAULT_C_GRID, fit_final
    from scripts.io_utils import atomic_path, atomic_write_json, sha256_file

    C_grid = list(DEFAULT_C_GRID if C_grid is None else C_grid)
    labels, unlabelled = read_labels(datalist, tuple(sections))
    joined = load_and_join({"ssl": features_csv}, labels, unlabelled=unlabelled)
    X, y = joined.X["ssl"], joined.y
    pipeline, best_C = fit_final(X, y, C_grid, class_weight, val_fraction, seed)
    classes = [_py(c) for c in pipeline.classes_]
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


def load_svm(path: str | os.PathLike) -> SavedSVM:
    """Load a file written by :func:`train_and_save_svm` (trusted files only: it is a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SVM file not found: {path}")
    payload = joblib.load(path)
    if not isinstance(payload, dict) or payload.get("format") != SVM_FORMAT or "pipeline" not in payload:
        raise ValueError(f"{path} is not an SVM file written by train_and_save_svm (format {SVM_FORMAT})")
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
