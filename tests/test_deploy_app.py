"""apps/deploy/app.py (MONAI Deploy App SDK): one NIfTI case -> embedding table equal to the bundle's own inference.

Needs the optional extra (requirements-deploy.txt); without it every test here is skipped with the reason printed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monai.deploy.operators.monai_bundle_inference_operator",
    reason="optional extra not installed: pip install -r requirements-deploy.txt (see the comments in that file)",
)

from monai.bundle import ConfigWorkflow, ckpt_export  # noqa: E402

from scripts.feature_table import read_feature_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _load_app_module():
    spec = importlib.util.spec_from_file_location("siam3d_deploy_app", ROOT / "apps" / "deploy" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["shipped", "exported"])
def model_ts(request, tmp_path_factory) -> Path:
    """models/model.ts as shipped, and one exported now from models/model.pt + the current configs (the shipped file
    embeds the inference.json of its export time; both must give the bundle's embedding)."""
    shipped = ROOT / "models" / "model.ts"
    if request.param == "shipped":
        if not shipped.is_file():
            pytest.skip("models/model.ts is not in this checkout (the 'exported' case covers the app)")
        return shipped
    path = tmp_path_factory.mktemp("export") / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(path),
        ckpt_file=str(ROOT / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(ROOT),
    )
    return path


def _write_case(folder: Path) -> tuple[Path, Path]:
    """A 40x36x34 volume with a bright, textured lesion off-centre, stored LPS-flipped (negative x/y affine) so that
    the bundle's Orientationd really reorients: an app that dropped the affine would give a different embedding."""
    rng = np.random.default_rng(0)
    shape = (40, 36, 34)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([14, 20, 18]).reshape(3, 1, 1, 1)
    mask = (np.sqrt(((grid - centre) ** 2).sum(0)) <= 6).astype(np.uint8)
    image[mask > 0] += 80.0 + 20.0 * rng.random(int(mask.sum()))
    affine = np.diag([-1.2, -1.0, 2.0, 1.0])
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), folder / "mask.nii.gz")
    return folder / "image.nii.gz", folder / "mask.nii.gz"


def _bundle_embedding(image: Path, mask: Path, tmp_path: Path) -> np.ndarray:
    """The same case through configs/inference.json (scripts.pretrain.embed.EmbeddingWriter), the bundle's reference path."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"id": "case", "image": str(image), "mask": str(mask)}]}))
    wf = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id="inferring",
        bundle_root=str(ROOT),
        datalist=str(datalist),
        sections=["training"],
        embeddings_path=str(tmp_path / "ref" / "ssl_features.csv"),
        cache_dir=str(tmp_path / "ref" / "cache"),
        num_workers=0,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    ids, _, values, _ = read_feature_table(tmp_path / "ref" / "ssl_features.csv")
    assert ids == ["case"]
    return values[0]


def test_app_writes_the_bundle_embedding_for_a_nifti_case(tmp_path, model_ts):
    image, mask = _write_case(tmp_path / "input" / "case_001")
    out = tmp_path / "output"
    app_module = _load_app_module()
    # holoscan's argv convention is the interpreter's: [python, script, *args]
    argv = [sys.executable, app_module.__file__, "-i", str(image.parent), "-o", str(out), "-m", str(model_ts)]
    app = app_module.EmbeddingApp(argv)
    app.run()

    ids, columns, values, prov = read_feature_table(out / "ssl_features.csv")
    assert ids == ["case_001"]
    assert columns == [f"ssl_{i:03d}" for i in range(256)]
    assert values.shape == (1, 256) and np.isfinite(values).all()
    assert prov["kind"] == "ssl_embeddings" and len(prov["model_sha256"]) == 64

    reference = _bundle_embedding(image, mask, tmp_path)
    np.testing.assert_allclose(values[0], reference, rtol=1e-4, atol=1e-4)


def test_missing_mask_is_reported_with_the_folder(tmp_path):
    app_module = _load_app_module()
    folder = tmp_path / "only_image"
    folder.mkdir()
    (folder / "image.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"only_image must hold exactly one mask\.nii\.gz"):
        app_module.find_case_files(folder)


def test_stale_torchscript_beside_the_checkpoint_is_refused(tmp_path):
    """A model.ts exported from other weights than the model.pt beside it (training rewrote model.pt) is refused,
    naming both files and the re-export command, before the app serves anything."""
    from scripts.pretrain.networks import Encoder3D
    from scripts.torchscript import export_torchscript

    torch = pytest.importorskip("torch")
    export_torchscript(Encoder3D(), tmp_path / "model.ts", CONFIGS / "metadata.json", CONFIGS / "inference.json")
    torch.save(Encoder3D().state_dict(), tmp_path / "model.pt")  # other random weights
    app = _load_app_module()
    with pytest.raises(ValueError, match=r"model\.ts was exported from other weights than .*model\.pt.*ckpt_export"):
        app.resolve_model_path(tmp_path)
