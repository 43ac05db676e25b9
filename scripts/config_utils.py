"""Small coercions for values that arrive from the command line.

``python -m monai.bundle run ... --resume false`` hands the config the *string* ``"false"`` (fire only turns
``False`` into a bool), and a non-empty string is true in Python: without this, ``--knn_monitor false`` or
``--resume false`` would switch the feature on.
"""

from __future__ import annotations

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
