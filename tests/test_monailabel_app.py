"""apps/monailabel: the embedding infer task, the app's datastore-label fallback, the saved SVM and the REST server.

Needs the optional extra (requirements-monailabel.txt); without it every test here is skipped with the reason printed.
The reference embedding is the bundle's own inference workflow (configs/inference.json -> scripts.pretrain.embed).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "monailabel.tasks.infer.bundle",
    reason="optional extra not installed: pip install -r requirements-monailabel.txt (see the comments in that file)",
)

from monai.bundle import ConfigWorkflow  # noqa: E402

from scripts.feature_table import read_feature_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "apps" / "monailabel"
CONFIGS = ROOT / "configs"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))  # MONAI Label does the same: the app's code is the top-level package ``lib``

from lib.infers import EmbeddingInferTask  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402

from scripts.downstream.svm_model import describe, load_svm, train_and_save_svm  # noqa: E402

LABEL_NAMES = {"0": "homogeneous", "1": "necrotic"}


@pytest.fixture(scope="module")
def reference(tiny_cohort, tmp_path_factory) -> dict:
    """The tiny cohort embedded by configs/inference.json with the shipped models/model.pt."""
    out = tmp_path_factory.mktemp("reference")
    wf = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        run_id="inferring",
        bundle_root=str(ROOT),
        datalist=str(tiny_cohort),
        embeddings_path=str(out / "ssl_features.csv"),
        cache_dir=str(out / "cache"),
        num_workers=0,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    ids, _, values, _ = read_feature_table(out / "ssl_features.csv")
    doc = json.loads(Path(tiny_cohort).read_text(encoding="utf-8"))
    items = {it["id"]: it for s in ("training", "testing") for it in doc.get(s, [])}
    base = Path(tiny_cohort).parent
    cases = {i: (base / items[i]["image"], base / items[i]["mask"]) for i in ids}
    return {"table": out / "ssl_features.csv", "ids": ids, "values": values, "cases": cases, "datalist": tiny_cohort}


@pytest.fixture(scope="module")
def svm_file(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("svm") / "svm_ssl.joblib"
    return train_and_save_svm(reference["table"], reference["datalist"], path, label_names=LABEL_NAMES)


def _case(reference, k: int = 0) -> tuple[str, Path, Path, np.ndarray]:
    case_id = reference["ids"][k]
    image, mask = reference["cases"][case_id]
    return case_id, image, mask, reference["values"][k]


def test_task_serves_the_bundle_embedding_without_a_server(reference, tmp_path):
    task = EmbeddingInferTask(str(ROOT), {}, svm_path=tmp_path / "absent.joblib")
    case_id, image, mask, expected = _case(reference)
    label_file, result = task({"image": str(image), "mask": str(mask), "device": "cpu"})
    assert label_file is None
    assert result["id"] == case_id
    embedding = result["embedding"]
    assert len(embedding) == 256 and all(isinstance(v, float) for v in embedding)
    np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-4)
    assert "prediction" not in result


def test_task_adds_the_saved_svm_prediction(reference, svm_file):
    task = EmbeddingInferTask(str(ROOT), {}, svm_path=svm_file)
    svm = load_svm(svm_file)
    info = describe(svm_file)
    assert info["classes"] == [0, 1] and len(info["columns"]) == 256 and info["provenance"]["n_cases"] == 12
    for k in (0, 1):
        _, image, mask, expected = _case(reference, k)
        _, result = task({"image": str(image), "mask": str(mask), "device": "cpu"})
        want = svm.pipeline.predict(expected[None])[0]
        assert result["predicted_label"] == want and result["predicted_name"] == LABEL_NAMES[str(want)]
        scores = {s["label"]: s["score"] for s in result["prediction"]}
        assert set(scores) == set(LABEL_NAMES.values())
        assert max(scores, key=scores.get) == LABEL_NAMES[str(want)]


def test_task_without_mask_names_the_image(reference):
    task = EmbeddingInferTask(str(ROOT), {})
    _, image, _, _ = _case(reference)
    with pytest.raises(MONAILabelException, match="needs a lesion mask"):
        task({"image": str(image), "device": "cpu"})


def _studies(reference, folder: Path, n: int = 2, with_masks: bool = True) -> list[str]:
    """A MONAI Label local datastore: images at the top, lesion masks as final labels (if ``with_masks``)."""
    (folder / "labels" / "final").mkdir(parents=True)
    ids = []
    for k in range(n):
        case_id, image, mask, _ = _case(reference, k)
        shutil.copy(image, folder / f"{case_id}.nii.gz")
        if with_masks:
            shutil.copy(mask, folder / "labels" / "final" / f"{case_id}.nii.gz")
        ids.append(case_id)
    return ids


def _app_copy(tmp_path: Path) -> Path:
    """The app folder copied out of the checkout: MONAI Label writes logs/, model/ and bin/ into the app folder."""
    return Path(shutil.copytree(APP_DIR, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__")))


def test_app_takes_the_mask_from_the_datastore(reference, tmp_path):
    app_dir = _app_copy(tmp_path)
    spec = importlib.util.spec_from_file_location("siam3d_monailabel_main", app_dir / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    ids = _studies(reference, tmp_path / "studies")
    conf = {"models": str(ROOT), "svm_path": str(tmp_path / "absent.joblib")}
    app = main.MyApp(str(app_dir), str(tmp_path / "studies"), conf)
    out = app.infer({"model": main.MODEL_NAME, "image": ids[1], "device": "cpu"})
    np.testing.assert_allclose(out["params"]["embedding"], _case(reference, 1)[3], rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_infer(url: str, label: Path) -> dict:
    """multipart POST with the params JSON and an uploaded label file, as the MONAI Label clients send it."""
    boundary = "siam3dboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{"device": "cpu"}}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="mask.nii.gz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + label.read_bytes()
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    req = urllib.request.Request(url, data=b"".join(parts), method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_rest_server_serves_the_embedding(reference, tmp_path):
    """monailabel start_server on 127.0.0.1 with this app: /info lists the model, /infer returns the embedding."""
    ids = _studies(reference, tmp_path / "studies", with_masks=False)  # the mask travels with the request
    port = _free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(_app_copy(tmp_path))]
    cmd += ["--studies", str(tmp_path / "studies"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--conf", "models", str(ROOT), "--conf", "svm_path", str(tmp_path / "absent.joblib")]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        info = None
        deadline = time.monotonic() + 150  # a loaded machine starts it slowly
        while info is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/info/", timeout=2) as r:
                    info = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert info is not None, (
            f"server did not start:\n{(tmp_path / 'server.log').read_text(encoding='utf-8')[-3000:]}"
        )
        assert "siam3d_embedding" in info["models"]
        _, _, mask, expected = _case(reference, 0)
        result = _post_infer(f"{base}/infer/siam3d_embedding?image={ids[0]}&output=json", mask)
        np.testing.assert_allclose(result["embedding"], expected, rtol=1e-4, atol=1e-4)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
