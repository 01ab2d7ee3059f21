"""Rollout: packing queries/responses into model inputs and batched generation."""

from rlhf_cli.rollout.generation import cut_at_eos, generate_responses
from rlhf_cli.rollout.packing import PackedBatch, pack_batch

__all__ = ["PackedBatch", "cut_at_eos", "generate_responses", "pack_batch"]
