"""How much the bundle's configs repeat each other (issue 17: layered configs).

    python benchmarks/config_duplicates.py [--configs DIR] [--json]

Counts, over ``configs/**/*.json`` (without ``metadata.json``):

* top-level keys that two files define with the same value (an override that changes the value is not counted:
  that is what an override file is for), listed per pair of files;
* keys of a data profile (``configs/data/*.json``) whose value is the base's (``train.json``): a profile should
  set only what differs;
* keys that a file of a layered combination (the README's, the pipeline's and the tests' config lists, from
  ``benchmarks/config_snapshot.py``) sets to the value the files before it already gave: a restated value;
* the longest ``$`` expressions, with the file and id that hold them.

``--before`` takes the combinations as they were before issue 17's layering (with ``--configs`` of that commit).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(configs: Path) -> dict[str, dict]:
    files = sorted(p for p in configs.rglob("*.json") if p.name != "metadata.json")
    return {str(p.relative_to(configs)): json.loads(p.read_text(encoding="utf-8")) for p in files}


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def duplicated_keys(configs: dict[str, dict]) -> dict[str, list[str]]:
    """``"a.json & b.json"`` -> the top-level keys both define with the same value (``imports`` included)."""
    out = {}
    for (na, a), (nb, b) in itertools.combinations(sorted(configs.items()), 2):
        same = sorted(k for k in set(a) & set(b) if not k.startswith("_") and _same(a[k], b[k]))
        if same:
            out[f"{na} & {nb}"] = same
    return out


def profile_repeats(configs: dict[str, dict], base: str = "train.json") -> dict[str, list[str]]:
    """data profile -> the keys it sets to the base's value."""
    ref = configs[base]
    return {
        name: sorted(k for k, v in conf.items() if k in ref and _same(v, ref[k]))
        for name, conf in configs.items()
        if name.startswith("data/")
    }


def restated_in_stacks(configs: dict[str, dict], stacks: dict[str, list[str]]) -> dict[str, list[str]]:
    """combination -> ``file: key`` for every key a file sets to the value the earlier files of the list gave it."""
    out = {}
    for name, files in stacks.items():
        merged: dict = {}
        found = []
        for f in files:
            for key, value in copy.deepcopy(configs[f]).items():
                parts = key.replace("::", "#").split("#")
                node = merged
                for part in parts[:-1]:
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                if not key.startswith("_") and isinstance(node, dict) and parts[-1] in node:
                    if _same(node[parts[-1]], value):
                        found.append(f"{f}: {key}")
                if isinstance(node, dict) and (len(parts) == 1 or parts[0] in merged):
                    node[parts[-1]] = value
                if len(parts) == 1:
                    merged[key] = value
        if found:
            out[name] = found
    return out


def expressions(node, where: str):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from expressions(v, f"{where}#{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from expressions(v, f"{where}#{i}")
    elif isinstance(node, str) and node.startswith("$"):
        yield len(node), where


def longest_expressions(configs: dict[str, dict], top: int = 5) -> list[tuple[int, str]]:
    found = [(n, f"{name}:{where}") for name, conf in configs.items() for n, where in expressions(conf, "")]
    return sorted(found, reverse=True)[:top]


def measure(configs_dir: Path = ROOT / "configs", before: bool = False) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from config_snapshot import combinations, combinations_before

    configs = load(configs_dir)
    stacks = {k: files for k, (_, files) in (combinations_before() if before else combinations()).items()}
    restated = restated_in_stacks(configs, stacks)
    dups = duplicated_keys(configs)
    distinct = sorted({k for keys in dups.values() for k in keys})
    longest = longest_expressions(configs)
    return {
        "duplicated_pairs": dups,
        "duplicated_key_occurrences": sum(len(v) for v in dups.values()),
        "distinct_duplicated_keys": len(distinct),
        "profile_repeats": profile_repeats(configs),
        "profile_repeat_count": sum(len(v) for v in profile_repeats(configs).values()),
        "restated_in_stacks": restated,
        "restated_distinct": sorted({r for rs in restated.values() for r in rs}),
        "longest_expressions": [{"chars": n, "where": w} for n, w in longest],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/config_duplicates.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.add_argument("--configs", default=str(ROOT / "configs"), help="configs folder (default: the bundle's)")
    ap.add_argument("--before", action="store_true", help="the combinations before the layering")
    ap.add_argument("--json", action="store_true", help="print the measurement as JSON")
    args = ap.parse_args(argv)
    m = measure(Path(args.configs), before=args.before)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    for pair, keys in m["duplicated_pairs"].items():
        print(f"{pair}: {len(keys)} identical: {', '.join(keys)}")
    for name, keys in m["profile_repeats"].items():
        print(f"{name}: {len(keys)} set to the base's value: {', '.join(keys)}")
    for name, keys in m["restated_in_stacks"].items():
        print(f"combination {name}: restated {', '.join(keys)}")
    for e in m["longest_expressions"]:
        print(f"$ expression of {e['chars']} chars: {e['where']}")
    print(
        f"identical top-level keys: {m['duplicated_key_occurrences']} (file pairs x keys), "
        f"{m['distinct_duplicated_keys']} distinct; profile keys equal to the base: {m['profile_repeat_count']}; "
        f"values restated within a combination: {len(m['restated_distinct'])} (file: key); "
        f"longest $ expression: {m['longest_expressions'][0]['chars']} chars"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
