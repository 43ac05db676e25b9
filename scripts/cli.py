"""Command-line parsing shared by the bundle's entry points (argparse, not fire).

Every entry point prints its usage for ``--help``/``-h`` and exits 0 before doing anything, and refuses an unknown
or misspelt option (exit 2, naming it) before any work starts: fire, which they used before, passed unknown flags
on as arguments or ran the command first and complained afterwards. Option abbreviations are off, so ``--epoch``
is not silently taken for ``--epochs``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence

from scripts.config_utils import as_bool


def parser(prog: str, doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the module docstring as its description and abbreviations off."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        **kwargs,
    )


def boolean(value: str) -> bool:
    """``true``/``false``/``1``/``0``/``yes``/``no`` (case-insensitive) as an argparse ``type``."""
    try:
        return as_bool(value, "value")
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}") from e


def literal(value: str):
    """A command-line value as a Python value the way ``python -m monai.bundle`` reads it (fire's parser):
    ``[28,28,28]`` is a list, ``{HGG: 1}`` a dict, ``3`` an int, ``true``/``false`` booleans, anything else text."""
    from fire.parser import DefaultParseValue

    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return DefaultParseValue(value)


def split_overrides(
    ap: argparse.ArgumentParser, extra: Sequence[str], known_ids: Callable[[Iterable[str]], list[str]]
) -> dict[str, object]:
    """``--id value`` / ``--id=value`` pairs left over by ``parse_known_args`` as config overrides.

    ``known_ids(ids)`` returns the ids that exist in the configs; any other id (a typo such as ``--epoch``) or a
    stray word stops the program through ``ap.error`` (usage, the problem, exit 2) before any work starts.
    """
    pairs: dict[str, object] = {}
    i, bad = 0, []
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or arg == "--":
            bad.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or (extra[i + 1].startswith("--") and len(extra[i + 1]) > 2):
                bad.append(f"{arg} (no value)")
                i += 1
                continue
            value = extra[i + 1]
            i += 1
        i += 1
        pairs[key] = literal(value)
    unknown = [k for k in pairs if k not in set(known_ids(pairs))]
    if bad or unknown:
        problems = [f"unrecognised argument {b}" for b in bad]
        problems += [f"unknown option --{k} (neither an option of {ap.prog} nor a config id)" for k in unknown]
        ap.error("; ".join(problems))
    return pairs
