"""MONAI Deploy App SDK example: one NIfTI image + lesion mask -> the encoder's 256-d embedding, via ``models/model.ts``.

Pipeline (a Holoscan DAG): two ``NiftiVolumeLoader`` operators (image, mask) -> ``EmbeddingBundleOperator`` (the
SDK's ``MonaiBundleInferenceOperator`` reading ``inference.json`` and ``metadata.json`` embedded in the TorchScript
file by ``monai.bundle ckpt_export``) -> ``EmbeddingWriterOperator`` (``ssl_features.csv`` + provenance sidecar, the
same table format as the bundle's ``inference.json`` writes).

Run from anywhere (the bundle root is put on ``sys.path`` because the ``scripts.*`` transforms named in
``inference.json`` are not inside ``model.ts``)::

    python apps/deploy/app.py -i <folder with image.nii.gz and mask.nii.gz> -o <output folder> [-m models/model.ts]

Two things differ from the stock bundle operator, both because of what this bundle is:
- the preprocessing crops a box centred on the lesion, so the operator takes a second input, ``mask``;
- the bundle's file loader (``LoadImaged`` or ``scripts.data.transforms.LoadCased``, with ``ensure_channel_first``) is
  removed (no file I/O inside the operator) and ``EnsureChannelFirstd`` put in its place; the loader operator
  passes the NIfTI affine so the bundle's ``Orientationd`` reorients exactly as the bundle's own inference does.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(
        0, str(BUNDLE_ROOT)
    )  # scripts.data.transforms etc. must be importable when inference.json is parsed

from monai.data import MetaTensor  # noqa: E402
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec  # noqa: E402
from monai.deploy.operators.monai_bundle_inference_operator import (  # noqa: E402
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged  # noqa: E402

from scripts.feature_table import write_feature_table  # noqa: E402
from scripts.io_utils import sha256_file  # noqa: E402
from scripts.pretrain.model_input import check_torchscript_input  # noqa: E402
from scripts.torchscript import EXPORT_COMMAND, check_beside  # noqa: E402

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_MODEL = BUNDLE_ROOT / "models" / "model.ts"
OUTPUT_NAME = "ssl_features.csv"


def find_case_files(input_dir: str | Path) -> tuple[Path, Path]:
    """(image, mask) NIfTI files of the one case in ``input_dir``: ``image.nii[.gz]`` and ``mask.nii[.gz]``."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    found = []
    for stem in ("image", "mask"):
        matches = [input_dir / f"{stem}{s}" for s in NIFTI_SUFFIXES if (input_dir / f"{stem}{s}").is_file()]
        if len(matches) != 1:
            raise FileNotFoundError(
                f"input folder {input_dir} must hold exactly one {stem}.nii.gz (or {stem}.nii), found {len(matches)}"
            )
        found.append(matches[0])
    return found[0], found[1]


def resolve_model_path(model_path: str | Path | None) -> Path:
    """The TorchScript bundle file: ``model_path`` itself, ``<model_path>/model.ts`` for a folder, else the default.

    Refused (``ValueError`` naming both files and the re-export command) when a ``model.pt`` beside it holds other
    weights, or when the ``inference.json`` it embeds gives the encoder another input than it was trained on
    (``model.input.json`` beside it)."""
    path = Path(model_path) if model_path else DEFAULT_MODEL
    if path.is_dir():
        path = path / "model.ts"
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript bundle not found: {path} (export it with `{EXPORT_COMMAND}`)")
    check_beside(path)  # a model.ts older than the model.pt beside it would serve stale weights
    check_torchscript_input(path)  # e.g. a whole-box encoder under the lesion-context preprocessing
    return path


def is_file_loader(transform) -> bool:
    """``LoadImaged`` or a wrapper around one (``scripts.data.transforms.LoadCased``): the SDK strips only classes named
    ``LoadImage*``, and a file loader fed the in-memory volume fails."""
    return isinstance(transform, LoadImaged) or isinstance(getattr(transform, "loader", None), LoadImaged)


class NiftiVolumeLoader(Operator):
    """Emit one NIfTI file as an SDK ``Image`` whose metadata carries the affine and "no channel" flag.

    The SDK's ``NiftiDataLoader`` drops the affine; without it ``Orientationd`` would see an identity affine and the
    box would be cut from a differently oriented volume than the bundle's own inference uses.
    """

    def __init__(self, fragment: Fragment, *args, path: Path, output_name: str = "image", **kwargs) -> None:
        self.path, self.output_name = Path(path), output_name
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output(self.output_name)

    def compute(self, op_input, op_output, context) -> None:
        img = LoadImage(image_only=True)(str(self.path))  # MetaTensor, spatial dims only for a 3D file
        if img.ndim != 3:
            raise ValueError(f"{self.path}: expected a 3D single-channel volume, got shape {tuple(img.shape)}")
        affine = np.asarray(img.affine, dtype=np.float64)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spacing": np.asarray(img.pixdim, dtype=np.float64),
            "spatial_shape": np.asarray(img.shape),
            "original_channel_dim": "no_channel",
            "filename_or_obj": str(self.path),
        }
        op_output.emit(Image(np.asarray(img), metadata=meta), self.output_name)


class EmbeddingBundleOperator(MonaiBundleInferenceOperator):
    """``MonaiBundleInferenceOperator`` with the lesion mask as a second input (it only steers the ROI crop)."""

    def _init_config(self, config_names) -> None:
        super()._init_config(config_names)
        image_key = next(iter(self._inputs))
        self._inputs = {**self._inputs, "mask": {**self._inputs[image_key], "channel_def": {"0": "mask"}}}
        kept = [t for t in self._preproc.transforms if not is_file_loader(t)]
        self._preproc = Compose([EnsureChannelFirstd(keys=list(self._inputs)), *kept])

    def pre_process(self, data, *args, **kwargs):
        """Bundle preprocessing, then tensors back to ``MetaTensor``: the bundle ends with ``EnsureTyped(track_meta=
        False)`` (plain tensors for the encoder) but the SDK reads ``.meta`` of the preprocessed image afterwards."""
        out = super().pre_process(data, *args, **kwargs)
        return {
            k: MetaTensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, MetaTensor) else v
            for k, v in out.items()
        }

    def predict(self, data, *args, **kwargs):
        """The encoder takes the plain image tensor only (the base class would pass the mask on as a keyword)."""
        data = data.as_tensor() if isinstance(data, MetaTensor) else data
        return self._inferer(inputs=data, network=self._model_network)


class EmbeddingWriterOperator(Operator):
    """Write the received embedding as a one-row feature table (``id``, ``ssl_000`` … ``ssl_255``) with provenance."""

    def __init__(self, fragment: Fragment, *args, output_dir: Path, case_id: str, model_path: Path, **kwargs) -> None:
        self.output_dir, self.case_id, self.model_path = Path(output_dir), case_id, Path(model_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")

    def compute(self, op_input, op_output, context) -> None:
        values = np.asarray(op_input.receive("pred"), dtype=np.float32).reshape(1, -1)
        if not np.isfinite(values).all():
            raise ValueError(f"case {self.case_id!r}: the embedding has non-finite values")
        columns = [f"ssl_{i:03d}" for i in range(values.shape[1])]
        provenance = {
            "kind": "ssl_embeddings",
            "producer": "apps/deploy/app.py (MONAI Deploy App SDK)",
            "model": str(self.model_path.resolve()),
            "model_sha256": sha256_file(self.model_path),
            "n_cases": 1,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_feature_table(self.output_dir / OUTPUT_NAME, [self.case_id], columns, values, provenance)
        logger.info("wrote %s", self.output_dir / OUTPUT_NAME)


class EmbeddingApp(Application):
    """Embed one case (image + lesion mask NIfTI) with the bundle's TorchScript encoder and its preprocessing."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        model_path = resolve_model_path(app_context.model_path if Path(app_context.model_path).exists() else None)
        app_context.update({"model": str(model_path)})  # the SDK's model factory then loads exactly this file
        image_path, mask_path = find_case_files(app_context.input_path)
        output_dir = Path(app_context.output_path)
        case_id = Path(app_context.input_path).resolve().name

        image_op = NiftiVolumeLoader(self, CountCondition(self, 1), path=image_path, output_name="image", name="image")
        mask_op = NiftiVolumeLoader(self, CountCondition(self, 1), path=mask_path, output_name="mask", name="mask")
        embed_op = EmbeddingBundleOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY), IOMapping("mask", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", np.ndarray, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            bundle_path=model_path,
            name="embed",
        )
        writer_op = EmbeddingWriterOperator(
            self, output_dir=output_dir, case_id=case_id, model_path=model_path, name="writer"
        )
        self.add_flow(image_op, embed_op, {("image", "image")})
        self.add_flow(mask_op, embed_op, {("mask", "mask")})
        self.add_flow(embed_op, writer_op, {("pred", "pred")})


if __name__ == "__main__":
    EmbeddingApp().run()
