"""Registering the schema and the recipes in Hydra's ConfigStore.

train.yaml lists ``rlhf_train_schema`` first in its defaults list, so everything merged after it (group
options, recipes, command-line overrides) is checked against :class:`TrainConfig`.

Recipes are registered from their YAML files under group ``recipe`` with package ``_global_``. This
makes ``+recipe=NAME`` work from any working directory and in both layouts (wheel and checkout),
without putting the recipes folder on Hydra's search path, which would need a ``recipe/`` subfolder.
"""

from __future__ import annotations

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rlhf_cli.config.paths import group_options, recipe_files, reward_recipe_files
from rlhf_cli.config.reward_schema import RewardRunConfig
from rlhf_cli.config.schema import TrainConfig
from rlhf_cli.errors import ConfigError

SCHEMA_NAME = "rlhf_train_schema"
REWARD_SCHEMA_NAME = "rlhf_reward_schema"
RECIPE_GROUP = "recipe"
# Primary config name -> its schema (configs/<name>.yaml lists the schema first in its defaults).
SCHEMAS = {"train": TrainConfig, "reward": RewardRunConfig}


def schema_of(command: str) -> type:
    """The schema ``rlhf COMMAND``'s config ("train" or "reward") is checked against (train's for
    any other name)."""
    return SCHEMAS.get(command, TrainConfig)


# The config groups `rlhf reward` composes (the others are `rlhf train`'s).
REWARD_GROUPS = ("model", "data")


def _config_groups_help(command: str = "train") -> str:
    """The "group: options" lines of ``rlhf train --help`` (``rlhf reward --help`` with ``command``
    "reward"). Hydra's own $APP_CONFIG_GROUPS would also list configs/accelerate/, which holds
    `accelerate launch --config_file` files, not a group, and the other command's groups."""
    reward = command == "reward"
    groups = {name: options for name, options in group_options().items() if (name in REWARD_GROUPS) == reward or name == "model"}
    groups[RECIPE_GROUP] = list(reward_recipe_files() if reward else recipe_files())
    return "\n".join(f"{name}: {', '.join(options)}" for name, options in sorted(groups.items()))


def register_configs() -> None:
    """Store the schema and every recipe (idempotent: storing again replaces the same entries),
    and the ``${rlhf_config_groups:}`` resolver used by the help template."""
    if not OmegaConf.has_resolver("rlhf_config_groups"):
        OmegaConf.register_new_resolver("rlhf_config_groups", _config_groups_help)
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=TrainConfig)
    store.store(name=REWARD_SCHEMA_NAME, node=RewardRunConfig)
    # `rlhf reward`'s recipes (recipes/reward/) share the group: their names differ from train's.
    for name, path in {**recipe_files(), **reward_recipe_files()}.items():
        try:
            node = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise ConfigError(f"The recipe file {path} is not valid YAML: {' '.join(str(err).split())}") from err
        store.store(group=RECIPE_GROUP, name=name, node=node, package="_global_")
