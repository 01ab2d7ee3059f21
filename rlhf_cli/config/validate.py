"""Checks the schema's types cannot express: enumerations, ranges, required-by-choice values.

Runs right after composition, before anything loads, and raises one :class:`ConfigError` paragraph that
names the key, the bad value, the valid values and the closest match.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf_cli.config.engine_settings import check_engine_settings
from rlhf_cli.config.introspect import join_key
from rlhf_cli.config.launch import launch_processes
from rlhf_cli.config.schema import TrainConfig
from rlhf_cli.config.store import schema_of
from rlhf_cli.config.suggest import did_you_mean, unknown_key_error
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo.rules import out_of_range

# Keys a composed config may hold besides the schema's: Hydra's own node (present before the job starts).
_ROOT_EXTRAS = ("hydra",)


def validate(cfg: DictConfig, *, require_complete: bool = True, command: str = "train") -> None:
    """Raise ConfigError for the first invalid value of a composed config of ``rlhf COMMAND``
    ("train" or "reward": its schema, and the command its messages name).

    ``require_complete``: also demand the values the chosen options need (``???`` placeholders filled,
    model.name_or_path for pretrained models, reward.model for classifiers, ...). ``--cfg`` printing
    skips this so an incomplete config can still be inspected.
    """
    schema = schema_of(command)
    missing: list[str] = []
    _check_node(cfg, schema, [], missing, command)
    if require_complete and missing:
        raise ConfigError(
            "Missing required config value" + ("s " if len(missing) > 1 else " ")
            + ", ".join(f"'{key}'" for key in missing)
            + " (??? in the config). Give "
            + ("them" if len(missing) > 1 else "it")
            + " on the command line, e.g. "
            + " ".join(f"{key}=..." for key in missing)
            + ", or pick a config option or recipe that sets "
            + ("them." if len(missing) > 1 else "it.")
        )
    _check_consistency(cfg)
    if require_complete:
        if schema is TrainConfig:
            _check_required_by_choice(cfg)
            # Every rule of the ppo settings (sizes, groups, precision, ...), for this launch's processes.
            check_engine_settings(cfg, launch_processes())
        else:  # another command's config (rlhf reward): the sections it shares with train
            _check_model_required(cfg)


def _check_node(node: DictConfig, dc_type: type, path: list[str], missing: list[str], command: str) -> None:
    # `+key=value` force-adds keys past the schema's struct flag: catch them here.
    names = {f.name for f in dataclasses.fields(dc_type)}
    for key in node.keys():
        if key not in names and not (not path and key in _ROOT_EXTRAS):
            raise unknown_key_error(join_key(path + [str(key)]), command=command)
    for f in dataclasses.fields(dc_type):
        key_parts = path + [f.name]
        if OmegaConf.is_missing(node, f.name):
            missing.append(join_key(key_parts))
            continue
        if f.name == "output_dir" and not path and OmegaConf.is_interpolation(node, f.name):
            continue  # resolves to Hydra's run directory, only known inside a running job
        value = node[f.name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            _check_node(value, OmegaConf.get_type(value), key_parts, missing, command)
        elif isinstance(value, ListConfig):
            for index, item in enumerate(value):
                item_parts = key_parts + [str(index)]
                if isinstance(item, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(item)):
                    _check_node(item, OmegaConf.get_type(item), item_parts, missing, command)
                else:
                    _check_value(item, f.metadata, item_parts, setter=f"{join_key(key_parts)}=[...]")
        else:
            _check_value(value, f.metadata, key_parts)


def _check_value(value: Any, meta: dict, parts: list[str], setter: str | None = None) -> None:
    if value is None or not meta:
        return
    key = join_key(parts)
    setter = setter or f"{key}=<value>"
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"Invalid value '{value}' for '{key}'. Valid values: {', '.join(choices)}."
            + did_you_mean(value, choices)
            + f" Set it with {setter}."
        )
    pattern = meta.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, str(value)):
        raise ConfigError(
            f"Invalid value '{value}' for '{key}'. Valid values: {meta.get('pattern_doc', pattern)}."
            + did_you_mean(value, ("auto", "cpu", "mps", "cuda", "cuda:0"))
        )
    problem = out_of_range(value, {name: meta[name] for name in ("ge", "gt", "le") if name in meta})
    if problem is not None:
        raise ConfigError(f"Invalid value {value} for '{key}': it {problem}" + _range_hint(meta) + f". Set it with {setter}.")


def _range_hint(meta: dict) -> str:
    low = f"≥ {meta['ge']}" if "ge" in meta else (f"> {meta['gt']}" if "gt" in meta else "")
    high = f"≤ {meta['le']}" if "le" in meta else ""
    both = " and ".join(part for part in (low, high) if part)
    return f" (valid range: {both})" if low and high else ""


def _check_consistency(cfg: DictConfig) -> None:
    """Relations between keys that must hold whatever the options."""
    pairs = [
        ("dataset.prompt_min_tokens", "dataset.prompt_max_tokens"),
        ("generation.response_min_tokens", "generation.response_max_tokens"),
    ]
    for low_key, high_key in pairs:
        low, high = OmegaConf.select(cfg, low_key), OmegaConf.select(cfg, high_key)
        if low is not None and high is not None and low > high:
            raise ConfigError(
                f"'{low_key}' ({low}) is larger than '{high_key}' ({high}): the length is sampled from "
                f"[min, max], so set {low_key} <= {high_key}."
            )
    target_modules = OmegaConf.select(cfg, "model.lora.target_modules")
    if target_modules is not None and len(target_modules) == 0:
        raise ConfigError(
            "'model.lora.target_modules' is an empty list, so LoRA would adapt nothing. Name the modules, e.g. "
            "model.lora.target_modules=[c_attn] for GPT-2, or set it to null for PEFT's default for the architecture."
        )
    source, kind = OmegaConf.select(cfg, "model.source"), OmegaConf.select(cfg, "model.kind")
    if source in ("tiny_gpt2", "review_gpt2") and kind not in (None, "causal"):
        raise ConfigError(
            f"'model.kind' is '{kind}', but model.source={source} is a decoder-only (causal) GPT-2. "
            "Use model.kind=causal, or a pretrained seq2seq model (model=t5_small)."
        )
    if source == "tiny_gpt2":
        n_embd, n_head = OmegaConf.select(cfg, "model.tiny.n_embd"), OmegaConf.select(cfg, "model.tiny.n_head")
        if n_embd is not None and n_head is not None and n_embd % n_head != 0:
            raise ConfigError(
                f"'model.tiny.n_embd' ({n_embd}) is not divisible by 'model.tiny.n_head' ({n_head}): every "
                f"attention head gets n_embd / n_head dimensions. Pick sizes such as n_embd=128 n_head=4."
            )


def _check_model_required(cfg: DictConfig) -> None:
    if cfg.model.source == "pretrained" and not cfg.model.name_or_path and not cfg.model.gguf_file:
        raise ConfigError(
            "model.source is 'pretrained' but 'model.name_or_path' is empty: give the policy model with "
            "model.name_or_path=<Hub id or local directory> (or model.gguf_file=<path to a .gguf file>), "
            "or use model=tiny_gpt2 for the offline tiny model."
        )


def _check_required_by_choice(cfg: DictConfig) -> None:
    """Values that become mandatory once an option is chosen (only checked before a real run)."""
    _check_model_required(cfg)
    _check_reward_source(cfg.reward, "reward")
    for index, monitor in enumerate(cfg.reward.monitor):
        _check_reward_source(monitor, f"reward.monitor[{index}]")
    if cfg.reward.type == "weighted_sum":
        if len(cfg.reward.components) == 0:
            raise ConfigError(
                "reward.type is 'weighted_sum' but 'reward.components' is empty: list the sources to add, "
                "e.g. reward.components='[{type: vader, weight: 1.0}]' (see configs/reward/weighted_sum.yaml)."
            )
        for index, component in enumerate(cfg.reward.components):
            _check_reward_source(component, f"reward.components[{index}]")
    dataset = cfg.dataset
    if dataset.source == "hub" and not dataset.path:
        raise ConfigError(
            "dataset.source is 'hub' but 'dataset.path' is empty: give the dataset id, "
            "e.g. dataset.path=stanfordnlp/imdb, or use dataset=imdb_local for the offline reviews."
        )
    if dataset.source == "files" and len(dataset.data_files) == 0:
        raise ConfigError(
            "dataset.source is 'files' but 'dataset.data_files' is empty: give the local files, "
            "e.g. dataset.data_files='[prompts.jsonl]' (json, jsonl, csv, parquet or txt)."
        )


def _check_reward_source(source: DictConfig, key: str) -> None:
    if source.type == "classifier" and not source.model:
        raise ConfigError(
            f"{key}.type is 'classifier' but '{key}.model' is empty: give a text-classification model with "
            f"{key}.model=<Hub id or local directory>."
        )
    if source.type == "learned" and not source.model:
        raise ConfigError(
            f"{key}.type is 'learned' but '{key}.model' is empty: give the reward model with {key}.model=<the "
            f"output_dir of a `rlhf reward` run, or its final/ directory>."
        )
    if source.type == "callable" and not source.function:
        raise ConfigError(
            f"{key}.type is 'callable' but '{key}.function' is empty: give the reward function as "
            f"{key}.function=package.module:function or {key}.function=path/to/file.py:function."
        )
