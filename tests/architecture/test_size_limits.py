"""Small enough to read: no function over 50 lines and no module over 400 lines in rlhf_cli, and the
trainer's ``step()`` with every stage it calls in one file."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import rlhf_cli

PACKAGE = Path(rlhf_cli.__file__).parent
MAX_FUNCTION_LINES = 50
MAX_MODULE_LINES = 400


def _sources() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE.parent)): path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_over_400_lines():
    long = {name: len(text.splitlines()) for name, text in _sources().items() if len(text.splitlines()) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_over_50_lines():
    long = {}
    for name, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # decorators aside, docstring included
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}:{node.name}"] = length
    assert long == {}


def test_the_step_and_its_stages_are_methods_of_the_engine_in_one_file():
    """Reading step() means reading one file: every method it calls is the engine's own, defined there."""
    from rlhf_cli.ppo.engine import PPOEngine

    tree = ast.parse(textwrap.dedent(inspect.getsource(PPOEngine.step)))
    called = {node.attr for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    stages = {name for name in called if callable(getattr(PPOEngine, name, None))}
    assert {"_gather_batch", "_process_scores", "_pack", "_score_global_batch", "_rewards", "compute_advantages",
            "_optimise", "_step_stats", "_finish_step"} <= stages
    engine_file = inspect.getsourcefile(PPOEngine)
    assert all(inspect.getsourcefile(getattr(PPOEngine, name)) == engine_file for name in stages)
    # the overridable hooks are the engine's, not the TRL layer's
    assert inspect.getsourcefile(PPOEngine.compute_rewards) == engine_file
