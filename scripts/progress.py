"""Progress bars (tqdm) for the long loops: training epochs, SVM protocol folds per feature set, supervised folds.

A bar is drawn on a terminal only. When stderr is a file or a pipe (CI, ``nohup``, a pipeline stage's log) the bar is
off, so logs hold no carriage-return redraws; the loops log a line per epoch / fold there instead.
``SIAM3D_PROGRESS=1`` forces bars on, ``SIAM3D_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def interactive() -> bool:
    forced = os.environ.get("SIAM3D_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar that is disabled off a terminal; redraws at most once a second (``mininterval``)."""
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not interactive(), mininterval=1.0, dynamic_ncols=True,
        **kwargs,
    )  # fmt: skip
