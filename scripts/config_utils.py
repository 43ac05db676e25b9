"""Small coercions for values that arrive from the command line.

``python -m monai.bundle run ... --resume false`` hands the config the *string* ``"false"`` (fire only turns
``False`` into a bool), and a non-empty string is true in Python: without this, ``--knn_monitor false`` or
``--resume false`` would switch the feature on.
"""

from __future__ import annotations

import math
import numbers

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", "none", ""}
BOOL_WORDS = frozenset(_TRUE | _FALSE)  # the strings as_bool reads


def as_bool(value, name: str = "value") -> bool:
    """``True``/``False`` from a bool, a number or a string such as "true"/"False"/"0"; anything else is an error."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


# ------------------------------------------------------------------------------------------------------- settings
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _ints(n: int | None, least: int):
    return lambda v: (
        isinstance(v, (list, tuple))
        and (n is None or len(v) == n)
        and len(v) > 0
        and all(_is_int(x) and x >= least for x in v)
    )


# The settings whose form is known: config id -> (the expected form, as a message says it; the check). A value of
# another form is refused naming the id before any work (the pipeline checks its overrides with these before any stage;
# train.json checks its own values in "initialize"), instead of failing deep inside a library without the id.
SETTINGS = {
    "roi_size": ("a list of 3 positive integers such as [32,32,32]", _ints(3, 1)),
    "roi_spacing_mm": (
        "null or a list of 3 positive numbers (mm) such as [1.0,1.0,1.0]",
        lambda v: (
            v is None or (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v))
        ),
    ),
    "epochs": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "batch_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "steps_per_epoch": ("null or a positive integer", lambda v: v is None or (_is_int(v) and v > 0)),
    "num_workers": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "radiomics_workers": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "in_channels": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "seed": ("an integer", _is_int),
    "seeds": ("a list of integers such as [0,1,2]", _ints(None, -(2**63))),
    "n_folds": ("an integer >= 2", lambda v: _is_int(v) and v >= 2),
    "label_fractions": (
        "a list of numbers in (0, 1] such as [1.0,0.5]",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(x) and 0 < x <= 1 for x in v),
    ),
    "learning_rate": ("a positive number", lambda v: _is_number(v) and v > 0),
    "weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
}


def setting_problem(name: str, value, prefix: str = "") -> str | None:
    """Why ``value`` is not a valid ``name`` (``prefix`` + name + what it must be + what it got), or None when it is,
    or when the form of ``name`` is not known here."""
    rule = SETTINGS.get(name)
    if rule is None or rule[1](value):
        return None
    return f"{prefix}{name} must be {rule[0]}, got {value!r}"


def check_settings(**values) -> None:
    """``ValueError`` naming every setting (config id) whose value does not have its known form, e.g.
    ``epochs must be a positive integer, got 'abc'``; used by the configs before any object is built."""
    problems = [p for p in (setting_problem(k, v) for k, v in values.items()) if p]
    if problems:
        raise ValueError("; ".join(problems))
