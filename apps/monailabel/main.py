"""MONAI Label app serving the siam3d-radiomics bundle's lesion embedding (and SVM prediction when one is saved).

    monailabel start_server --app apps/monailabel --studies <folder of NIfTI images, masks in labels/final/>

The stock ``monaibundle`` sample app cannot serve this bundle (its infer task restores a segmentation onto the
image grid and crashes on an embedding); this app registers ``lib.infers.EmbeddingInferTask`` instead.

Conf (``--conf key value``): ``bundle_path`` (default: the bundle this app ships in, two folders up),
``svm_path`` (default ``<bundle>/models/svm_ssl.joblib``), ``preload`` (load the network at start).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_BUNDLE_ROOT = Path(__file__).resolve().parents[2]
if str(_BUNDLE_ROOT) not in sys.path:  # the infer task imports the bundle's own ``scripts`` package
    sys.path.insert(0, str(_BUNDLE_ROOT))

import monailabel  # noqa: E402
from lib.infers import EmbeddingInferTask  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import DefaultLabelTag  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_NAME = "siam3d_embedding"


class MyApp(MONAILabelApp):
    """One infer task (``siam3d_embedding``); no trainers: pretraining is the bundle's own train.json."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        default_bundle = Path(app_dir).resolve().parents[1]
        self.bundle_path = Path(conf.get("bundle_path") or default_bundle).resolve()
        self.svm_path = conf.get("svm_path")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"siam3d-radiomics embeddings (MONAI Label {monailabel.__version__})",
            description="Self-supervised 3D radiomic embedding of a lesion (image + mask), optional SVM prediction",
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = EmbeddingInferTask(str(self.bundle_path), self.conf, svm_path=self.svm_path)
        logger.info("+++ Adding Inferer:: %s => bundle %s", MODEL_NAME, self.bundle_path)
        return {MODEL_NAME: task}

    def infer(self, request: dict, datastore=None) -> dict:
        """Use the datastore's final label of the image as the lesion mask when the request brings none."""
        request = dict(request)
        image_id = request.get("image")
        if not request.get("mask") and not request.get("label") and isinstance(image_id, str):
            if not os.path.exists(image_id):
                store = datastore or self.datastore()
                mask = store.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
                if mask:
                    request["mask"] = mask
        return super().infer(request, datastore)
