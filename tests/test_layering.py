"""The package's layering (design.md): every import inside `nosa` points down, and no modules import each
other in a loop. Read from the source with `ast`, module-level and function-level imports alike (an
import inside a function is still a dependency; it only runs later).

The rules, bottom to top. A module may import
  - any module of a lower layer;
  - modules of its own component (its package, e.g. nosa.engine.* among themselves);
  - nothing else: not a higher layer, and not another component of its own layer (peers stay independent).
A module named `cli` (`nosa.cli`, `nosa.train.cli`, ...) is a command-line entry point and sits at the top,
whatever package it is in. A module that matches no component fails the test: place it in LAYERS.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nosa"

LAYERS: list[tuple[str, ...]] = [
    ("nosa.config", "nosa.tokenizer"),                      # configuration and the byte tokenizer
    ("nosa.ops",),                                          # reference ops, kernels, dispatch
    ("nosa.layers",),                                       # attention layer, eviction head, Llama blocks
    ("nosa.models",),                                       # NosaForCausalLM, conversion
    ("nosa.engine",),                                       # the offloading inference engine
    ("nosa",),                                              # the package facade (re-exports config, models, engine)
    ("nosa.data", "nosa.results"),                          # corpora and tasks; result files and statistics
    ("nosa.train", "nosa.eval", "nosa.bench", "nosa.demo", "nosa.serve"),  # the stages: independent peers
    ("nosa.study",),                                        # the quality study: trains and evaluates
    ("cli",),                                               # command-line entry points (any module named cli)
]
COMPONENTS = {component: level for level, components in enumerate(LAYERS) for component in components}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def component_of(module: str) -> str | None:
    """The component a module belongs to: 'cli' for entry points, else the longest matching prefix."""
    if module.split(".")[-1] == "cli":
        return "cli"
    matches = [c for c in COMPONENTS if c != "cli" and (module == c or module.startswith(c + "."))]
    return max(matches, key=len) if matches else None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The nosa modules `module` imports, anywhere in its source. `from package import name` counts as an
    import of package.name when that is a module, else of the package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m == "nosa" or m.startswith("nosa.")}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    homeless = sorted(m for m in all_modules() if component_of(m) is None)
    assert not homeless, f"modules in no layer (add their package to LAYERS in {__file__}): {homeless}"


def test_imports_point_down():
    violations = []
    for module, targets in sorted(import_graph().items()):
        own = component_of(module)
        for target in sorted(targets):
            other = component_of(target)
            if other is None or other == own:
                continue
            if COMPONENTS[other] > COMPONENTS[own]:
                violations.append(f"{module} ({own}, layer {COMPONENTS[own]}) imports {target} ({other}, higher layer {COMPONENTS[other]})")
            elif COMPONENTS[other] == COMPONENTS[own]:
                violations.append(f"{module} ({own}) imports its peer {target} ({other}): peers of a layer stay independent")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components of more than one module (import loops)."""
    index, low, on_stack, stack, loops, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    loops.append(sorted(members))
    return loops


def test_no_import_loops():
    loops = strongly_connected(import_graph())
    assert not loops, "modules importing each other in a loop: " + "; ".join(" <-> ".join(loop) for loop in loops)


def test_the_checks_catch_what_they_should():
    """The rules are not vacuous: an upward import, a peer import and a loop are each found."""
    assert component_of("nosa.ops.kernels.gather") == "nosa.ops" and component_of("nosa.train.cli") == "cli"
    assert component_of("nosa") == "nosa" and component_of("nosa.engine.llm") == "nosa.engine"
    assert COMPONENTS["nosa.engine"] > COMPONENTS["nosa.ops"] and COMPONENTS["nosa.train"] == COMPONENTS["nosa.eval"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "nosa.ops.block_ops" in graph["nosa.ops.kernels.gather"]  # a real edge is seen
    assert "nosa.ops.kernels" in graph["nosa.ops.dispatch"]  # function-level imports count
