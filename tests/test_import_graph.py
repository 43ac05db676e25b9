"""The scripts package's import graph has no cycle (issue 17): a stage imports the stages before it, never after."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_graph(typing_imports: bool = False) -> dict[str, set[str]]:
    """``{module: modules of scripts it imports}``, lazy (function-level) imports included; imports under
    ``if TYPE_CHECKING:`` only with ``typing_imports`` (they never run, but a circle through them is still two modules
    that must be read together)."""
    modules = {}
    for path in (ROOT / "scripts").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only and not typing_imports:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t not in (module, "scripts")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_scripts_have_no_import_cycle():
    graph = _import_graph(typing_imports=True)  # issue 30: not even through TYPE_CHECKING
    assert len(graph) > 30 and "scripts.downstream.protocol" in graph["scripts.downstream.evaluation"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


LAYERS = ("data", "pretrain", "downstream", "run")  # the stages in data-flow order; shared helpers sit below them


def _layer(module: str) -> int:
    """0 for the shared helpers (``scripts.<module>``), then 1.. for the stage packages in data-flow order."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) + 1 if len(parts) > 2 and parts[1] in LAYERS else 0


def test_no_module_imports_from_a_later_stage():
    """A stage imports only the stages before it and the shared helpers below every stage (DESIGN.md): nothing
    points back up (e.g. pretrain -> run, or a shared helper -> a stage)."""
    graph = _import_graph(typing_imports=True)
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))
    assert not upward, upward


def test_reports_only_render():
    """The report modules run no protocol: they import neither the protocol nor the evaluation."""
    graph = _import_graph()
    for module in ("report", "report_html", "report_tables"):
        imported = graph[f"scripts.downstream.{module}"]
        assert not imported & {"scripts.downstream.protocol", "scripts.downstream.evaluation"}, module


def _calls(tree: ast.AST) -> list[str]:
    """Names of the functions and methods called in ``tree`` (``f(...)`` -> f, ``x.f(...)`` -> f)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def test_the_training_step_is_defined_once():
    """Issue 30: the 3DSiam loss is computed and back-propagated in ``scripts.pretrain.step`` alone, so the trainers
    and every benchmark run the bundle's own step (the supervised baseline's cross-entropy is its own step)."""
    allowed = {
        "simsiam_loss_per_sample": {"scripts/pretrain/step.py", "scripts/pretrain/losses.py"},
        "backward": {"scripts/pretrain/step.py", "scripts/downstream/supervised.py"},
    }
    files = [*(ROOT / "scripts").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "apps").rglob("*.py")]
    found: dict[str, set[str]] = {name: set() for name in allowed}
    for path in files:
        calls = _calls(ast.parse(path.read_text(encoding="utf-8")))
        for name in allowed:
            if name in calls:
                found[name].add(path.relative_to(ROOT).as_posix())
    for name, where in found.items():
        assert where <= allowed[name], f"{name}() is called outside the one step: {sorted(where - allowed[name])}"
    assert found["simsiam_loss_per_sample"] >= {"scripts/pretrain/step.py"}
