"""A user's Python function as the reward: ``"package.module:function"`` or ``"path/to/file.py:function"``.

The function is called as ``fn(prompts, responses, **kwargs)`` and returns one number per sample
(see :mod:`rlhf_cli.rewards.examples`). A file path is loaded by path, so it needs no package and
no ``sys.path`` entry; relative paths are relative to the working directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
from typing import Any, Callable, Mapping, Optional, Sequence

from rlhf_cli.errors import RewardError

_MISSING = object()
SPEC_FORMS = "'package.module:function' or 'path/to/file.py:function'"


class CallableReward:
    """Calls the function named by ``spec`` with ``(prompts, responses, **kwargs)``.

    ``config_prefix`` is the config node the arguments came from (``reward`` or
    ``reward.components[i]``), named in error messages.
    """

    def __init__(self, spec: str, kwargs: Optional[Mapping[str, Any]] = None, config_prefix: str = "reward") -> None:
        self.spec = spec
        self.kwargs = dict(kwargs or {})
        self.fn = load_callable(spec, config_key=f"{config_prefix}.function")
        _check_call_signature(self.fn, self.kwargs, spec, config_prefix)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]:
        return self.fn(prompts, responses, **self.kwargs)

    def __repr__(self) -> str:
        return f"callable({self.spec})"


def load_callable(spec: str, config_key: str = "reward.function") -> Callable[..., Any]:
    """The callable named by ``spec``; anything unresolvable is a RewardError naming ``config_key``."""
    target, _, attribute = str(spec).rpartition(":")
    if not target or not attribute:
        raise RewardError(f"{config_key}={spec} must have the form {SPEC_FORMS}.")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _module_from_file(target, spec, config_key)
    else:
        module = _module_from_import(target, spec, config_key)
    fn: Any = module
    for part in attribute.split("."):  # "module:Class.method" walks attributes
        fn = getattr(fn, part, _MISSING)
        if fn is _MISSING:
            raise RewardError(
                f"{config_key}={spec}: module '{target}' has no function '{attribute}'; functions it has: "
                f"{', '.join(_public_functions(module)) or '(none)'}. Fix the name after the colon."
            )
    if not callable(fn):
        raise RewardError(
            f"{config_key}={spec}: '{attribute}' in '{target}' is a {type(fn).__name__}, not a function. "
            f"Point it at a function taking (prompts, responses, **kwargs)."
        )
    return fn


def _module_from_file(target: str, spec: str, config_key: str) -> types.ModuleType:
    path = os.path.abspath(os.path.expanduser(target))
    if not os.path.isfile(path):
        raise RewardError(
            f"{config_key}={spec}: the file '{target}' does not exist (resolved to {path}; relative paths "
            f"are relative to {os.getcwd()}). Fix the path before the colon."
        )
    # A unique module name per file path, so two reward files both called rewards.py do not collide.
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"rlhf_cli_user_reward_{stem}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"{config_key}={spec}: '{path}' cannot be loaded as a Python module; it must be a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # registered first, as a normal import does (dataclasses, pickling need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise RewardError(
            f"{config_key}={spec}: running the file '{path}' raised {type(err).__name__}: {err}. Fix the error in that file."
        ) from err
    return module


def _module_from_import(target: str, spec: str, config_key: str) -> types.ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name is None or not (target == err.name or target.startswith(err.name + ".")):
            raise _import_failure(target, spec, config_key, err) from err
        local_file = os.path.join(*target.split(".")) + ".py"
        hint = (
            f" A file {local_file} exists here: name it by path instead ({config_key}=./{local_file}:{spec.rpartition(':')[2]})."
            if os.path.isfile(local_file)
            else " Check the spelling, install the package, or name a file by path (path/to/file.py:function)."
        )
        raise RewardError(f"{config_key}={spec}: there is no module named '{err.name}'.{hint}") from err
    except Exception as err:
        raise _import_failure(target, spec, config_key, err) from err


def _import_failure(target: str, spec: str, config_key: str, err: BaseException) -> RewardError:
    return RewardError(
        f"{config_key}={spec}: importing module '{target}' raised {type(err).__name__}: {err}. Fix the error in that module."
    )


def _public_functions(module: types.ModuleType) -> list[str]:
    """Public functions defined in ``module`` itself (not the ones it imported)."""
    return sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__
    )


def _check_call_signature(fn: Callable[..., Any], kwargs: dict, spec: str, prefix: str) -> None:
    """Fail at build time, not at the first step, if ``fn(prompts, responses, **kwargs)`` cannot bind."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and some C callables expose no signature; the first call will tell
    try:
        signature.bind([], [], **kwargs)
    except TypeError as err:
        raise RewardError(
            f"{prefix}.function={spec} cannot be called as fn(prompts, responses, **{prefix}.kwargs) with "
            f"kwargs {kwargs}: {err}. Its signature is {fn.__name__ if inspect.isfunction(fn) else 'fn'}{signature}; "
            f"change {prefix}.kwargs or the function."
        ) from err
