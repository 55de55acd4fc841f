"""The package's layers, read from the source: no module imports a layer above its own, no import cycles.

Every module of ``vespo_megatron`` is parsed with ``ast`` (nothing is imported). Each import of another
``vespo_megatron`` module, at module level or inside a function, must point at the importer's own layer
or one below it. Module-level imports (the ones that run when a module loads) must form no cycle.
``LAYERS`` is the one place the order is written; a new top-level module or package must be added there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "vespo_megatron"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Bottom to top. An entry is a top-level module or sub-package of vespo_megatron ("" is the package's own
# __init__, which runs before any of them); a module may import its own layer and every layer below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("loss",),  # pure tensor math and the one collective autograd op: no package imports
    ("config",),  # typed sections, YAML + overrides, validate(); uses the loss parameter dataclasses
    ("runtime",),  # process plumbing: CPU shims, groups from a config, liveness, preemption, file writes
    ("layout", "estimates"),  # the rank grid and the estimates, pure Python over a config
    ("models", "tokenizer", "tasks"),  # the Megatron model, HF in/out, tokenizers, prompts and rewards
    ("train",),  # the Megatron step shared by SFT and RL
    ("checkpoint", "metrics"),  # what a run writes: checkpoints (+ HF sidecar), metrics
    ("rollout",),  # sampling with the policy
    ("rl",),  # the RL loop
    # entry points: the config as entry points load it, commands, benchmarks, studies, demo
    ("run_config", "check_config", "config_docs", "hf_commands", "plotting", "bench", "study", "demo", "selftest", "cli",
     ""),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported vespo_megatron module
    line: int
    module_level: bool  # runs when ``source`` loads (not inside a function, not under TYPE_CHECKING)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """``{module: (path for messages, source)}`` for every ``.py`` file of the package."""
    return {module_name(path, root): (str(path.relative_to(root.parent)), path.read_text())
            for path in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module_level: bool):
    """``(import node, module_level)`` for every import below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), module_level)
        else:
            yield from _walk(child, module_level)


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> list[Import]:
    """The ``vespo_megatron`` modules ``source`` imports; ``from pkg import name`` names the submodule when
    ``pkg.name`` is a module, else ``pkg`` itself."""
    found = []
    for node, module_level in _walk(ast.parse(source), True):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in dict.fromkeys(targets):  # one per imported module, in order
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.append(Import(module, target, node.lineno, module_level))
    return found


def all_imports(sources: dict[str, tuple[str, str]]) -> list[Import]:
    known = set(sources)
    return [imp for module, (path, text) in sources.items()
            for imp in imports_of(module, text, path.endswith("__init__.py"), known)]


def layer_of(module: str) -> int:
    """Index in LAYERS of the top-level part of ``module``; KeyError names a module no layer lists."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else ""
    for index, layer in enumerate(LAYERS):
        if head in layer:
            return index
    raise KeyError(f"{module}: {head!r} is in no layer; add it to LAYERS in {__file__}")


def upward_imports(sources: dict[str, tuple[str, str]]) -> list[str]:
    """One line per import of a higher layer: where, what, and the two layers."""
    problems = []
    for imp in all_imports(sources):
        below, above = layer_of(imp.source), layer_of(imp.target)
        if above > below:
            where = "" if imp.module_level else " (in a function)"
            problems.append(f"{sources[imp.source][0]}:{imp.line}: {imp.source} imports {imp.target}{where}: "
                            f"layer {LAYERS[below]} must not import layer {LAYERS[above]}")
    return problems


def import_cycles(sources: dict[str, tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of the module-level import graph that hold a cycle."""
    graph: dict[str, set[str]] = {module: set() for module in sources}
    for imp in all_imports(sources):
        if imp.module_level and imp.target in graph:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:  # iterative, so a deep graph cannot exceed the recursion limit
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[current] = min(low[current], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1 or current in graph[current]:
                    cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


# ------------------------------------------------------------------------------------------ the tests


def test_every_module_is_in_a_layer():
    missing = []
    for module in package_sources():
        try:
            layer_of(module)
        except KeyError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(package_sources())
    assert not problems, "imports from a lower layer to a higher one:\n" + "\n".join(problems)


def test_no_import_cycles_at_module_level():
    cycles = import_cycles(package_sources())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_detectors_flag_synthetic_violations():
    """The checks above would fail on an upward import (module level or in a function) and on a cycle."""
    fake = {
        "vespo_megatron.loss": ("vespo_megatron/loss/__init__.py", ""),
        "vespo_megatron.loss.kernel": ("vespo_megatron/loss/kernel.py", "from vespo_megatron.rl import loop\n"),
        "vespo_megatron.config.model": ("vespo_megatron/config/model.py",
                                        "def f():\n    import vespo_megatron.train.engine\n"),
        "vespo_megatron.config.rl": ("vespo_megatron/config/rl.py", "from vespo_megatron.loss import kernel\n"),
        "vespo_megatron.rl.loop": ("vespo_megatron/rl/loop.py", "from . import step\nfrom ..loss.kernel import x\n"),
        "vespo_megatron.rl.step": ("vespo_megatron/rl/step.py", "from vespo_megatron.rl.loop import run\n"),
        "vespo_megatron.train.engine": ("vespo_megatron/train/engine.py",
                                        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from vespo_megatron.train import batches\n"),
        "vespo_megatron.train.batches": ("vespo_megatron/train/batches.py", "import vespo_megatron.train.engine\n"),
    }
    problems = upward_imports(fake)
    assert len(problems) == 2, problems
    assert problems[0].startswith("vespo_megatron/loss/kernel.py:1: vespo_megatron.loss.kernel imports "
                                  "vespo_megatron.rl.loop:")
    assert "vespo_megatron.train.engine (in a function)" in problems[1]
    # kernel -> loop -> kernel and loop <-> step are one cycle; engine -> batches runs only under
    # TYPE_CHECKING, so engine <-> batches is not one.
    assert import_cycles(fake) == [["vespo_megatron.loss.kernel", "vespo_megatron.rl.loop", "vespo_megatron.rl.step"]]
    edges = {(imp.source, imp.target) for imp in all_imports(fake)}
    assert ("vespo_megatron.rl.loop", "vespo_megatron.loss.kernel") in edges  # relative imports resolved
    try:
        layer_of("vespo_megatron.brand_new")
    except KeyError as exc:
        assert "add it to LAYERS" in str(exc)
    else:
        raise AssertionError("a module in no layer must be an error")
