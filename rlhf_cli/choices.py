"""Enumerations the command line's schema shares with the builders below it: torch-free, importing nothing.

``rlhf_cli.models`` and ``rlhf_cli.rewards`` build what a config names and sit below the command line,
so they cannot read these from its schema (:mod:`rlhf_cli.config.schema`, which imports them from
here to declare its fields' choices). The names the math answers to are in :mod:`rlhf_cli.algo.names`.
"""

from __future__ import annotations

# Weights a model loads in: torch dtype names, or "auto" (the checkpoint's); models.builder maps them.
DTYPES = ("float32", "bfloat16", "float16", "auto")
# The reward sources rlhf_cli.rewards.factory builds, and the composite that sums them.
REWARD_SOURCE_TYPES = ("vader", "classifier", "callable", "learned")
REWARD_TYPES = REWARD_SOURCE_TYPES + ("weighted_sum",)
