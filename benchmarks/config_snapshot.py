"""Resolved values of every config combination the README, the pipeline and the tests use; diff two snapshots.

A refactoring of the configs (issue 17: layered configs, ``$`` calls rewritten as ``_target_`` blocks) must not
change what a workflow runs. This reads each combination with ``monai.bundle.ConfigParser`` (files merged in
order, flattened overrides applied, ``%`` macros expanded), follows the references from the workflow's entry
points (its run id, ``initialize``, ``finalize`` and the Model Zoo property ids) and records, for every id it
reaches, the value with all references replaced by their values. Nothing is instantiated or run: a ``$`` call
and a ``_target_`` block become the same ``{"_target_": <module.name>, <parameter>: <value>, ...}`` record
(positional arguments bound to parameter names), string and list concatenations are folded (paths, transform chains), and any
other expression is kept as text with its references filled in. Plain values are checked against
``ConfigParser.get_parsed_content``.

    git archive 727009d configs | tar -x -C /tmp/old   # the configs before the layering
    python benchmarks/config_snapshot.py --configs /tmp/old/configs --before --out before.json
    python benchmarks/config_snapshot.py --compare before.json [--out after.json]

``--compare`` prints, per combination, the ids whose value changed, disappeared or appeared, and exits 1 if any
value changed.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILES = ("demo", "brats", "nsclc", "vesselmnist")
RUN_IDS = {
    "train": "training",
    "infer": "inferring",
    "radiomics": "extracting",
    "supervised": "supervising",
    "evaluate": "evaluating",
}


def combinations() -> dict[str, tuple[str, list[str]]]:
    """name -> (workflow kind, config files relative to ``configs/``), as the README, the pipeline and the tests
    combine them (``scripts/run/pipeline.py`` puts the data profile right after the first config)."""
    combos = {
        "readme_train": ("train", ["train.json", "data/demo.json"]),
        "readme_train_ddp": ("train", ["train.json", "data/demo.json", "multi_gpu_train.json"]),
        "readme_train_paper": ("train", ["train.json", "data/demo.json", "presets/paper.json"]),
        "readme_train_rubik": ("train", ["train.json", "data/demo.json", "rubik.json"]),
        "readme_inference": ("infer", ["inference.json"]),
        "readme_inference_ddp": ("infer", ["inference.json", "multi_gpu_inference.json"]),
        "readme_radiomics": ("radiomics", ["inference.json", "radiomics.json"]),
        "readme_radiomics_ddp": ("radiomics", ["inference.json", "radiomics.json", "multi_gpu_inference.json"]),
        "readme_supervised": ("supervised", ["train.json", "data/demo.json", "supervised.json"]),
        "readme_evaluate": ("evaluate", ["train.json", "evaluate.json"]),
        "test_train": ("train", ["train.json"]),
        "test_train_paper": ("train", ["train.json", "presets/paper.json"]),
        "test_train_ddp": ("train", ["train.json", "multi_gpu_train.json"]),
        "test_train_rubik": ("train", ["train.json", "rubik.json"]),
        "test_supervised": ("supervised", ["train.json", "supervised.json"]),
    }
    for p in PROFILES:
        prof = f"data/{p}.json"
        combos[f"pipeline_{p}_train"] = ("train", ["train.json", prof])
        combos[f"pipeline_{p}_rubik"] = ("train", ["train.json", prof, "rubik.json"])
        combos[f"pipeline_{p}_embed"] = ("infer", ["inference.json", prof])
        combos[f"pipeline_{p}_radiomics"] = ("radiomics", ["inference.json", prof, "radiomics.json"])
        combos[f"pipeline_{p}_supervised"] = ("supervised", ["train.json", prof, "supervised.json"])
        combos[f"pipeline_{p}_evaluate"] = ("evaluate", ["train.json", prof, "evaluate.json"])
    return combos


def combinations_before() -> dict[str, tuple[str, list[str]]]:
    """The same combinations before issue 17's layering: the supervised baseline sat on inference.json and
    evaluate.json stood alone (kept to re-take the before-snapshot from a checkout of that commit)."""
    combos = combinations()
    combos["readme_supervised"] = ("supervised", ["inference.json", "data/demo.json", "supervised.json"])
    combos["readme_evaluate"] = ("evaluate", ["evaluate.json"])
    combos["test_supervised"] = ("supervised", ["inference.json", "supervised.json"])
    for p in PROFILES:
        combos[f"pipeline_{p}_supervised"] = ("supervised", ["inference.json", f"data/{p}.json", "supervised.json"])
        combos[f"pipeline_{p}_evaluate"] = ("evaluate", ["evaluate.json", f"data/{p}.json"])
    return combos


REF = re.compile(r"@(\w+(?:(?:::|#)\w+)*)")


class Expander:
    """Replaces references by values, recursively, without evaluating anything."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.reached: set[str] = set()
        self._cache: dict[str, object] = {}

    def lookup(self, id_: str):
        node = self.config
        for part in id_.replace("#", "::").split("::"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise KeyError(id_)
        return node

    def ref(self, id_: str, stack: tuple = ()):
        id_ = id_.replace("#", "::")
        if id_ in stack:
            return f"<cycle {id_}>"
        self.reached.add(id_)
        if id_ not in self._cache:
            try:
                self._cache[id_] = self.expand(self.lookup(id_), stack + (id_,), id_)
            except KeyError:
                self._cache[id_] = f"<missing {id_}>"
        return self._cache[id_]

    def expand(self, node, stack: tuple = (), here: str = ""):
        if isinstance(node, dict):
            out = {k: self.expand(v, stack, f"{here}::{k}") for k, v in node.items()}
            if "_target_" in node:
                out["_target_"] = canonical_target(node["_target_"])
            if here:  # sub-ids are reachable too (their own values are recorded)
                for k in node:
                    self.reached.add(f"{here}::{k}")
            return out
        if isinstance(node, list):
            return [self.expand(v, stack, f"{here}::{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and node.startswith("@") and REF.fullmatch(node):
            return self.ref(node[1:], stack)
        if isinstance(node, str) and node.startswith("$"):
            return self.expression(node[1:], stack)
        return node

    def expression(self, text: str, stack: tuple):
        refs: list[str] = []

        def _sub(m):
            refs.append(m.group(1))
            return f"__ref{len(refs) - 1}__"

        code = REF.sub(_sub, text)
        values = [self.ref(r, stack) for r in refs]
        try:
            tree = ast.parse(code.strip(), mode="eval").body
        except SyntaxError:  # `$import x` and other statements
            return "$" + _fill(code, values)
        return self._node(tree, values)

    def _node(self, node, values):
        if isinstance(node, ast.Name) and re.fullmatch(r"__ref\d+__", node.id):
            return values[int(node.id[5:-2])]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return [self._node(e, values) for e in node.elts]
        if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
            return {k.value: self._node(v, values) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self._node(node.left, values), self._node(node.right, values)
            if (_plain_str(left) and _plain_str(right)) or (isinstance(left, list) and isinstance(right, list)):
                return left + right
        if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args):
            call = self._call(node, values)
            if call is not None:
                return call
        return "$" + _fill(ast.unparse(node), values)

    def _call(self, node: ast.Call, values):
        """``module.function(a, b=c)`` -> ``{"_target_": "module.function", <param of a>: a, "b": c}``."""
        try:
            name = ast.unparse(node.func)
        except Exception:
            return None
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name) or "__ref" in name:
            return None
        func = _locate(name)
        if func is None or any(k.arg is None for k in node.keywords):
            return None
        args = [self._node(a, values) for a in node.args]
        kwargs = {k.arg: self._node(k.value, values) for k in node.keywords}
        try:
            sig = inspect.signature(func)
            bound = dict(sig.bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            return {"_target_": canonical_target(name), "*args": args, **kwargs}
        for pname, param in sig.parameters.items():  # **kwargs as keywords, as a _target_ block passes them
            if param.kind is inspect.Parameter.VAR_KEYWORD and pname in bound:
                bound.update(bound.pop(pname))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and pname in bound:
                bound["*args"] = list(bound.pop(pname))
        return {"_target_": canonical_target(name), **bound}


def _plain_str(v) -> bool:
    return isinstance(v, str) and not v.startswith("$")


def _fill(code: str, values) -> str:
    return re.sub(r"__ref(\d+)__", lambda m: "<" + json.dumps(values[int(m.group(1))], sort_keys=True) + ">", code)


def _locate(name: str):
    from monai.bundle.config_item import ComponentLocator
    from monai.utils import optional_import

    module, _, attr = name.rpartition(".")
    if module:
        mod, ok = optional_import(module)
        if ok and hasattr(mod, attr):
            return getattr(mod, attr)
        parent, _, cls = module.rpartition(".")
        if parent:  # Class.method
            mod, ok = optional_import(parent)
            if ok and hasattr(getattr(mod, cls, None), attr):
                return getattr(getattr(mod, cls), attr)
        return None
    found = ComponentLocator().get_component_module_name(name)
    if isinstance(found, str):
        return getattr(optional_import(found)[0], name, None)
    return None


def canonical_target(name):
    if not isinstance(name, str):
        return name
    obj = _locate(name)
    if obj is None:
        return name
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', name)}"


def entry_ids(kind: str, config: dict) -> list[str]:
    from monai.bundle.properties import InferProperties, TrainProperties
    from monai.utils import BundlePropertyConfig

    ids = [RUN_IDS[kind], "initialize", "finalize"]
    props = {"train": TrainProperties, "infer": InferProperties}.get(kind, {})
    ids += [p[BundlePropertyConfig.ID] for p in props.values() if p.get(BundlePropertyConfig.ID)]
    return ids


def _contains_code(v) -> bool:
    if isinstance(v, dict):
        return "_target_" in v or any(_contains_code(x) for x in v.values())
    if isinstance(v, list):
        return any(_contains_code(x) for x in v)
    return isinstance(v, str) and (v.startswith("$") or v.startswith("<"))


def snapshot(kind: str, files: list[str], configs: Path = ROOT / "configs") -> dict[str, object]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in files])
    parser.parse()
    exp = Expander(parser.get())
    for id_ in entry_ids(kind, parser.get()):
        try:
            exp.lookup(id_)
        except KeyError:
            continue
        exp.ref(id_)
    out = {}
    for id_ in sorted(exp.reached):
        value = exp.ref(id_)
        if isinstance(value, str) and value.startswith("<missing"):
            continue
        if not _contains_code(value):  # a plain value: the parser must resolve it to the same thing
            resolved = parser.get_parsed_content(id_)
            if json.loads(json.dumps(resolved)) != json.loads(json.dumps(value)):
                raise AssertionError(f"{files}: {id_} expands to {value!r} but ConfigParser resolves {resolved!r}")
        out[id_] = value
    return out


def first_difference(a, b, path: str = "") -> str:
    """Where two values first differ, as ``path: before -> after``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b or json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True):
                return first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
                return first_difference(x, y, f"{path}/{i}")
    return f"{path or '/'}: {json.dumps(a, sort_keys=True)[:400]} -> {json.dumps(b, sort_keys=True)[:400]}"


def diff(before: dict, after: dict) -> tuple[list[str], int]:
    lines, changed = [], 0
    for combo in sorted(set(before) | set(after)):
        b, a = before.get(combo), after.get(combo)
        if b is None or a is None:
            lines.append(f"{combo}: only in {'after' if b is None else 'before'}")
            continue
        ch = [
            i for i in sorted(set(a) & set(b)) if json.dumps(a[i], sort_keys=True) != json.dumps(b[i], sort_keys=True)
        ]
        gone, new = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        leaves = [i for i in ch if not any(j.startswith(i + "::") for j in ch)]  # the innermost changed ids
        changed += len(ch)
        if ch or gone or new:
            lines.append(f"{combo}: {len(ch)} changed ({len(leaves)} innermost), {len(gone)} gone, {len(new)} new")
            for i in leaves:
                lines.append(f"  changed {i} at {first_difference(b[i], a[i])}")
            for i in gone:
                lines.append(f"  gone {i}: {json.dumps(b[i], sort_keys=True)[:200]}")
            for i in new:
                lines.append(f"  new {i}: {json.dumps(a[i], sort_keys=True)[:200]}")
        else:
            lines.append(f"{combo}: identical ({len(a)} ids)")
    return lines, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/config_snapshot.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    ap.add_argument("--out", default=None, help="write the snapshot (JSON) here")
    ap.add_argument("--compare", default=None, help="a snapshot to diff against")
    ap.add_argument("--configs", default=str(ROOT / "configs"), help="configs folder (e.g. of an older commit)")
    ap.add_argument("--before", action="store_true", help="the combinations as they were before the layering")
    ap.add_argument("--only", default=None, help="comma-separated combination names (default: all)")
    args = ap.parse_args(argv)
    os.environ.setdefault("SIAM3D_DATALIST", "/nonexistent/datalist.json")  # never read: nothing is evaluated
    combos = combinations_before() if args.before else combinations()
    if args.only:
        combos = {k: combos[k] for k in args.only.split(",")}
    snap = {name: snapshot(kind, files, Path(args.configs)) for name, (kind, files) in combos.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(snap, indent=1, sort_keys=True), encoding="utf-8")
    if not args.compare:
        print(f"{len(snap)} combinations, {sum(len(v) for v in snap.values())} ids")
        return 0
    before = json.loads(Path(args.compare).read_text(encoding="utf-8"))
    lines, changed = diff({k: v for k, v in before.items() if k in snap}, snap)
    print("\n".join(lines))
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
