"""The package layout keeps its dependency direction: no module imports a layer above its own.

Layers, lowest first (a module may import its own layer's package and any layer below):

    utils                        atomic file writes, progress bars, the git revision (no torch, nothing else from mtssl)
    data, loss, distributed,     views and datasets, pair and multi-task losses, process groups / FSDP / DCP,
    job_folder                   the preemption protocol; the job folder's files, status words and schemas
    config                       composition, resolution and run identity
    model                        backbone, heads, the multi-task Siamese network
    train, eval                  the training loop; frozen-feature evaluation
    config.schema, .validate     the field checks and validation: they read the registries of every layer
    run, submitit_job            entry points (and python -m mtssl.eval)

A module's layer is that of the longest dotted name in LAYER it falls under (``config.validate``, else ``config``).

Deferred imports inside functions count too: they are still dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "mtssl"

LAYER = {
    "utils": 0,
    "data": 1, "loss": 1, "distributed": 1, "job_folder": 1,
    "config": 2,
    "model": 3,
    "train": 4, "eval": 4,
    "config.schema": 5, "config.validate": 5,
    "run": 5, "submitit_job": 5, "eval.__main__": 5,
}
# Packages of one layer that must not import each other either (siblings stay independent).
INDEPENDENT = [{"data", "loss"}, {"train", "eval"}]
# Modules of the top level that are neither a layer nor importable code (the Hydra config package).
NOT_LAYERED = {"__init__", "conf"}


def _component(module: str) -> str | None:
    """'mtssl.train.trainer' -> 'train', 'mtssl.config.validate' -> 'config.validate'; None outside mtssl."""
    parts = module.split(".")
    if parts[0] != "mtssl" or len(parts) < 2:
        return None
    for length in range(len(parts) - 1, 1, -1):
        if ".".join(parts[1:length + 1]) in LAYER:
            return ".".join(parts[1:length + 1])
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in a file, deferred ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _modules():
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        relative = path.relative_to(PACKAGE_ROOT)
        if relative.parts[0].removesuffix(".py") in NOT_LAYERED:
            continue
        component = _component(".".join(("mtssl", *relative.with_suffix("").parts)))
        if component in NOT_LAYERED:
            continue
        yield path, component


def test_every_top_level_component_has_a_layer():
    components = {p.name.removesuffix(".py") for p in PACKAGE_ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert components - NOT_LAYERED == {c for c in LAYER if "." not in c}, \
        "a new top-level module or package needs a layer in LAYER"


@pytest.mark.parametrize("path,component", list(_modules()), ids=lambda v: str(v.relative_to(PACKAGE_ROOT)) if isinstance(v, Path) else v)
def test_no_import_points_up(path, component):
    for line, module in _imports(path):
        target = _component(module)
        if target is None or target == component or target in NOT_LAYERED - {"__init__"}:
            continue
        assert target in LAYER, f"{path}:{line} imports {module}, which is not in any layer"
        assert LAYER[target] <= LAYER[component], (
            f"{path.relative_to(PACKAGE_ROOT)}:{line} imports {module}: layer {component} ({LAYER[component]}) "
            f"must not depend on the higher layer {target} ({LAYER[target]})"
        )
        for siblings in INDEPENDENT:
            assert not {component, target} <= siblings, (
                f"{path.relative_to(PACKAGE_ROOT)}:{line} imports {module}: {component} and {target} are independent siblings"
            )


def test_the_guard_sees_a_violation(tmp_path):
    """The checker itself fails on an upward import (so a passing run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mtssl.train.trainer import Trainer\n")
    (line, module), = _imports(bad)
    assert (line, _component(module)) == (2, "train")
    assert LAYER[_component(module)] > LAYER["loss"]


def test_no_import_cycles():
    """No cycle among mtssl's modules, deferred imports included (each can be imported on its own)."""
    graph: dict[str, set[str]] = {}
    for path, _ in _modules():
        relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        graph[name] = {m for _, m in _imports(path) if m.startswith("mtssl.")}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == "done" or node not in graph:
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for target in sorted(graph[node]):
            visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
