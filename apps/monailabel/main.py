"""MONAI Label app serving the siam3d-radiomics bundle's lesion embedding (and SVM prediction when one is saved).

    monailabel start_server --app <copy of apps/monailabel> --studies <NIfTI images, masks in labels/final/>
                            --conf models <bundle folder>

The stock ``monaibundle`` sample app cannot serve this bundle (its infer task restores a segmentation onto the
image grid and crashes on an embedding); this app registers ``lib.infers.EmbeddingInferTask`` instead.

Conf (``--conf key value``): ``models`` (the bundle folder, or a folder name under ``<app>/model/``; default: the
bundle this app ships in, two folders up; ``bundle_path`` is accepted too), ``svm_path`` (default
``<bundle>/models/svm_ssl.joblib``), ``preload`` (load the network at start).
"""

from __future__ import annotations

import logging
import os
import sys

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from siam3d_conf import resolve_bundle

logger = logging.getLogger(__name__)

MODEL_NAME = "siam3d_embedding"


class MyApp(MONAILabelApp):
    """One infer task (``siam3d_embedding``); no trainers: pretraining is the bundle's own train.json."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_path = resolve_bundle(app_dir, conf)
        if str(self.bundle_path) not in sys.path:  # the infer task imports that bundle's own ``scripts`` package
            sys.path.insert(0, str(self.bundle_path))
        self.svm_path = conf.get("svm_path")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"siam3d-radiomics embeddings (MONAI Label {monailabel.__version__})",
            description="Self-supervised 3D radiomic embedding of a lesion (image + mask), optional SVM prediction",
        )

    def init_infers(self) -> dict[str, InferTask]:
        from lib.infers import EmbeddingInferTask  # imports the bundle's ``scripts``: after sys.path has the bundle

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
