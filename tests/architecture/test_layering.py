"""The layering of rlhf_cli, read from the source: every arrow points one way.

algo/ (pure math) <- ppo/ (the engine) <- trl/ (legacy TRL's surface) and the command line on top;
between packages, every import points down :data:`PACKAGE_ORDER` (docs/architecture.md draws it).
Imports are collected from the syntax tree of every module, those inside functions included (a
lazy import is still a dependency), except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_cli

PACKAGE = Path(rlhf_cli.__file__).parent
MODULES = {
    ".".join(("rlhf_cli", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
    for path in PACKAGE.rglob("*.py")
}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Fully qualified names imported anywhere in ``tree`` (relative imports resolved)."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _resolve(name: str) -> str | None:
    """The rlhf_cli module ``name`` refers to (``pkg.mod.attr`` -> ``pkg.mod``), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {_resolve(name) for name in _imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


GRAPH = _graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _parents(module: str) -> set[str]:
    """A module's enclosing packages: importing it runs their __init__ first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_sees_the_layers():
    """The graph is read right: the engine depends on the math, the TRL trainer on the engine."""
    assert "rlhf_cli.algo.functional" in GRAPH["rlhf_cli.ppo.engine"]
    assert "rlhf_cli.ppo.engine" in GRAPH["rlhf_cli.trl.trainer"]
    assert len(MODULES) > 60


def test_no_import_cycle_anywhere_in_rlhf_cli():
    """No module reaches itself through imports (lazy ones included), counting that importing a
    module first runs the __init__ of each package around it."""
    with_parents = {m: deps | {p for d in deps for p in _parents(d) if p != m and not _in(m, p)} for m, deps in GRAPH.items()}
    assert _find_cycle(with_parents) is None, " -> ".join(_find_cycle(with_parents))


def test_the_math_imports_nothing_of_rlhf_cli_but_itself():
    """algo/ is pure: torch and its own modules (whose names come from the torch-free algo.names)."""
    outside = {m: sorted(d for d in deps if not _in(d, "rlhf_cli.algo")) for m, deps in GRAPH.items() if _in(m, "rlhf_cli.algo")}
    assert {m: d for m, d in outside.items() if d} == {}


def test_the_names_modules_and_the_settings_are_torch_free():
    for module in ("rlhf_cli.algo.names", "rlhf_cli.choices", "rlhf_cli.ppo.settings"):
        assert GRAPH[module] <= {"rlhf_cli.algo.names"}, module
        imports = _imported_names(ast.parse(MODULES[module].read_text()), module, False)
        assert not any(name.split(".")[0] in {"torch", "transformers", "accelerate", "numpy"} for name in imports)


@pytest.mark.parametrize("layer", ["rlhf_cli.algo", "rlhf_cli.ppo"])
def test_the_math_and_the_engine_import_nothing_above_them(layer):
    """Neither the math nor the engine imports the TRL layer or the command line."""
    above = ("rlhf_cli.trl", "rlhf_cli.core", "rlhf_cli.cli", "rlhf_cli.config", "rlhf_cli.engine")
    offending = {m: sorted(d for d in deps if any(_in(d, a) for a in above)) for m, deps in GRAPH.items() if _in(m, layer)}
    assert {m: d for m, d in offending.items() if d} == {}


# The packages and top-level modules of rlhf_cli, bottom to top: each may import only those before it
# (and itself). docs/architecture.md, "The layers", explains the order.
PACKAGE_ORDER = (
    # foundations: import nothing of rlhf_cli but each other
    "rlhf_cli",  # the package's __init__: __version__; its public names are imported lazily, by name
    "algo", "errors", "choices", "summary_stats", "seeding", "reporting", "hub", "assets",
    # data and models, below the engine and the rewards alike
    "data", "models", "rollout",
    # the engine, then legacy TRL's surface on it
    "ppo", "trl", "core",
    # reward sources, then reward models trained from preferences (rlhf reward's library)
    "rewards", "reward_model",
    # the command line
    "config", "engine", "label", "tools", "console", "cli_train", "cli", "__main__",
)


def _package(module: str) -> str:
    """``rlhf_cli.ppo.engine`` -> ``ppo``; ``rlhf_cli.cli`` -> ``cli``; ``rlhf_cli`` -> ``rlhf_cli``."""
    return module.split(".")[1] if "." in module else module


def _back_arrows(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that points up (or sideways to an unplaced package) in PACKAGE_ORDER."""
    rank = {name: i for i, name in enumerate(PACKAGE_ORDER)}
    problems = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            here, there = _package(module), _package(dep)
            if here != there and rank.get(there, len(rank)) >= rank.get(here, -1):
                problems.append(
                    f"{module} imports {dep}, but {there} is not below {here} in PACKAGE_ORDER: move what it "
                    f"needs down into {here} or a lower package (a re-export from the lower home keeps the old "
                    f"import path), or, if {here} really sits above {there}, change PACKAGE_ORDER and "
                    f"docs/architecture.md together"
                )
    return problems


def test_every_package_has_a_place_in_the_order():
    """A new package or top-level module must be placed in PACKAGE_ORDER (and the layers picture)."""
    assert sorted({_package(m) for m in MODULES} - set(PACKAGE_ORDER)) == []
    assert sorted(set(PACKAGE_ORDER) - {_package(m) for m in MODULES}) == []


def test_between_packages_every_import_points_down():
    """No package imports one above it: the package graph follows PACKAGE_ORDER, so it has no cycle."""
    assert _back_arrows(GRAPH) == [], "\n".join(_back_arrows(GRAPH))


def test_a_back_arrow_is_named_with_its_module_and_import():
    """The check would catch an engine import in rollout/ (the arrow this order removed) and say where."""
    (problem,) = _back_arrows({"rlhf_cli.rollout.unwrap": {"rlhf_cli.ppo.sharding", "rlhf_cli.errors"}})
    assert problem.startswith("rlhf_cli.rollout.unwrap imports rlhf_cli.ppo.sharding, but ppo is not below rollout")


def _modules_loaded_by(argv: list[str], cwd: Path) -> tuple[int, set[str]]:
    code = (
        "import sys\nfrom rlhf_cli.cli import main\nrc = main(%r)\n"
        "print('\\nLOADED', rc, ' '.join(sorted(m for m in sys.modules if '.' not in m)))" % argv
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADED"))
    _, rc, *modules = line.split()
    return int(rc), set(modules)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "ppo.cliprnage=0.1"],  # misspelt key
        ["train", "ppo.cliprange=0"],  # out of range
        ["train", "ppo.kl_penalty=forward"],  # not a choice
        ["train", "generation.samples_per_prompt=3"],  # a group size the batch does not hold
        ["train", "ppo.advantage_estimator=grpo"],  # an estimator that needs groups, without them
        ["train", "dataset.source=files", "dataset.data_files=[no_such_prompts.jsonl]"],  # a missing data file
        ["train", "reward=callable", "reward.function=no_such_module_xyz:score"],  # an unimportable reward
    ],
    ids=["help", "misspelt-key", "range", "choice", "group-size", "estimator-group", "data-file", "reward-module"],
)
def test_help_and_config_errors_import_no_torch(argv, tmp_path):
    """Mistakes that need no model are reported before torch, transformers or accelerate load."""
    rc, modules = _modules_loaded_by(argv, tmp_path)
    assert rc == (0 if argv == ["--help"] else 2)
    assert not modules & {"torch", "transformers", "accelerate"}
    assert list(tmp_path.iterdir()) == []  # and nothing was written
