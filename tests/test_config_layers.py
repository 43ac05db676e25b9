"""Layered configs (issue 17): train.json is the base, the other configs override it and define nothing twice.

inference.json stays standalone (the Model Zoo CI, MONAI Label and MONAI Deploy load it alone), so it repeats the
keys that describe the data and the network; these tests keep those in step with train.json, with every data
profile layered on both, so that nothing has to be kept in step by hand.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PROFILES = [None] + sorted(p.stem for p in (CONFIGS / "data").glob("*.json"))

# top-level keys both train.json and inference.json define: they must hold the same value
SHARED = (
    "bundle_root", "ckpt_dir", "output_dir", "datalist", "data_root", "dataset_dir", "cache_dir", "num_workers",
    "device", "network", "profile", "roi_size", "roi_spacing_mm", "in_channels", "sections", "load_transforms", "roi_transforms",
    "intensity_transforms", "context_transforms", "output_transforms", "deterministic_transforms",
)  # fmt: skip
# the same names with a different meaning (or a different role) in the two files
DIFFERENT_BY_DESIGN = {"imports", "batch_size", "network_def", "initialize", "run"}


def _parser(files: list[str], profile: str | None) -> ConfigParser:
    parser = ConfigParser()
    names = files[:1] + ([f"data/{profile}.json"] if profile else []) + files[1:]
    parser.read_config([str(CONFIGS / f) for f in names])
    parser.parse()
    return parser


def _follow(parser: ConfigParser, value):
    """``@id`` -> the value of ``id`` as written (references followed, expressions left as text)."""
    while isinstance(value, str) and value.startswith("@"):
        value = parser[value[1:]]
    return value


def _load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_shared_keys_are_all_the_keys_both_define():
    both = set(_load("train.json")) & set(_load("inference.json"))
    assert both - DIFFERENT_BY_DESIGN == set(SHARED), "a new key in both files: add it to SHARED (or justify it)"


@pytest.mark.parametrize("profile", PROFILES)
def test_inference_agrees_with_train(profile, monkeypatch):
    """The values (as written, after the profile and macros) of every shared key, and the encoder's widths."""
    monkeypatch.setenv("SIAM3D_DATALIST", "/nonexistent/datalist.json")  # read by no test here: nothing resolves it
    train, infer = _parser(["train.json"], profile), _parser(["inference.json"], profile)
    for key in SHARED:
        assert json.dumps(train[key], sort_keys=True) == json.dumps(infer[key], sort_keys=True), (profile, key)
    for arg in ("in_channels", "out_dim", "hidden_dim"):
        values = [_follow(train, train["encoder_def"][arg]), _follow(infer, infer["network_def"][arg])]
        assert values[0] == values[1], (profile, arg, values)
    assert infer["preprocessing"]["transforms"] == "@deterministic_transforms"
    assert train["validate"]["preprocessing"]["transforms"] == "@deterministic_transforms"


def test_downstream_tables_are_where_inference_and_radiomics_write_them():
    evaluate = _parser(["train.json", "evaluate.json"], None)
    assert evaluate.get_parsed_content("ssl_table") == _parser(["inference.json"], None).get_parsed_content(
        "embeddings_path"
    )
    assert evaluate.get_parsed_content("trad_table") == _parser(
        ["inference.json", "radiomics.json"], None
    ).get_parsed_content("radiomics_path")


def test_supervised_baseline_takes_pretraining_augmentation_and_encoder():
    parser = _parser(["train.json", "supervised.json"], "demo")
    assert parser["supervised_augment"].endswith("**@augmentation)")
    make = parser.get_parsed_content("supervised_encoder")
    encoder = make()
    assert encoder.feature_dim == parser["out_dim"] and encoder.in_channels == parser["in_channels"]
    paper = _parser(["train.json", "supervised.json", "presets/paper.json"], "demo")
    assert paper["augmentation"] == _load("presets/paper.json")["augmentation"]  # a preset reaches it too


def test_overrides_define_nothing_twice():
    """No file restates a value the files before it in a README / pipeline / test combination already set, except
    the paper preset's deliberate pins; data profiles set only what differs from train.json."""
    m = _benchmark("config_duplicates").measure(CONFIGS)
    allowed = {"presets/paper.json: batch_size", "presets/paper.json: weight_decay", "presets/paper.json: epochs",
               "rubik.json: balance#mode"}  # fmt: skip
    assert set(m["restated_distinct"]) <= allowed, m["restated_in_stacks"]
    assert m["profile_repeat_count"] == 0, m["profile_repeats"]
    for pair, keys in m["duplicated_pairs"].items():
        if pair == "inference.json & train.json":
            assert set(keys) <= set(SHARED), keys


def test_no_long_dollar_calls():
    """Calls with many arguments are _target_ blocks, one key per argument: no ``$`` call over 320 characters
    (the longest left is the DDP sampler choice in multi_gpu_train.json)."""
    m = _benchmark("config_duplicates").measure(CONFIGS)
    assert m["longest_expressions"][0]["chars"] <= 320, m["longest_expressions"]


def test_validate_takes_the_base_label_map_for_a_profile_without_one():
    """``build_cohort validate --profile configs/data/demo.json``: the demo profile sets no label_map (it is the
    base's), so the labels are checked against train.json's; a profile's own map wins."""
    from scripts.data.build_cohort import _label_map

    assert _label_map(str(CONFIGS / "data" / "demo.json"), None) == _load("train.json")["label_map"]
    assert _label_map(str(CONFIGS / "data" / "brats.json"), None) == {"1": "HGG", "0": "LGG"}
    assert _label_map(str(CONFIGS / "data" / "brats.json"), '{"0": "a"}') == {"0": "a"}
