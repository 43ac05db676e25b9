"""Size and shape of the code base at one or more git revisions: the before/after table of issue 17.

For each revision (``WORKTREE`` = the working tree) it counts, under ``scripts/`` and ``configs/``:

* Python files and lines in ``scripts/``, modules over 400 lines, and the largest function (lines, name);
* places the balance mode is branched on: a comparison of a mode value (``mode ==``, ``mode in``,
  ``== 'se'`` ...) in ``scripts/`` or a ``@balance#mode`` test inside a config expression;
* top-level config keys defined with the same value in two or more config files (``configs/*.json``, data
  profiles and presets excluded: they are meant to override);
* the longest ``$`` expression in a config;
* repeated code blocks: pairs of places sharing six or more lines (the ``duplicates`` tool where it is installed,
  else ``n/a``).

    python benchmarks/architecture_metrics.py a690ece WORKTREE --out benchmarks/results/architecture.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODE_BRANCH = re.compile(
    r"""\bmode\b[^\n=]{0,12}(==|!=|\bnot in\b|\bin\b)|(==|!=)\s*['"](se|re|bank|none|plain)['"]|\b(is_se|is_re)\b"""
)
CONFIG_MODE_BRANCH = re.compile(r"@balance#mode\s*(==|!=|\bin\b|\bnot in\b)|balance#mode'\]\s*(==|!=|\bin\b)")


def checkout(rev: str, dest: Path) -> Path:
    """The tree at ``rev`` (scripts/ and configs/ only) in ``dest``; ``WORKTREE`` is the working tree itself."""
    if rev == "WORKTREE":
        return ROOT
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "scripts", "configs"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def python_metrics(tree: Path) -> dict:
    files = sorted((tree / "scripts").rglob("*.py"))
    lines = {f: len(f.read_text(encoding="utf-8").splitlines()) for f in files}
    largest = (0, "")
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > largest[0]:
                    largest = (n, f"{f.relative_to(tree)}:{node.name}")
    branches = sum(
        len(MODE_BRANCH.findall(line))
        for f in files
        for line in f.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith(("#", "for "))  # a loop over modes is not a branch
    )
    return {
        "python_files": len(files),
        "python_lines": sum(lines.values()),
        "modules_over_400_lines": sorted(str(f.relative_to(tree)) for f, n in lines.items() if n > 400),
        "largest_function_lines": largest[0],
        "largest_function": largest[1],
        "mode_branches_scripts": branches,
    }


def config_metrics(tree: Path) -> dict:
    configs = sorted((tree / "configs").glob("*.json"))
    configs = [c for c in configs if c.name != "metadata.json"]
    seen: Counter = Counter()
    longest = (0, "")
    branches = 0
    for c in configs:
        text = c.read_text(encoding="utf-8")
        doc = json.loads(text)
        for k, v in doc.items():
            seen[(k, json.dumps(v, sort_keys=True))] += 1
        branches += len(CONFIG_MODE_BRANCH.findall(text))
        for s in re.findall(r'"(\$(?:[^"\\]|\\.)*)"', text):
            if len(s) > longest[0]:
                longest = (len(s), c.name)
    dup = sorted(k for (k, _), n in seen.items() if n > 1 and k != "imports")
    return {
        "config_files": len(configs),
        "duplicated_top_level_keys": len(dup),
        "duplicated_keys": dup,
        "longest_dollar_expression": longest[0],
        "longest_dollar_expression_in": longest[1],
        "mode_branches_configs": branches,
    }


def duplicate_pairs(tree: Path) -> int | None:
    if not shutil.which("duplicates"):
        return None
    out = subprocess.run(
        ["duplicates", "--repo", str(tree / "scripts"), "--most", "200", "--seconds", "120"],
        capture_output=True,
        text=True,
    ).stdout
    m = re.search(r"(\d+) pairs?", out)
    return int(m.group(1)) if m else (0 if "no duplicates" in out else None)


def measure(rev: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = checkout(rev, Path(tmp) / "tree")
        return {
            "revision": rev,
            **python_metrics(tree),
            **config_metrics(tree),
            "repeated_code_block_pairs": duplicate_pairs(tree),
        }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("revisions", nargs="+", help="git revisions, or WORKTREE for the working tree")
    ap.add_argument("--out", "--output", dest="out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    results = {rev: measure(rev) for rev in args.revisions}
    keys = [k for k in next(iter(results.values())) if k not in ("revision", "duplicated_keys")]
    print("| metric | " + " | ".join(args.revisions) + " |")
    print("|---|" + "---|" * len(args.revisions))
    for k in keys:
        cells = []
        for rev in args.revisions:
            v = results[rev][k]
            cells.append(str(len(v)) if isinstance(v, list) else str(v))
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
