"""Every rule a combination of PPO settings must satisfy, in one checking function, phrased for its caller.

:func:`check_settings` is called by the command line (``config/validate.py``: keys ``ppo.NAME`` and
global sizes over the launch's processes) and by the library (``PPOSettings``, TRL's ``PPOConfig``:
field names, sizes per process). Ranges and enumerations come from the metadata of the
:class:`~rlhf_cli.ppo.settings.PPOSettings` fields (:func:`out_of_range` reads them, for the command
line's other groups too); the cross-field rules are written below, once: sizes and their divisibility,
groups of responses per step and per process, what the advantage estimator needs, precision against
mixed precision, score normalisation against score scaling, and what FSDP2 sharding does not cover
(LoRA, Accelerate's autocast).

Torch-free, so the command line can refuse a bad combination before it imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from rlhf_cli.algo.names import AUTO_PRECISION, estimator_named, estimators_without_groups
from rlhf_cli.ppo.settings import default_mini_batch_size, settings_fields

# The group size suggested when an estimator needs groups (a common choice of GRPO/RLOO setups).
SUGGESTED_GROUP = 4
# Sizes that are global on the command line and per process in the library.
GLOBAL_SIZES = ("batch_size", "mini_batch_size", "forward_batch_size")


class SettingsError(ValueError):
    """A refusal of a settings combination: one paragraph naming the values and the fix."""


@dataclass(frozen=True)
class Phrasing:
    """How a refusal names things for its caller."""

    keys: Mapping[str, str] = field(default_factory=dict)  # field -> its name for the caller
    prefix: str = ""  # put before a field not in ``keys``
    subject: str = "PPOConfig."  # put before a field that starts a range refusal
    processes: int = 1  # sizes are split over this many processes (1: they are per process already)
    booleans: tuple[str, str] = ("False", "True")
    # Whether the caller takes command-line-only values (ppo.precision=auto, resolved before the engine).
    command_line: bool = False
    mixed_precision_key: str = "accelerator_kwargs['mixed_precision']"
    mixed_precision_source: str = ""  # where the mixed-precision mode was set (command line)
    peft: str = "a PEFT model (is_peft_model)"  # how the caller names a LoRA/PEFT policy
    sharding_source: str = ""  # where FSDP2 was chosen, when not by the sharding setting (the launcher's config)

    def key(self, name: str) -> str:
        return self.keys.get(name, self.prefix + name)

    def setting(self, name: str, value: Any) -> str:
        """``key=value`` as the caller writes it."""
        if isinstance(value, bool):
            value = self.booleans[value]
        return f"{self.key(name)}={value}"


LIBRARY = Phrasing()  # TRL's PPOConfig
ENGINE = Phrasing(subject="PPOSettings.")  # the engine's own settings


def command_line(processes: int, mixed_precision_source: str = "", sharding_source: str = "") -> Phrasing:
    """The command line's phrasing: ``ppo.NAME`` keys (others where the engine setting lives in
    another group), sizes global over ``processes``."""
    keys = {"samples_per_prompt": "generation.samples_per_prompt", "seed": "seed",
            "gradient_checkpointing": "model.gradient_checkpointing"}
    return Phrasing(keys=keys, prefix="ppo.", subject="ppo.", processes=processes, booleans=("false", "true"), command_line=True,
                    mixed_precision_key="ppo.mixed_precision", mixed_precision_source=mixed_precision_source,
                    peft="model.lora.enabled=true", sharding_source=sharding_source)


def command_line_limits(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """A field's limits as the command line applies them: its ``command_line_choices`` (values the
    command line resolves before building the engine, e.g. precision ``auto``) replace its ``choices``."""
    if "command_line_choices" not in meta:
        return meta
    return {**{k: v for k, v in meta.items() if k != "command_line_choices"}, "choices": meta["command_line_choices"]}


def out_of_range(value: Any, meta: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with ``value`` under a field's ``choices``/``ge``/``gt``/``le`` metadata
    (e.g. "must be greater than 0"), or None when it is allowed. None values are always allowed."""
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}"
    bounds = (("ge", lambda v, b: v >= b, "at least"), ("gt", lambda v, b: v > b, "greater than"),
              ("le", lambda v, b: v <= b, "at most"))
    for name, ok, words in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            return f"must be {words} {bound}"
    return None


def check_settings(values: Mapping[str, Any], phrasing: Phrasing = LIBRARY) -> None:
    """SettingsError for the first rule ``values`` break. ``values`` holds every PPOSettings field
    (sizes global over ``phrasing.processes``) and optionally ``mixed_precision`` (Accelerate's mode) and
    ``peft_model`` (whether the policy is a LoRA/PEFT model; None: not known yet)."""
    # In the order a user meets them: a mini-batch above the batch first (the plainest), then the
    # groups in global numbers, then the per-process and accumulation sizes.
    _check_ranges(values, phrasing)
    _check_mini_batch_within_batch(values, phrasing)
    _check_groups(values, phrasing)
    _check_sizes(values, phrasing)
    _check_precision(values, phrasing)
    if values["use_score_norm"] and not values["use_score_scaling"]:
        raise SettingsError(
            f"{phrasing.setting('use_score_norm', True)} needs {phrasing.setting('use_score_scaling', True)}: "
            "normalisation uses the running moments that score scaling keeps."
        )
    _check_sharding(values, phrasing)


def _check_ranges(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    """Types the library cannot rely on a schema for, then every field's range or choices."""
    for f in settings_fields():
        value = values[f.name]
        if f.type in ("int", "Optional[int]") and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingsError(f"{phrasing.subject}{f.name} must be an integer, got {value!r}.")
        problem = out_of_range(value, command_line_limits(f.metadata) if phrasing.command_line else f.metadata)
        if problem is not None:
            raise SettingsError(f"{phrasing.subject}{f.name} {problem}, got {value!r}.")


def _resolved_mini_batch(values: Mapping[str, Any]) -> int:
    mini = values["mini_batch_size"]
    return mini if mini is not None else default_mini_batch_size(values["batch_size"])


def _check_mini_batch_within_batch(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    k, batch, mini = phrasing.key, values["batch_size"], _resolved_mini_batch(values)
    if mini > batch:
        raise SettingsError(
            f"'{k('mini_batch_size')}' ({mini}) is larger than '{k('batch_size')}' ({batch}): a mini-batch is a slice "
            f"of the batch. Lower {k('mini_batch_size')} or raise {k('batch_size')}."
        )


def _check_split_over_processes(values: Mapping[str, Any], phrasing: Phrasing, names: tuple[str, ...]) -> None:
    processes = phrasing.processes
    for name in names:
        size = values[name]
        if size is not None and size % processes != 0:
            raise SettingsError(
                f"{phrasing.key(name)}={size} is not divisible by the {processes} processes of this launch; "
                f"choose a multiple of {processes} (each process takes an equal share)."
            )


def _check_sizes(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    """Every size split evenly over the processes; a mini-batch times accumulation divides the batch."""
    k = phrasing.key
    _check_split_over_processes(values, phrasing, GLOBAL_SIZES)
    batch, accumulation, mini = values["batch_size"], values["gradient_accumulation_steps"], _resolved_mini_batch(values)
    if batch % (mini * accumulation) != 0:
        raise SettingsError(
            f"{k('batch_size')}={batch} is not divisible by {k('mini_batch_size')} × "
            f"{k('gradient_accumulation_steps')} = {mini} × {accumulation} = {mini * accumulation}. Choose a "
            f"{k('mini_batch_size')} and {k('gradient_accumulation_steps')} whose product divides {k('batch_size')}."
        )


def _check_groups(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    """Groups of samples_per_prompt responses fit the estimator, and sit whole in one step on one process."""
    k, processes = phrasing.key, phrasing.processes
    group, batch, estimator = values["samples_per_prompt"], values["batch_size"], values["advantage_estimator"]
    needed = estimator_named(estimator).min_group_size
    if group < needed:
        suggested = max(needed, SUGGESTED_GROUP)
        raise SettingsError(
            f"{phrasing.setting('advantage_estimator', estimator)} compares the responses of each prompt with "
            f"each other, but {phrasing.setting('samples_per_prompt', group)}: a group of one has no spread "
            f"(every advantage would be 0 or undefined). Set {phrasing.setting('samples_per_prompt', suggested)} "
            f"({k('batch_size')} counts responses, so each step then takes {k('batch_size')} / {suggested} "
            "prompts), or use an estimator that needs no group: "
            + " or ".join(phrasing.setting("advantage_estimator", name) for name in estimators_without_groups()) + "."
        )
    if batch % group != 0:
        raise SettingsError(
            f"{k('batch_size')}={batch} counts responses and is not divisible by {k('samples_per_prompt')}={group}: "
            f"each prompt's {group} responses must be in the same step. Choose a {k('batch_size')} that is a "
            f"multiple of {group} ({_example_batch(values, group, phrasing)}), or another {k('samples_per_prompt')}."
        )
    _check_split_over_processes(values, phrasing, ("batch_size",))
    local = batch // processes
    if local % group != 0:
        factor = processes * group
        raise SettingsError(
            f"{k('batch_size')}={batch} over the {processes} processes of this launch gives {local} responses per "
            f"process, which is not divisible by {k('samples_per_prompt')}={group}: a prompt's group of {group} "
            f"responses would straddle two processes. Choose a {k('batch_size')} that is a multiple of "
            f"{processes} x {group} = {factor} ({_example_batch(values, factor, phrasing)}), or another "
            f"{k('samples_per_prompt')}."
        )


def _example_batch(values: Mapping[str, Any], factor: int, phrasing: Phrasing) -> str:
    """"e.g. N" for a batch size near the user's that ``factor`` divides and, so that the fix does not
    run into the next check, the mini-batch size too (a null one is derived from the batch)."""
    mini = values["mini_batch_size"]
    step = factor if mini is None else math.lcm(factor, int(mini))
    example = step * max(1, (int(values["batch_size"]) + step // 2) // step)  # nearest multiple, larger on a tie
    return f"e.g. {example}" if step == factor else f"e.g. {example}, which {phrasing.setting('mini_batch_size', mini)} divides too"


def _check_precision(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    """bf16 weights already compute in bfloat16: Accelerate's autocast on top is refused, and so is
    ``auto`` with it (auto picks bf16 wherever bfloat16 is fast, so the pair would clash there)."""
    mode, precision = values.get("mixed_precision"), values["precision"]
    if precision not in ("bf16", AUTO_PRECISION) or mode in (None, "no"):
        return
    key, mp = phrasing.key("precision"), phrasing.mixed_precision_key
    source = phrasing.mixed_precision_source or f"{mp}={mode}"
    what = ("already computes in bfloat16 (bfloat16 weights, float32 master weights)" if precision == "bf16" else
            "computes in bfloat16 (bfloat16 weights, float32 master weights) on a device with fast bfloat16")
    raise SettingsError(
        f"{key}={precision} {what}, and {source} would add Accelerate's autocast on top. Use one of them: "
        f"{key}={precision} with {mp}=no, or {key}=fp32 with {mp}=bf16."
    )


def _check_sharding(values: Mapping[str, Any], phrasing: Phrasing) -> None:
    """What FSDP2 does not cover yet: a LoRA/PEFT policy, and Accelerate's autocast (FSDP2 has its own
    mixed-precision policy, chosen with the precision setting)."""
    if values["sharding"] != "fsdp2":
        return
    source = phrasing.sharding_source or phrasing.setting("sharding", "fsdp2")
    # Chosen by the launcher's FSDP config, the setting cannot turn it off.
    unsharded = "a launch without Accelerate's FSDP config" if phrasing.sharding_source else phrasing.setting("sharding", "none")
    if values.get("peft_model"):
        raise SettingsError(
            f"{source} with {phrasing.peft} is not supported yet: the reference would be the sharded policy with "
            f"its adapter disabled, which rlhf_cli has not verified under FSDP2. Use LoRA without sharding "
            f"({unsharded}: the adapter is small, the base weights are frozen), or FSDP2 without LoRA."
        )
    mode = values.get("mixed_precision")
    if mode not in (None, "no"):
        key, mp = phrasing.key("precision"), phrasing.mixed_precision_key
        where = phrasing.mixed_precision_source or f"{mp}={mode}"
        raise SettingsError(
            f"{source} with {where}: under FSDP2, bfloat16 compute is FSDP2's own mixed-precision policy "
            f"(bfloat16 parameters in forward and backward, float32 gradient reduction and master weights), chosen "
            f"with {key}=bf16. Use {key}=bf16 with {mp}=no."
        )
