"""Command-line booleans: ``--knn_monitor false`` must mean false (fire passes the string "false")."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.config_utils import as_bool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", [True, "true", "True", "1", "yes", 1])
def test_true_values(value):
    assert as_bool(value) is True


@pytest.mark.parametrize("value", [False, "false", "False", "0", "no", 0, None, ""])
def test_false_values(value):
    assert as_bool(value) is False


def test_other_strings_are_an_error():
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_bool("maybe", "resume")


@pytest.mark.parametrize("flag, enabled", [("false", False), ("true", True), (False, False)])
def test_knn_monitor_switch_from_the_command_line(tiny_cohort, tmp_path, flag, enabled):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"datalist": str(tiny_cohort), "bundle_root": str(tmp_path), "knn_monitor": flag})
    validation = next(h for h in parser.get_parsed_content("train#handlers") if type(h).__name__ == "ReadoutValidation")
    assert validation.enabled is enabled
