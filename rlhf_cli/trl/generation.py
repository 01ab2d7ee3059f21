"""Sampling with legacy TRL 0.11's ``PPOTrainer.generate`` and ``_generate_batched`` signatures.

Both are thin layers over :func:`rlhf_cli.rollout.generation.generate_responses` (left-padded batches,
KV cache, cut after EOS); they differ, as in TRL, in how lengths are drawn: ``generate`` draws one
``max_new_tokens`` per query from ``length_sampler``, ``_generate_batched`` one per batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from rlhf_cli.rollout.generation import generate_responses
from rlhf_cli.rollout.unwrap import generation_model, synced_generation_kwargs


class TRLGenerationMixin:
    """``generate`` (optionally with the reference's responses) and ``_generate_batched``; mixed into
    :class:`~rlhf_cli.trl.trainer.PPOTrainer`."""

    # Provided by PPOTrainer.
    accelerator: Any
    model: nn.Module
    ref_model: Optional[nn.Module]
    is_encoder_decoder: bool

    def generate(
        self,
        query_tensor: Tensor | list[Tensor],
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        remove_padding: bool = True,
        generate_ref_response: bool = False,
        **generation_kwargs: Any,
    ) -> Tensor | list[Tensor] | tuple[Tensor | list[Tensor], Tensor | list[Tensor]]:
        """Generate from one query (1-D tensor -> 2-D [1, L] tensor) or a list of queries (-> list).

        A list is generated in left-padded batches of ``batch_size``; each response is cut after
        its first EOS when ``remove_padding``. ``length_sampler`` draws ``max_new_tokens`` per query.
        ``generate_ref_response=True`` returns ``(responses, ref_responses)``, the reference model
        generating with the same keyword arguments and lengths.
        """
        single = isinstance(query_tensor, Tensor)
        queries = [query_tensor] if single else list(query_tensor)
        if single and query_tensor.dim() != 1:
            raise ValueError(f"query_tensor must be 1-D token ids (or a list of them), got shape {tuple(query_tensor.shape)}.")
        generation_kwargs, pad_token_id, generate_eos = self._generation_options(generation_kwargs)
        default_budget = generation_kwargs.pop("max_new_tokens", None) or 20
        budgets = [length_sampler() for _ in queries] if length_sampler is not None else default_budget

        def sample(model: nn.Module) -> Tensor | list[Tensor]:
            responses = generate_responses(
                model,
                queries,
                max_new_tokens=budgets,
                pad_token_id=pad_token_id,
                eos_token_id=self.eos_token_id,
                is_encoder_decoder=self.is_encoder_decoder,
                batch_size=1 if single else batch_size,
                device=self.accelerator.device,
                stop_at_eos=remove_padding,
                generate_eos_token_id=generate_eos,
                **generation_kwargs,
            )
            if return_prompt and not self.is_encoder_decoder:
                responses = [torch.cat([q.cpu(), r]) for q, r in zip(queries, responses)]
            return responses[0].unsqueeze(0) if single else responses

        with generation_model(self.accelerator, self.model) as model:
            responses = sample(model)
        if not generate_ref_response:
            return responses
        with self._generation_reference() as reference:
            return responses, sample(reference)

    def _generation_options(self, generation_kwargs: dict[str, Any]) -> tuple[dict[str, Any], int, Any]:
        """(keyword arguments for generation, the pad id, the eos id ``model.generate`` stops at). As
        in TRL, a caller's ``eos_token_id`` goes to ``model.generate`` (scripts pass -1 never to stop
        early) and responses are still cut at the tokenizer's EOS."""
        kwargs = {**synced_generation_kwargs(self.accelerator), **generation_kwargs}
        pad_token_id = kwargs.pop("pad_token_id", self.pad_token_id)
        return kwargs, pad_token_id, kwargs.pop("eos_token_id", None)

    @contextlib.contextmanager
    def _generation_reference(self) -> Iterator[nn.Module]:
        """The module the reference generates with: the frozen model, or the policy with its PEFT
        adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with self._unwrapped.pretrained_model.disable_adapter(), generation_model(self.accelerator, self.model) as model:
            yield model

    def _generate_batched(
        self,
        model: nn.Module,
        query_tensors: Sequence[Tensor],
        length_sampler: Optional[Callable[[], int]] = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        pad_to_multiple_of: Optional[int] = None,
        remove_padding: bool = True,
        **generation_kwargs: Any,
    ) -> list[Tensor]:
        """TRL's batched sampling from any ``model``: left-padded batches of ``batch_size`` (query
        padding widened to a multiple of ``pad_to_multiple_of``), ``length_sampler`` drawing one
        ``max_new_tokens`` per batch, each output 1-D without padding — the prompt followed by the
        response (``return_prompt``), cut after the first EOS when ``remove_padding``."""
        budget = generation_kwargs.pop("max_new_tokens", None) or 20
        generation_kwargs, pad_token_id, generate_eos = self._generation_options(generation_kwargs)
        outputs: list[Tensor] = []
        batch_size = min(len(query_tensors), batch_size)
        for start in range(0, len(query_tensors), batch_size):
            part = list(query_tensors[start : start + batch_size])
            if length_sampler is not None:
                budget = length_sampler()
            with contextlib.ExitStack() as stack:
                unwrapped = model if model is self.ref_model else stack.enter_context(generation_model(self.accelerator, model))
                responses = generate_responses(
                    unwrapped,
                    part,
                    max_new_tokens=budget,
                    pad_token_id=pad_token_id,
                    eos_token_id=self.eos_token_id,
                    is_encoder_decoder=self.is_encoder_decoder,
                    device=self.accelerator.device,
                    stop_at_eos=remove_padding,
                    pad_to_multiple_of=pad_to_multiple_of,
                    generate_eos_token_id=generate_eos,
                    **generation_kwargs,
                )
            if return_prompt and not self.is_encoder_decoder:
                responses = [torch.cat([q.cpu(), r]) for q, r in zip(part, responses)]
            outputs.extend(responses)
        return outputs
