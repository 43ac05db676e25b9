"""MONAI Label infer task: image + lesion mask -> the encoder's 256-d embedding (+ an SVM prediction if one is saved).

Built on ``BundleInferTask`` so the bundle's own ``configs/inference.json`` preprocessing, ``network_def`` and
``models/model.pt`` (or ``model.ts``) are used unchanged. Three things differ from the stock task, each because
the output is an embedding, not a segmentation:

- ``add_post_restore=False``: the stock ``Restored`` post transform would try to map the prediction back onto the
  image grid and crash on a [256] vector;
- ``SelectItemsd`` is filtered out of the preprocessing: it would drop the request keys (``model_filename``,
  ``device``, …) that the task reads after the transforms;
- the writer returns JSON only (``embedding``, ``prediction``), no label file.

The lesion mask comes from the request: ``mask`` (a path), or ``label`` (the file uploaded with
``POST /infer/<model>``); the app (``main.py``) fills ``mask`` from the datastore's final label otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import SelectItemsd
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from scripts.downstream.svm_model import DEFAULT_SVM_NAME, SavedSVM, load_svm
from scripts.pretrain.model_input import check_config_input
from scripts.torchscript import check_beside

logger = logging.getLogger(__name__)


def case_id_of(image: Any) -> str:
    """Case id for messages and results: the image file name without its NIfTI suffix."""
    name = Path(str(image)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class EmbeddingInferTask(BundleInferTask):
    """Serve the SSL encoder's embedding of one lesion, and the saved SVM's prediction when ``svm_path`` exists."""

    def __init__(self, path: str, conf: dict[str, str], svm_path: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(
            path,
            conf,
            type=InferType.CLASSIFICATION,
            add_post_restore=False,
            pre_filter=[SelectItemsd],
            load_strict=True,
            **kwargs,
        )
        if not self.is_valid():
            raise ValueError(
                f"{path} is not a usable bundle for MONAI Label: it needs configs/inference.json, "
                "configs/metadata.json and models/model.pt or models/model.ts"
            )
        model_ts = Path(path) / "models" / "model.ts"
        if model_ts.is_file():
            check_beside(model_ts)  # the bundle's two weight files must agree: refuse a stale TorchScript export
        # the preprocessing served is the bundle's inference.json: it must give the encoder its training input
        check_config_input(
            Path(path) / "models" / "model.pt",
            ConfigParser.load_config_file(str(Path(path) / "configs" / "inference.json")),
        )
        self.checkpoint = Path(path) / "models" / "model.pt"
        self.svm_path = Path(svm_path) if svm_path else Path(path) / "models" / DEFAULT_SVM_NAME
        self._svm: tuple[float, SavedSVM] | None = None
        self.description = "SSL radiomic embedding (256-d) of the lesion in the mask" + (
            " + linear-SVM prediction" if self.svm_path.is_file() else ""
        )

    def svm(self) -> SavedSVM | None:
        """The saved SVM, reloaded when the file changes (a re-run of the evaluation workflow); None if absent.

        An SVM fitted on another encoder's embeddings than the served ``models/model.pt`` is refused, naming both
        hashes (``load_svm``): its predictions would be wrong with no error."""
        if not self.svm_path.is_file():
            return None
        mtime = self.svm_path.stat().st_mtime
        if self._svm is None or self._svm[0] != mtime:
            try:
                self._svm = (mtime, load_svm(self.svm_path, checkpoint=self.checkpoint))
            except ValueError as e:
                raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, str(e)) from e
            logger.info("loaded SVM %s (classes %s)", self.svm_path, self._svm[1].classes)
        return self._svm[1]

    def __call__(self, request: dict, callbacks=None):
        request = dict(request)
        mask = request.get("mask") or request.get("label")
        if not mask or not os.path.exists(str(mask)):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"image {request.get('image')}: the embedding needs a lesion mask (request 'mask' path, an uploaded "
                f"label file, or a final label in the datastore); got {mask!r}",
            )
        request["mask"] = str(mask)
        request.setdefault("id", case_id_of(request.get("image")))
        return super().__call__(request, callbacks)

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[None, dict[str, Any]]:
        """No label file: the result is the embedding (and the SVM's prediction) as JSON."""
        embedding = torch.as_tensor(data[self.output_label_key]).detach().float().cpu().numpy().reshape(-1)
        if not np.isfinite(embedding).all():
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR, f"case {data.get('id')!r}: the embedding has non-finite values"
            )
        result: dict[str, Any] = {"id": data.get("id"), "embedding": embedding.tolist(), "version": self.version}
        box = data.get("mask_box")
        if isinstance(box, dict):
            result["roi"] = {"start": box.get("start"), "clipped": bool(box.get("clipped"))}
        svm = self.svm()
        if svm is not None:
            pred = svm.predict(embedding)
            result["prediction"] = pred["scores"]
            result["predicted_label"] = pred["label"]
            result["predicted_name"] = pred["label_name"]
            result["svm"] = str(self.svm_path)
        return None, result
