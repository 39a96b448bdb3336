"""The import graph reads one way (docs/architecture.md): no module imports one of a later layer, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import finegrain

PACKAGE = Path(finegrain.__file__).parent
# in import order: a module may import from its own layer or an earlier one
LAYERS = [
    ["finegrain", "finegrain.errors", "finegrain.geometry"],
    ["finegrain.data"],
    ["finegrain.models"],
    ["finegrain.evaluation"],
    ["finegrain.tasks"],
    ["finegrain.checkpoints", "finegrain.callbacks", "finegrain.training"],
    [
        "finegrain.explain",
        "finegrain.package",
        "finegrain.predict",
        "finegrain.predict_files",
        "finegrain.visualize",
        "finegrain.export",
    ],  # fmt: skip
    ["finegrain.serve"],
    ["finegrain.bench"],
    ["finegrain.cli"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """finegrain modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finegrain"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("finegrain"))
    return found


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of docs/architecture.md: add it to LAYERS and the doc"
    return best[0]


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_later_layer():
    wrong = [f"{module} -> {imported}" for module, imported_set in graph().items() for imported in imported_set
             if module != "finegrain" and layer_of(imported) > layer_of(module)]  # fmt: skip
    assert wrong == []


def test_no_import_cycles():
    edges = {m: {i for i in imported if i != m} for m, imported in graph().items() if m != "finegrain"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges.get(module, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]) if nxt in path else f"{module} -> {nxt}")
            elif state.get(nxt) is None and nxt in edges:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_worked_example_of_docs_architecture_is_a_network_finegrain_can_train(monkeypatch):
    """docs/architecture.md shows how to add a network: its code must stay a working, registered network."""
    import re
    import sys
    import types

    import torch

    from finegrain.models import NETWORKS, create_network, network_config
    from finegrain.tasks.classification import ClassificationTask

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# mybirds/twohead.py\n(.*?)```", doc, re.S).group(1)
    module = types.ModuleType("mybirds_twohead")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    path = "mybirds_twohead.TwoHead"
    monkeypatch.setitem(NETWORKS, path, NETWORKS.pop(path))  # registered by the example; removed after the test
    network = create_network(path, num_classes=3, backbone="test_resnet")
    assert network_config(network) == {
        "class_path": path,
        "init_args": {"num_classes": 3, "backbone": "test_resnet", "weights": "none"},
    }
    task = ClassificationTask(network=network)
    output = task(torch.rand(2, 3, 64, 64))
    assert output.logits.shape == (2, 3) and set(output.branch_logits) == {"head_a", "head_b"}
    loss = task.loss(output, torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for group in network.lr_groups().values() for p in group)
