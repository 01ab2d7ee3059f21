"""Legacy TRL 0.11's protected ``PPOTrainer`` methods, for code that calls or overrides them.

:class:`TRLCompatMixin` gives :class:`~rlhf_cli.PPOTrainer` TRL's building blocks with TRL's
signatures, shapes and return types. Each is a thin adapter over :mod:`rlhf_cli.ppo.functional`,
:mod:`rlhf_cli.ppo.forward` and :mod:`rlhf_cli.rollout` — the same code ``step()`` runs — that only
converts layouts; none re-implements the math.

``step()`` calls :meth:`compute_rewards` (and through it :meth:`_kl_penalty`) and
:meth:`compute_advantages`, so subclasses may override them as in TRL. (With ``kl_penalty="full"``
the full-vocabulary KL is computed chunk by chunk during the forward pass, so that [B, T, V]
log-probabilities of both models never sit in memory at once; ``step()`` then uses it directly.)
``batched_forward_pass`` and ``loss`` are for callers: the step's optimisation runs its own packed
forward pass, which skips the LM head at padding positions.

Layouts: TRL's ``batched_forward_pass`` returns [B, L − 1] tensors over the concatenated query and
response, position j holding the prediction of token j + 1, with a mask over the response; the
other methods take and return response-aligned [B, T] tensors, as both libraries do.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from rlhf_cli.logging import tracker_logs
from rlhf_cli.ppo.advantages import settings_from
from rlhf_cli.ppo.config import Sizes
from rlhf_cli.ppo.dataloader import build_dataloader, is_hf_dataset, remove_unused_columns
from rlhf_cli.ppo.forward import response_outputs
from rlhf_cli.ppo.functional import (
    entropy_from_logits,
    full_kl,
    kl_penalty,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    ratio_guard,
    value_loss,
)
from rlhf_cli.ppo.inputs import check_step_inputs
from rlhf_cli.ppo.stats import TRAIN_NAMES, MiniBatchStats, RolloutStats, flatten_step_stats, reward_stats, scalar_stats
from rlhf_cli.ppo.trl_generation import TRLGenerationMixin
from rlhf_cli.rollout.packing import PackedBatch, pack_batch


class TRLCompatMixin(TRLGenerationMixin):
    """TRL 0.11's protected ``PPOTrainer`` API; mixed into :class:`~rlhf_cli.PPOTrainer`."""

    # Provided by PPOTrainer.
    config: Any
    accelerator: Any
    kl_ctl: Any
    estimator: Any  # the config's rlhf_cli.ppo.estimators.AdvantageEstimator
    reward_kl_coef: float  # β of the reward-side KL penalty (0 when the KL is not in the reward)
    model: nn.Module
    ref_model: Optional[nn.Module]
    is_encoder_decoder: bool
    is_peft_model: bool
    tokenizer: Any

    @property
    def current_device(self) -> torch.device:
        """TRL's name for the device the trainer computes on."""
        return self.accelerator.device

    @property
    def is_distributed(self) -> bool:
        return self.accelerator.num_processes > 1

    def optional_peft_ctx(self) -> Any:
        """TRL's context for reference passes: the PEFT policy's adapter disabled, else nothing."""
        return self._unwrapped.pretrained_model.disable_adapter() if self.is_peft_model else contextlib.nullcontext()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """TRL's trainer save: the policy (plain Hugging Face directory plus ``value_head.safetensors``)
        and the tokenizer, written by the main process."""
        self._save_pretrained(save_directory)

    def _save_pretrained(self, save_directory: str | os.PathLike) -> None:
        if not self.accelerator.is_main_process:
            return
        self._unwrapped.save_pretrained(save_directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    # Inputs -------------------------------------------------------------------------------------
    def prepare_dataloader(self, dataset: Any, data_collator: Optional[Callable] = None) -> torch.utils.data.DataLoader:
        """TRL's dataloader over ``dataset``: shuffled batches of ``config.batch_size``, the last
        incomplete one dropped; a ``datasets.Dataset`` loses the columns the model does not take when
        ``config.remove_unused_columns`` (see :mod:`rlhf_cli.ppo.dataloader`)."""
        if self.config.remove_unused_columns and is_hf_dataset(dataset):
            dataset = remove_unused_columns(dataset, self._unwrapped.forward)
        return build_dataloader(dataset, batch_size=self.config.batch_size, seed=self.config.seed, data_collator=data_collator)

    def _pack(self, queries: Sequence[Tensor], responses: Sequence[Tensor], response_masks: Optional[Sequence[Tensor]] = None) -> PackedBatch:
        """The packing ``step()`` uses: left-padded queries, right-padded responses, explicit positions."""
        decoder_start = getattr(self._unwrapped.config, "decoder_start_token_id", None) if self.is_encoder_decoder else None
        return pack_batch(
            queries,
            responses,
            pad_token_id=self.pad_token_id,
            is_encoder_decoder=self.is_encoder_decoder,
            decoder_start_token_id=decoder_start,
            response_masks=response_masks,
            device=self.accelerator.device,
        )

    def prepare_model_inputs(self, queries: Sequence[Tensor], responses: Sequence[Tensor]) -> dict[str, Tensor]:
        """TRL's model inputs for (query, response) pairs, as ``step()`` packs them: decoder-only
        ``input_ids``/``attention_mask``/``position_ids`` [B, Lq + T] (query left-padded, response
        right-padded); encoder-decoder ``input_ids``/``attention_mask`` and ``decoder_*``."""
        return self._pack(queries, responses).model_inputs()

    def _step_safety_checker(
        self,
        batch_size: Optional[int],
        queries: list[Tensor],
        responses: list[Tensor],
        scores: list[Tensor],
        masks: Optional[list[Tensor]] = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Optional[list[Tensor]]]:
        """TRL's input check: the checks ``step()`` runs, then everything on the trainer's device,
        scores as 0-d tensors."""
        expected = len(queries) if batch_size is None else batch_size
        queries, responses, score_tensor, masks = check_step_inputs(queries, responses, scores, masks, expected)
        device = self.accelerator.device
        return (
            [q.to(device) for q in queries],
            [r.to(device) for r in responses],
            list(score_tensor.to(device).unbind()),
            [m.to(device) for m in masks] if masks is not None else None,
        )

    # Forward passes -----------------------------------------------------------------------------
    def batched_forward_pass(
        self,
        model: nn.Module,
        queries: Sequence[Tensor],
        responses: Sequence[Tensor],
        model_inputs: dict[str, Tensor],
        return_logits: bool = False,
        response_masks: Optional[Sequence[Tensor]] = None,
    ) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        """(logprobs, logits or None, values, masks) in chunks of ``mini_batch_size``, aligned as TRL
        aligns them (decoder-only): [B, L − 1] over ``model_inputs["input_ids"]`` [B, L], position j
        predicting token j + 1, the mask set on the response's positions (times ``response_masks``);
        logits [B, L − 1, V]. Entries outside the mask are 0. Encoder-decoder models return
        response-aligned [B, T] tensors. Like TRL, puts ``model`` in eval mode; gradients flow unless
        the caller disables them.

        The numbers come from ``step()``'s own forward pass (:func:`rlhf_cli.ppo.forward.response_outputs`),
        so they do not depend on how ``model_inputs`` pads; ``model_inputs`` only gives the layout.
        """
        model.eval()
        batch = self._pack(queries, responses, response_masks)
        chunk = self.config.mini_batch_size
        parts = [response_outputs(model, batch.select(range(start, min(start + chunk, batch.batch_size))))
                 for start in range(0, batch.batch_size, chunk)]
        width = batch.response_width

        def cat(tensors: list[Tensor]) -> Tensor:
            pads = [(0, 0, 0, width - t.shape[1]) if t.dim() == 3 else (0, width - t.shape[1]) for t in tensors]
            return torch.cat([nn.functional.pad(t, pad) for t, pad in zip(tensors, pads)], dim=0)

        logprobs, values = cat([p.logprobs for p in parts]), cat([p.values for p in parts])
        logits = cat([p.logits for p in parts]) if return_logits else None
        mask = batch.response_mask
        if self.is_encoder_decoder:
            return logprobs, logits, values, mask
        columns = _trl_response_columns(queries, responses, model_inputs["attention_mask"])
        layout = dict(columns=columns, lengths=batch.response_lengths, out_width=model_inputs["input_ids"].shape[1] - 1)
        return (
            _to_trl_layout(logprobs, **layout),
            _to_trl_layout(logits, **layout) if logits is not None else None,
            _to_trl_layout(values, **layout),
            _to_trl_layout(mask, **layout),
        )

    # Rewards and advantages ---------------------------------------------------------------------
    def _kl_penalty(self, logprob: Tensor, ref_logprob: Tensor) -> Tensor:
        """Per-token KL estimate for ``config.kl_penalty``: sampled-token logprobs [B, T] for
        ``kl``/``abs``/``mse``; full log-probabilities [B, T, V] for ``full``."""
        if self.config.kl_penalty == "full":
            # full_kl log-softmaxes its inputs, which leaves log-probabilities unchanged.
            return full_kl(logprob, ref_logprob)
        return kl_penalty(logprob, ref_logprob, self.config.kl_penalty)

    def compute_rewards(
        self, scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(rewards, non-score rewards, KL) [B, T]: −β·KL per token, the score added at each row's
        last masked token. ``step()`` calls this (override it to shape rewards)."""
        kls = self._kl_penalty(logprobs, ref_logprobs)
        terms = per_token_rewards(_as_score_tensor(scores, kls.device), kls, masks, self.reward_kl_coef)
        return terms.rewards, terms.non_score_rewards, kls

    def compute_advantages(
        self, values: Optional[Tensor], rewards: Tensor, mask: Tensor
    ) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        """(values, advantages, returns) [B, T] from the config's advantage estimator. For ``gae``
        (TRL's): GAE with ``gamma``/``lam`` (``whiten_rewards`` applied), whitened advantages,
        returns = raw advantages + values; values masked as in TRL. A critic-free estimator
        (:mod:`rlhf_cli.ppo.estimators`) gets and returns no values and no returns (None).
        ``step()`` calls this."""
        result = self.estimator.estimate(rewards, values, mask, settings_from(self.config))
        if values is not None:
            values = torch.where(mask.bool(), values, torch.zeros_like(values))
        return values, result.advantages, result.returns

    # Losses and stats ---------------------------------------------------------------------------
    def loss(
        self,
        old_logprobs: Tensor,
        values: Tensor,
        logits: Tensor,
        vpreds: Tensor,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        returns: Tensor,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(policy loss, vf_coef × value loss, TRL's flat stats) over one mini-batch [B, T]: the
        losses ``step()`` optimises, zeroed (with a warning) when the mean ratio exceeds
        ``ratio_threshold``."""
        cfg = self.config
        pl = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.cliprange)
        vl = value_loss(vpreds, values, returns, mask, cfg.cliprange_value)
        if bool(pl.ratio_mean > cfg.ratio_threshold):  # host sync, as TRL's .item()
            warnings.warn(
                f"The average ratio of the batch ({float(pl.ratio_mean):.2f}) exceeds ratio_threshold "
                f"{cfg.ratio_threshold:.2f}; its loss is zeroed.",
                UserWarning,
                stacklevel=2,
            )
        pg_loss = ratio_guard(pl.loss, pl.ratio_mean, cfg.ratio_threshold)
        vf_loss = ratio_guard(vl.loss, pl.ratio_mean, cfg.ratio_threshold)
        total = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            stats = {
                "loss/policy": pg_loss.detach(),
                "loss/value": vf_loss.detach(),
                "loss/total": total.detach(),
                "policy/entropy": masked_mean(entropy_from_logits(logits.detach()), mask),
                "policy/approxkl": pl.approxkl,
                "policy/policykl": pl.policykl,
                "policy/clipfrac": pl.clipfrac,
                "policy/advantages": advantages.detach(),
                "policy/advantages_mean": masked_mean(advantages.detach(), mask),
                "policy/ratio": pl.ratio_mean,
                "returns/mean": masked_mean(returns, mask),
                "returns/var": masked_var(returns, mask),
                "val/vpred": vl.vpred_mean,
                "val/error": vl.error,
                "val/clipfrac": vl.clipfrac,
                "val/mean": masked_mean(values, mask),
                "val/var": masked_var(values, mask),
            }
        return pg_loss, cfg.vf_coef * vf_loss, stats

    def record_step_stats(self, kl_coef: float, **data: Any) -> dict[str, Any]:
        """TRL's step stats from ``scores``, ``logprobs``, ``ref_logprobs``, ``non_score_reward``,
        ``kls``, ``masks`` ([B, T]), ``queries``, ``responses`` and ``train_stats`` (TRL's flat
        names, each stacked over mini-batches), via the flattening ``step()`` uses."""
        mask, kls = data["masks"], data["kls"]
        lengths = {name: torch.tensor([float(len(x)) for x in data[name]]) for name in ("queries", "responses")}
        rollout = RolloutStats(
            kl_per_sample=(kls * mask).sum(dim=-1),
            neg_logprob_sum=(-data["logprobs"] * mask).sum(dim=-1),
            mean_non_score_reward=masked_mean(data["non_score_reward"], mask),
            scores=_as_score_tensor(data["scores"], mask.device),
            query_lengths=lengths["queries"],
            response_lengths=lengths["responses"],
            logprobs=data["logprobs"],
            ref_logprobs=data["ref_logprobs"],
        )
        train = {f"ppo/{key}": torch.as_tensor(value).float().mean(dim=0) for key, value in data["train_stats"].items()}
        means = MiniBatchStats(*(train.get(TRAIN_NAMES.get(name, ""), torch.tensor(float("nan"))) for name in MiniBatchStats._fields))
        stats = flatten_step_stats(
            rollout,
            [means._replace(skipped=torch.tensor(0.0))],
            kl_coef=kl_coef,
            learning_rate=self.optimizer.param_groups[0]["lr"],
            timings={},
        )
        for key in ("ppo/skipped_minibatches", "ppo/minibatches", "ppo/learning_rate"):
            stats.pop(key)
        stats.update(train)
        stats["tokens/queries_dist"] = lengths["queries"].numpy()
        stats["tokens/responses_dist"] = lengths["responses"].numpy()
        return stats

    # Logging ------------------------------------------------------------------------------------
    def log_stats(
        self,
        stats: dict[str, Any],
        batch: dict[str, Any],
        rewards: Sequence[float] | Tensor,
        columns_to_log: Sequence[str] = ("query", "response"),
    ) -> None:
        """Send the step's scalar stats, reward mean/std and a sample table to the trackers."""
        rewards = torch.as_tensor([float(r) for r in rewards], dtype=torch.float32, device=self.accelerator.device)
        rewards = self.accelerator.gather(rewards).cpu()
        if self.config.log_with is None or not self.accelerator.is_main_process:
            return
        logs = tracker_logs({**scalar_stats(stats), **reward_stats(rewards)}, batch, rewards.tolist(), columns_to_log)
        self.accelerator.log(logs, step=self.current_step)


def fill_runtime_fields(config: Any, sizes: Sizes, model: nn.Module) -> None:
    """Write what TRL's trainer writes into its config when built: world and global sizes, model kind."""
    config.world_size = sizes.world_size
    config.global_batch_size = sizes.global_batch_size
    config.global_backward_batch_size = sizes.global_backward_batch_size
    config.is_encoder_decoder = bool(model.is_encoder_decoder)
    config.is_peft_model = bool(model.is_peft_model)


def _trl_response_columns(queries: Sequence[Tensor], responses: Sequence[Tensor], attention_mask: Tensor) -> list[int]:
    """Per row, the column of TRL's [B, L − 1] layout that predicts the first response token:
    len(query) − 1 plus the row's left padding in ``attention_mask``."""
    left_padding = attention_mask.long().argmax(dim=1).tolist()  # first attended position
    return [len(q) - 1 + pad for q, pad in zip(queries, left_padding)]


def _to_trl_layout(aligned: Tensor, columns: list[int], lengths: list[int], out_width: int) -> Tensor:
    """Response-aligned [B, T(, V)] -> TRL's [B, out_width(, V)]: response token t < lengths[i] of
    row i goes to column ``columns[i] + t``; everything else is 0."""
    device = aligned.device
    counts = torch.tensor(lengths)
    rows = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    tokens = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    cols = torch.tensor(columns)[rows] + tokens
    rows, tokens, cols = rows.to(device), tokens.to(device), cols.to(device)
    out = aligned.new_zeros(aligned.shape[0], out_width, *aligned.shape[2:])
    return out.index_put((rows, cols), aligned[rows, tokens])


def _as_score_tensor(scores: Any, device: torch.device) -> Tensor:
    """Scores given as a tensor or a list of numbers / 0-d tensors -> [B] on ``device``."""
    if isinstance(scores, Tensor):
        return scores.to(device).reshape(-1)
    return torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()) for s in scores]).to(device)
