"""Turning Hydra's and OmegaConf's composition errors into one-paragraph ConfigErrors.

Each message names the offending key or option, where it came from (a command-line override or a
YAML file), the valid keys or options, and the closest match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from rlhf_cli.config.introspect import describe_type, hint_at, join_key, keys_at, split_key
from rlhf_cli.config.paths import config_dir, recipe_files
from rlhf_cli.config.store import schema_of
from rlhf_cli.config.suggest import did_you_mean, unknown_key_error
from rlhf_cli.errors import ConfigError

_IN_CONFIG = re.compile(r"^In '([^']+)':")
_COULD_NOT_OVERRIDE = re.compile(r"Could not (?:override|append to config\. An item is already at) '([^']+)'")
_MERGING_OVERRIDE = re.compile(r"Error merging override (.+)$", re.MULTILINE)
_COULD_NOT_FIND = re.compile(r"Could not (?:find|load) '([^']+)'")


def check_command(command: str) -> str:
    """The sentence that ends a message about ``rlhf COMMAND``'s config."""
    return f"Run `rlhf {command} --cfg job` to see the composed config."


def one_paragraph(text: str) -> str:
    """Collapse whitespace and line breaks into single spaces."""
    return " ".join(str(text).split())


def explain(
    err: BaseException,
    overrides: Sequence[str] = (),
    config_dirs: Sequence[str | Path] = (),
    list_length: Callable[[str], int | None] | None = None,
    command: str = "train",
) -> ConfigError:
    """The ConfigError a user should see for a composition error ``err`` (Hydra or OmegaConf).

    ``overrides``: the command line's overrides (to name the offending one); ``config_dirs``: the
    directories configs were read from (to name the offending file; default: the packaged configs);
    ``list_length``: how many items the list at a dotted key has without the command line's overrides
    of it (to say so when an index is past its end); ``command``: the subcommand whose config it is
    (``rlhf COMMAND --cfg job`` shows it; its schema lists the valid keys).
    """
    config_dirs = tuple(Path(d) for d in config_dirs) or (config_dir(),)
    if isinstance(err, ConfigError):
        return err
    if isinstance(err, MissingConfigException):
        return _missing_option(err, overrides, config_dirs)
    if isinstance(err, OverrideParseException):
        return parse_error(err)
    if str(err).startswith("Ambiguous value for argument"):
        return ConfigError(one_paragraph(err))
    cause = _omegaconf_cause(err)
    where = _where(err, overrides, config_dirs)
    if isinstance(cause, MissingMandatoryValue):
        key = cause.full_key or str(cause.key)
        return ConfigError(
            f"The config value '{key}' is required but not set (??? in the config){where}. "
            f"Give it on the command line: {key}=..."
        )
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return unknown_key_error(_key_in_list_item(err, cause.full_key, overrides, command), where, command)
    if isinstance(cause, ValidationError) and cause.full_key:
        past_end = _index_past_end(cause, where, list_length, command)
        return past_end or _wrong_type(cause, where, command)
    if isinstance(cause, InterpolationResolutionError):
        key = f" of '{cause.full_key}'" if cause.full_key else ""
        return ConfigError(
            f"Cannot resolve the interpolation{key}{where}: {_first_line(cause)}. Check the ${{...}} "
            f"reference (keys are absolute, e.g. ${{model.name_or_path}}). {check_command(command)}"
        )
    detail = one_paragraph(err)
    if cause is not None and cause is not err:
        detail += " " + _first_line(cause)
    return ConfigError(f"Invalid configuration{where}: {detail.rstrip('.')}. {check_command(command)}")


def _key_in_list_item(err: BaseException, full_key: str, overrides: Sequence[str], command: str) -> str:
    """The full key of an unknown key inside a list of sections given on the command line.

    OmegaConf names only the key itself ('wieght') when a list such as
    ``reward.components=[{type: vader, wieght: 1.0}]`` is merged; this finds the item that holds it:
    ``reward.components.0.wieght``. Other keys are returned unchanged.
    """
    found = _COULD_NOT_OVERRIDE.search(str(err))
    if not found or "." in full_key:
        return full_key
    list_key = found.group(1)
    line = next((o for o in overrides if o.lstrip("+").split("=", 1)[0] == list_key), None)
    if line is None or keys_at(split_key(list_key) + ["0"], schema_of(command)) is None:
        return full_key  # not a list of sections
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(line).value()
    except (HydraException, ValueError):  # it parsed once already; if not now, keep OmegaConf's key
        return full_key
    items = value if isinstance(value, list) else []
    index = next((i for i, item in enumerate(items) if isinstance(item, dict) and full_key in item), None)
    return full_key if index is None else join_key(split_key(list_key) + [str(index), full_key])


def _index_past_end(
    err: ValidationError, where: str, list_length: Callable[[str], int | None] | None, command: str
) -> ConfigError | None:
    """The error for ``reward.components.5.weight=1.0`` when the list has fewer items: how many there are."""
    parts = split_key(err.full_key)
    if not parts or not parts[-1].isdigit() or err.value not in ({}, None) or list_length is None:
        return None
    list_key, index = join_key(parts[:-1]), int(parts[-1])
    if keys_at(parts, schema_of(command)) is None:  # the items are not sections: an ordinary type error
        return None
    length = list_length(list_key)
    if length is None or index < length:
        return None
    noun = parts[-2] if length != 1 else parts[-2].removesuffix("s")  # "2 components", "1 component"
    if length:
        valid = f"indices 0 to {length - 1}" if length > 1 else "index 0"
        have = f"there {'are' if length > 1 else 'is'} {length} {noun} ({valid})"
    else:
        have = f"there are no {noun} ('{list_key}' is empty)"
    return ConfigError(
        f"No item {index} in '{list_key}'{where}: {have}. Use an index in range, or give the whole list: "
        f"{list_key}='[{{...}}, {{...}}]'. {check_command(command)}"
    )


def parse_error(err: BaseException, line: str | None = None) -> ConfigError:
    """The error for an override Hydra's grammar rejects."""
    what = f" '{line}'" if line else ""
    return ConfigError(
        f"Cannot parse the command-line override{what}: {_first_line(err)}. Overrides look like key=value, "
        "group=option, +key=value (add a key) or ~key (delete a key); quote values that contain spaces, "
        "commas or '=' (key='a=b')."
    )


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "msg", None) or err)
    return one_paragraph(text.splitlines()[0] if text else type(err).__name__)


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error behind ``err`` (itself, its __cause__ or __context__)."""
    for candidate in (err, err.__cause__, err.__context__):
        if isinstance(candidate, OmegaConfBaseException):
            return candidate
    return None


def _where(err: BaseException, overrides: Sequence[str], config_dirs: Sequence[Path]) -> str:
    """' in the command-line override 'x=1'', ' in configs/model/x.yaml', or ''."""
    text = str(err)
    found = _IN_CONFIG.search(text)
    if found:
        return f" in {describe_config_file(found.group(1), config_dirs)}"
    found = _MERGING_OVERRIDE.search(text)
    if found:
        return f" in the command-line override '{found.group(1).strip()}'"
    found = _COULD_NOT_OVERRIDE.search(text)
    if found:
        key = found.group(1)
        line = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        return f" in the command-line override '{line}'" if line else " on the command line"
    return ""


def describe_config_file(config_path: str, config_dirs: Sequence[Path]) -> str:
    """'model/bad' -> the YAML file it was read from (the first of ``config_dirs`` holding it), or the recipe's file."""
    group, _, name = config_path.rpartition("/")
    if group == "recipe" and name in recipe_files():
        return f"the recipe file {recipe_files()[name]}"
    for directory in config_dirs:
        candidate = directory / f"{config_path}.yaml"
        if candidate.is_file():
            return f"the config file {candidate}"
    return f"the config '{config_path}'"


def _wrong_type(err: ValidationError, where: str, command: str) -> ConfigError:
    key = join_key(split_key(err.full_key))
    hint = hint_at(split_key(key), schema_of(command))
    expected = f"expected {describe_type(hint)}" if hint is not None else "the value does not fit the schema"
    if err.value is None and "is not Optional" in str(err.msg):
        got = "got null, which this key does not accept"
    elif err.value is not None:
        got = f"got '{err.value}'"
    else:
        got = _first_line(err)
    return ConfigError(
        f"Wrong type for '{key}'{where}: {expected}, {got}. Change the value (e.g. {key}=<{_example(hint)}>)."
    )


def _example(hint: object) -> str:
    words = describe_type(hint)
    for kind, example in (("integer", "integer"), ("number", "number"), ("true or false", "true|false"),
                          ("list", "[a,b]"), ("string", "text")):
        if kind in words:
            return example
    return "value"


def _missing_option(err: MissingConfigException, overrides: Sequence[str], config_dirs: Sequence[Path]) -> ConfigError:
    text = str(err)
    found = _COULD_NOT_FIND.search(text)
    options = list(err.options or [])
    if not found or not options:
        return ConfigError(f"{one_paragraph(text.split('Config search path')[0])}")
    group, _, option = found.group(1).rpartition("/")
    origin = _IN_CONFIG.search(text)
    origin_config = origin.group(1) if origin else ""
    line = next((o for o in overrides if re.fullmatch(rf"\+*{re.escape(group)}=.*", o)), None)
    if line:
        where = f" (from the command-line override '{line}')"
    elif origin_config and origin_config != "train":
        where = f" (from {describe_config_file(origin_config, config_dirs)})"
    else:
        where = ""
    if group == "recipe":
        return ConfigError(
            f"Unknown recipe '{option}'{where}. Available recipes: {', '.join(options)}."
            + did_you_mean(option, options)
            + " `rlhf recipes` describes them; use one as +recipe=NAME."
        )
    return ConfigError(
        f"Unknown {group} option '{option}'{where}. Available {group} options: {', '.join(options)}."
        + did_you_mean(option, options)
        + f" Pick one with {group}=NAME, or add your own YAML file under {group}/ in a --config-dir directory."
    )
