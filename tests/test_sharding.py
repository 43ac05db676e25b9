"""Sharded embedding and radiomics extraction: the shard split, the merge of the parts, and 2 gloo processes
(torchrun) running the bundle's inferring / extracting commands against a single-process run of the same command."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.feature_table import meta_path, read_feature_table, write_feature_table
from scripts.io_utils import output_lock, sha256_file
from scripts.run.sharding import (
    failures_path,
    merge_cli,
    merge_parts,
    part_files,
    part_path,
    shard_items,
    shard_positions,
    workers_per_rank,
)
from tests.workflows import run_infer_workflow

ROOT = Path(__file__).resolve().parent.parent
IDS = [f"case{i:02d}" for i in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)]  # datalist order, deliberately unsorted


# ------------------------------------------------------------------------------------------------------ the shards
@pytest.mark.parametrize("world", [1, 2, 3, 5, 12])
def test_shards_are_disjoint_complete_balanced_and_keep_datalist_order(world):
    shards = [shard_positions(IDS, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(len(IDS)))  # every case exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(s == sorted(s) for s in shards)  # a part is in datalist order


def test_shards_depend_on_the_ids_not_on_the_order_they_come_in():
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    for rank in range(3):
        assert {IDS[i] for i in shard_positions(IDS, rank, 3)} == {
            shuffled[i] for i in shard_positions(shuffled, rank, 3)
        }
    items = [{"id": i, "image": f"{i}.nii.gz"} for i in IDS]
    assert [it["id"] for it in shard_items(items, 1, 3)] == [IDS[i] for i in shard_positions(IDS, 1, 3)]


def test_shard_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"3 processes for 2 case\(s\).*at most 2"):
        shard_positions(["a", "b"], 0, 3)
    with pytest.raises(ValueError, match=r"duplicate case ids .*\['a'\]"):
        shard_positions(["a", "b", "a"], 0, 2)
    with pytest.raises(ValueError, match="rank 2 is not a process of a world of 2"):
        shard_positions(["a", "b"], 2, 2)


def test_part_names_and_workers_per_rank():
    assert part_path("eval/ssl.csv", 1, 4) == Path("eval/ssl.part1of4.csv")
    assert [f.name for f in part_files("eval/r.csv", 0, 2, with_failures=True)] == [
        "r.part0of2.csv",
        "r.part0of2.meta.json",
        "r.part0of2.failures.csv",
    ]
    assert (
        workers_per_rank(2, cores=16) == 8 and workers_per_rank(8, cores=4) == 1 and workers_per_rank(3, cores=8) == 2
    )


# ----------------------------------------------------------------------------------------------------------- merge
def _values(n: int, cols: int = 4) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, cols)) * 1e3  # full-precision floats: the round trip must be exact


def _write_parts(out: Path, ids: list[str], values: np.ndarray, world: int, meta=None, failures=None) -> None:
    """What the ranks write: their shard's rows in datalist order with their own sidecar (and failure report)."""
    columns = [f"ssl_{j:03d}" for j in range(values.shape[1])]
    for rank in range(world):
        mine = shard_positions(ids, rank, world)
        rows = [i for i in mine if ids[i] not in (failures or {})]
        prov = {"kind": "k", "n_cases": len(mine), "written": "then", **(meta(rank) if meta else {})}
        table = part_path(out, rank, world)
        write_feature_table(table, [ids[i] for i in rows], columns, values[rows], prov)
        if failures is not None:
            lines = ["id,file,reason"] + [f"{ids[i]},{ids[i]}.nii.gz,{failures[ids[i]]}" for i in mine if i not in rows]
            failures_path(table).write_text("\n".join(lines) + "\n")


def test_merge_gives_the_single_process_table_byte_for_byte(tmp_path):
    values = _values(len(IDS))
    single = tmp_path / "single.csv"
    write_feature_table(single, IDS, [f"ssl_{j:03d}" for j in range(4)], values)
    out = tmp_path / "eval" / "ssl.csv"
    _write_parts(out, IDS, values, 3)
    result = merge_parts(out, IDS, 3, "embeddings")
    assert out.read_bytes() == single.read_bytes()
    assert (result.n_rows, result.n_failed, result.world) == (12, 0, 3)
    meta = json.loads(meta_path(out).read_text(encoding="utf-8"))
    assert meta["n_cases"] == 12 and meta["written"] != "then"
    assert [p["n_rows"] for p in meta["sharded"]["parts"]] == [4, 4, 4]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ssl.csv", "ssl.meta.json"]  # the parts are removed


def test_missing_parts_are_listed_and_nothing_is_written(tmp_path):
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 3)
    part_path(out, 1, 3).unlink()
    meta_path(part_path(out, 2, 3)).unlink()
    with pytest.raises(FileNotFoundError) as info:
        merge_parts(out, IDS, 3, "embeddings")
    msg = str(info.value)
    assert "ssl.part1of3.csv (rank 1" in msg and "ssl.part2of3.meta.json (rank 2" in msg and "shared" in msg
    assert "part0of3" not in msg
    assert not out.exists() and part_path(out, 0, 3).exists()  # the parts that are there stay for a retry


def test_merge_by_hand_after_gathering_the_parts(tmp_path):
    """An unshared multi-node run: the parts are copied next to the table, then merged with the command line."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"id": i, "image": f"{i}.nii.gz"} for i in IDS[:8]],
                                    "testing": [{"id": i, "image": f"{i}.nii.gz"} for i in IDS[8:]]}))  # fmt: skip
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2)
    assert merge_cli(str(out), str(datalist), 2) == str(out)
    assert read_feature_table(out)[0] == IDS


def test_a_part_that_shows_up_late_is_waited_for(tmp_path):
    """Network file systems can show another machine's file a moment late: the merge looks again for a while."""
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2)
    late = part_path(out, 1, 2)
    hidden = late.rename(tmp_path / "elsewhere.csv")
    timer = threading.Timer(0.3, hidden.rename, args=(late,))
    timer.start()
    try:
        assert merge_parts(out, IDS, 2, "embeddings", wait_s=1).n_rows == 12
    finally:
        timer.join()


def test_a_part_that_is_not_the_one_its_rank_wrote_is_refused(tmp_path):
    """A stale part of an earlier run (or another machine's unshared folder) is caught by the ranks' hashes."""
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2)
    reports = [
        {"rank": r, "host": f"node{r}", "files": {f.name: sha256_file(f) for f in part_files(out, r, 2)}}
        for r in (0, 1)
    ]
    reports[1]["files"]["ssl.part1of2.csv"] = "0" * 64
    with pytest.raises(FileNotFoundError, match=r"not the file rank 1 on host node1 wrote.*ssl.part1of2.csv"):
        merge_parts(out, IDS, 2, "embeddings", reports=reports)
    reports[1]["files"]["ssl.part1of2.csv"] = sha256_file(part_path(out, 1, 2))
    assert merge_parts(out, IDS, 2, "embeddings", reports=reports).n_rows == 12


def test_parts_that_do_not_cover_the_datalist_exactly_once_are_refused(tmp_path):
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2)
    with pytest.raises(ValueError, match=r"1 case\(s\) of the datalist in no part: \['case99'\]"):
        merge_parts(out, IDS + ["case99"], 2, "embeddings")
    with pytest.raises(ValueError, match=r"1 case\(s\) not in the datalist: \['case07'\]"):
        merge_parts(out, IDS[1:], 2, "embeddings")
    ids0, cols, vals, prov = read_feature_table(part_path(out, 0, 2))
    ids1 = read_feature_table(part_path(out, 1, 2))[0]
    write_feature_table(part_path(out, 0, 2), ids0 + ids1[:1], cols, np.vstack([vals, vals[:1]]), prov)
    with pytest.raises(ValueError, match=rf"in several parts .*'{ids1[0]}': \[0, 1\]"):
        merge_parts(out, IDS, 2, "embeddings")


def test_parts_made_with_different_checkpoints_are_not_mixed(tmp_path):
    out = tmp_path / "ssl.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2, meta=lambda r: {"checkpoint_sha256": f"sha{r}"})
    with pytest.raises(ValueError, match=r"disagree on 'checkpoint_sha256' .*\{0: 'sha0', 1: 'sha1'\}"):
        merge_parts(out, IDS, 2, "embeddings")


def test_embedding_parts_with_other_columns_are_refused_reordered_columns_are_aligned(tmp_path):
    """Columns follow the part holding the datalist's first case (rank 1 here: case07), as in a single run."""
    out = tmp_path / "ssl.csv"
    values = _values(len(IDS))
    _write_parts(out, IDS, values, 2)
    ids0, cols, vals, prov = read_feature_table(part_path(out, 0, 2))
    write_feature_table(part_path(out, 0, 2), ids0, cols[::-1], vals[:, ::-1], prov)  # same columns, other order
    merge_parts(out, IDS, 2, "embeddings", remove_parts=False)
    ids, columns, merged, _ = read_feature_table(out)
    assert ids == IDS and columns == cols and np.array_equal(merged, values)
    write_feature_table(part_path(out, 0, 2), ids0, [c + "_b" for c in cols], vals, prov)
    with pytest.raises(ValueError, match="part of rank 0 has other columns than rank 1's"):
        merge_parts(out, IDS, 2, "embeddings")


def test_radiomics_merge_joins_failures_counts_and_border_cases_in_datalist_order(tmp_path):
    out = tmp_path / "radiomics.csv"
    failures = {"case05": "empty mask", "case07": "pyradiomics failed", "case06": "NaN voxels"}
    values = _values(len(IDS))

    def meta(rank):
        border = {i: "x-" for i in IDS if i in ("case10", "case03") and IDS.index(i) in shard_positions(IDS, rank, 2)}
        cut = {i: 0.1 for i in IDS if i in ("case11", "case02") and IDS.index(i) in shard_positions(IDS, rank, 2)}
        return {"kind": "radiomics", "n_cached": rank + 1, "seconds": 10.0 * (rank + 1), "lesion_at_border": border,
                "lesion_cut_by_box": cut, "n_features": 4, "n_nonfinite_values": 9, "created": "then"}  # fmt: skip

    _write_parts(out, IDS, values, 2, meta=meta, failures=failures)
    result = merge_parts(out, IDS, 2, "radiomics")
    ids, _, merged, prov = read_feature_table(out)
    ok = [i for i in IDS if i not in failures]
    assert ids == ok and np.array_equal(merged, values[[IDS.index(i) for i in ok]])
    lines = failures_path(out).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,file,reason" and [x.split(",")[0] for x in lines[1:]] == ["case07", "case05", "case06"]
    assert (result.n_rows, result.n_failed) == (9, 3)
    assert (prov["n_ok"], prov["n_failed"], prov["n_cases"], prov["n_cached"], prov["seconds"]) == (9, 3, 12, 3, 20.0)
    assert prov["n_nonfinite_values"] == 0 and prov["created"] != "then"
    assert list(prov["lesion_at_border"]) == ["case03", "case10"]  # datalist order
    assert prov["lesion_cut_by_box"] == {"case02": 0.1, "case11": 0.1}  # issue 29: every part's cut cases
    assert not list(tmp_path.glob("*.part*"))


def test_a_merge_waits_while_another_run_writes_into_the_folder(tmp_path):
    """A single-process extraction holds the folder lock while it writes its table, meta.json and failures; a
    sharded merge into the same folder writes its three only after that, so the folder never mixes the two runs."""
    out = tmp_path / "radiomics.csv"
    _write_parts(out, IDS, _values(len(IDS)), 2, failures={"case05": "empty mask"})
    result: list = []
    with output_lock(tmp_path):
        merger = threading.Thread(target=lambda: result.append(merge_parts(out, IDS, 2, "radiomics")))
        merger.start()
        merger.join(timeout=1.0)
        assert merger.is_alive() and not out.exists() and not failures_path(out).exists()
    merger.join(timeout=30)
    assert not merger.is_alive() and result[0].n_rows == 11 and out.exists() and failures_path(out).exists()


def test_radiomics_part_whose_cases_all_failed_and_a_part_with_other_channels(tmp_path):
    """A part of failures only has a header-only table; a part with other columns becomes failures, as in one run."""
    out = tmp_path / "radiomics.csv"
    ids = ["a", "b", "c", "d"]
    cols = ["original_f1", "original_f2"]
    write_feature_table(part_path(out, 0, 2), ["a", "c"], cols, np.ones((2, 2)), {"kind": "radiomics"})
    failures_path(part_path(out, 0, 2)).write_text("id,file,reason\n")
    write_feature_table(part_path(out, 1, 2), ["b"], ["c1_original_f1"], np.ones((1, 1)), {"kind": "radiomics"})
    failures_path(part_path(out, 1, 2)).write_text("id,file,reason\nd,d.nii.gz,empty mask\n")
    merge_parts(out, ids, 2, "radiomics", remove_parts=False)
    assert read_feature_table(out)[0] == ["a", "c"]
    lines = failures_path(out).read_text(encoding="utf-8").splitlines()[1:]
    assert lines[0].startswith("b,,\"feature columns differ from case 'a'") and lines[1] == "d,d.nii.gz,empty mask"

    write_feature_table(part_path(out, 1, 2), [], [], np.zeros((0, 0)), {"kind": "radiomics"})
    failures_path(part_path(out, 1, 2)).write_text("id,file,reason\nb,b.nii.gz,x\nd,d.nii.gz,y\n")
    assert merge_parts(out, ids, 2, "radiomics").n_failed == 2


# ------------------------------------------------------------------------------------------------ two gloo processes
def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _single(run_id: str, configs: list[str], overrides: dict) -> None:
    run_infer_workflow(configs, run_id, **overrides)


def _args(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]


@pytest.fixture(scope="module")
def bundle(tiny_cohort, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    from scripts.pretrain.networks import Encoder3D

    torch.save(Encoder3D().state_dict(), root / "models" / "model.pt")
    return root


def _common(bundle: Path, datalist: Path, out: Path) -> dict:
    return {
        "bundle_root": str(bundle),
        "datalist": str(datalist),
        "output_dir": str(out),
        "cache_dir": str(bundle / "cache"),
        "roi_size": [28, 28, 28],
        "num_workers": 0,
    }


def _same_table(sharded: Path, single: Path) -> dict:
    a_ids, a_cols, a_vals, a_prov = read_feature_table(sharded)
    b_ids, b_cols, b_vals, b_prov = read_feature_table(single)
    assert a_ids == b_ids and a_cols == b_cols
    np.testing.assert_allclose(a_vals, b_vals, rtol=1e-5, atol=1e-6)
    volatile = {"written", "created", "seconds", "sharded", "n_cached"}
    assert {k: v for k, v in a_prov.items() if k not in volatile} == {
        k: v for k, v in b_prov.items() if k not in volatile
    }
    assert a_prov["sharded"]["world_size"] == 2
    return a_prov


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_embed_the_cohort_like_one(bundle, tiny_cohort):
    sharded, single = bundle / "eval_sharded", bundle / "eval_single"
    _torchrun(
        ["-m", "monai.bundle", "run", "inferring",
         "--config_file", "['configs/inference.json','configs/multi_gpu_inference.json']",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         *_args(_common(bundle, tiny_cohort, sharded))]
    )  # fmt: skip
    _single("inferring", ["inference.json"], _common(bundle, tiny_cohort, single))
    prov = _same_table(sharded / "ssl_features.csv", single / "ssl_features.csv")
    assert [p["n_rows"] for p in prov["sharded"]["parts"]] == [6, 6]
    assert sorted(p.name for p in sharded.iterdir()) == ["ssl_features.csv", "ssl_features.meta.json"]


def _cohort_with_a_bad_case(datalist: Path, out: Path) -> Path:
    """The tiny cohort plus one case whose mask is empty: radiomics records it as a failure."""
    doc = json.loads(datalist.read_text(encoding="utf-8"))
    first = doc["training"][0]
    image = nib.load(datalist.parent / first["image"])
    out.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), out / "empty_mask.nii.gz")
    shutil.copy(datalist.parent / first["image"], out / "image.nii.gz")
    for section in doc:
        for item in doc[section]:
            item["image"], item["mask"] = (str((datalist.parent / item[k]).resolve()) for k in ("image", "mask"))
    bad = {**first, "id": "bad_empty_mask", "image": str(out / "image.nii.gz"), "mask": str(out / "empty_mask.nii.gz")}
    doc["training"].insert(3, bad)
    (out / "datalist.json").write_text(json.dumps(doc))
    return out / "datalist.json"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_extract_radiomics_like_one(bundle, tiny_cohort, tmp_path):
    datalist = _cohort_with_a_bad_case(tiny_cohort, tmp_path / "cohort")
    sharded, single = bundle / "radiomics_sharded", bundle / "radiomics_single"
    extra = {"radiomics_params": str(ROOT / "configs" / "radiomics_params.yaml"), "radiomics_workers": 1}
    _torchrun(
        ["-m", "monai.bundle", "run", "extracting",
         "--config_file", "['configs/inference.json','configs/radiomics.json','configs/multi_gpu_inference.json']",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         "--radiomics_cache_dir", str(tmp_path / "rcache_sharded"),
         *_args({**_common(bundle, datalist, sharded), **extra})]
    )  # fmt: skip
    _single(
        "extracting",
        ["inference.json", "radiomics.json"],
        {**_common(bundle, datalist, single), **extra, "radiomics_cache_dir": str(tmp_path / "rcache_single")},
    )
    prov = _same_table(sharded / "radiomics_features.csv", single / "radiomics_features.csv")
    assert prov["n_ok"] == 12 and prov["n_failed"] == 1 and prov["n_cached"] == 0
    failures = (sharded / "radiomics_features.failures.csv").read_text(encoding="utf-8")
    assert (
        failures == (single / "radiomics_features.failures.csv").read_text(encoding="utf-8")
        and "bad_empty_mask" in failures
    )
    assert not list(sharded.glob("*.part*"))
