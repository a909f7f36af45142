"""The import graph of train/ and data_pipeline/ points down a declared layer order (DESIGN.md, "Layers")."""

import ast
import re
from pathlib import Path

from helpers import REPO

# bottom to top; a module may import from its own layer or a lower one. First match wins.
LAYERS = [
    ("config", [r"train\.config"]),
    ("foundation", [r"train\.distributed", r"data_pipeline(\..*)?"]),
    ("blocks", [r"train\.models(\..*)?", r"train\.optim", r"train\.monitor", r"train\.checkpoint", r"train\.speed",
                r"train\.compression"]),
    ("weights and teachers", [r"train\.weights", r"train\.teachers(\.(clip|kmeans|tokenizer))?"]),
    ("methods", [r"train\.methods(\..*)?"]),
    ("engine and evaluation", [r"train\.engine(\..*)?", r"train\.eval(\.(features|metrics|quick|online))?",
                               r"train\.compression\.diagnostic", r"train\.planning", r"train\.report"]),
    ("recipe", [r"train\.recipe"]),
    ("command-line helpers", [r"train\.cli"]),
    ("entry points", []),  # modules with a main() (commands): nothing in the packages imports them
]
ENTRY = len(LAYERS) - 1
PACKAGES = ("train", "data_pipeline")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str, known: dict[str, Path]) -> int:
    """The module's layer; `train` itself (its __init__ only sets DS_ACCELERATOR) sits below all."""
    if module == "train":
        return -1
    if is_entry_point(known[module]):
        return ENTRY
    layer = next((i for i, (_, patterns) in enumerate(LAYERS) if any(re.fullmatch(p, module) for p in patterns)),
                 None)
    assert layer is not None, f"{module}: in no layer of tests/test_layers.py (a library module needs one)"
    return layer


def project_imports(path: Path, known: dict[str, Path]):
    """(line, imported project module, inside a function?) of every import statement in `path`."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        resolved = set()
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name not in known:
                name = name.rpartition(".")[0]
            resolved.add(name)
        for name in sorted(resolved):
            yield node.lineno, name, id(node) in in_function


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for _, t, _ in project_imports(p, known) if t != m} for m, p in known.items()}


def is_entry_point(path: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


def test_imports_point_down_the_layers():
    known = modules()
    upward = []
    for module, path in known.items():
        own = layer_of(module, known)
        for line, target, _ in project_imports(path, known):
            theirs = layer_of(target, known)
            if theirs > own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target} ({LAYERS[theirs][0]}) from "
                              f"layer {LAYERS[own][0]!r}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_function_level_imports_of_the_project():
    known = modules()
    lazy = [f"{p.relative_to(REPO)}:{line} imports {t}" for m, p in known.items()
            for line, t, inside in project_imports(p, known) if inside]
    assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_a_module_with_main_is_a_leaf():
    known = modules()
    entry_points = {m for m, p in known.items() if is_entry_point(p)}
    assert "train.pretrain" in entry_points and "train.compression.__main__" in entry_points
    importers = [f"{m} imports {t}" for m, targets in graph().items() for t in targets & entry_points]
    assert not importers, "entry points imported by the packages:\n" + "\n".join(importers)


def test_the_import_graph_has_no_cycles():
    edges, cycles, done, stack = graph(), [], set(), []

    def visit(module):
        if module in stack:
            cycles.append(" -> ".join(stack[stack.index(module):] + [module]))
            return
        if module in done:
            return
        stack.append(module)
        for target in sorted(edges[module]):
            visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_console_scripts_name_the_command_modules():
    import configparser
    import importlib

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    for line in setup["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        module, function = target.split(":")
        assert is_entry_point(modules()[module]) and callable(getattr(importlib.import_module(module), function)), name
