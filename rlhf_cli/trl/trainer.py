"""Legacy TRL 0.11's ``PPOTrainer``: the engine under TRL's constructor, config and protected methods.

:class:`PPOTrainer` subclasses :class:`~rlhf_cli.ppo.engine.PPOEngine` (whose ``step()``, rewards and
advantages hooks it inherits unchanged) and adds what TRL scripts call or override: the
``PPOConfig`` constructor and dataset/dataloader handling, ``generate`` (:mod:`rlhf_cli.trl.generation`),
``prepare_model_inputs``, ``_step_safety_checker``, ``batched_forward_pass``, ``loss``,
``record_step_stats``, ``log_stats``, ``save_pretrained``. Each is a thin adapter over the engine's
own code (:mod:`rlhf_cli.algo`, :mod:`rlhf_cli.ppo.forward`, :mod:`rlhf_cli.ppo.stats`) that only
converts layouts; none re-implements the math.

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

from rlhf_cli.algo.functional import entropy_from_logits, masked_mean, masked_var, policy_loss, ratio_guard, value_loss
from rlhf_cli.models import PreTrainedModelWrapper
from rlhf_cli.ppo.engine import PPOEngine
from rlhf_cli.ppo.forward import response_outputs
from rlhf_cli.ppo.inputs import as_score_tensor, check_step_inputs
from rlhf_cli.ppo.minibatch import ratio_threshold_warning
from rlhf_cli.ppo.settings import Launch, Sizes
from rlhf_cli.ppo.stats import TRAIN_NAMES, MiniBatchStats, flatten_step_stats, reward_stats, rollout_stats, scalar_stats
from rlhf_cli.reporting import tracker_logs
from rlhf_cli.rollout.packing import cat_to_width, real_token_index
from rlhf_cli.trl.config import PPOConfig
from rlhf_cli.trl.dataloader import build_dataloader, is_hf_dataset, remove_unused_columns
from rlhf_cli.trl.generation import TRLGenerationMixin


class PPOTrainer(TRLGenerationMixin, PPOEngine):
    """Legacy TRL 0.11's ``PPOTrainer``: :class:`~rlhf_cli.ppo.engine.PPOEngine` built from a
    :class:`~rlhf_cli.trl.config.PPOConfig`, with TRL's protected methods.

    ``config.batch_size`` (query, response, score) triplets go into each :meth:`step` on each
    process. Sizes and settings are taken from ``config`` as it is when the trainer is built.
    """

    def __init__(
        self,
        config: Optional[PPOConfig] = None,
        model: Optional[PreTrainedModelWrapper] = None,
        ref_model: Optional[PreTrainedModelWrapper] = None,
        tokenizer: Any = None,
        dataset: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        data_collator: Optional[Callable] = None,
        num_shared_layers: Optional[int] = None,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        training_data_collator: Optional[Callable] = None,
    ) -> None:
        """TRL 0.11's arguments. ``training_data_collator`` is accepted for TRL scripts but has no
        effect: ``step()`` packs its model inputs itself (see :mod:`rlhf_cli.rollout.packing`)."""
        if training_data_collator is not None:
            warnings.warn("training_data_collator has no effect in rlhf_cli: step() packs model inputs itself.", UserWarning, stacklevel=2)
        config = config if config is not None else PPOConfig()
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}.")
        self.config = config
        settings = config.settings()  # the config as it is now, not as it was constructed
        self.dataset = dataset
        dataloader = self.prepare_dataloader(dataset, data_collator, model=model) if dataset is not None else None
        if dataset is None:
            warnings.warn(
                "No dataset was given to PPOTrainer: make sure config.batch_size matches the number of samples "
                f"you pass to step() (batch_size={config.batch_size}).",
                UserWarning,
                stacklevel=2,
            )
        launch = Launch(
            log_with=config.log_with,
            tracker_project_name=config.tracker_project_name,
            tracker_kwargs=config.tracker_kwargs,
            project_kwargs=config.project_kwargs,
            accelerator_kwargs=config.accelerator_kwargs,
        )
        super().__init__(
            settings, model, ref_model, tokenizer=tokenizer, optimizer=optimizer, num_shared_layers=num_shared_layers,
            lr_scheduler=lr_scheduler, dataloader=dataloader, launch=launch,
        )
        for name, value in runtime_fields(self.sizes, model).items():
            setattr(config, name, value)

    def _tracker_config(self) -> dict[str, Any]:
        """TRL sends its whole config, the fields its trainer fills in included."""
        return {**self.config.to_dict(), **runtime_fields(self.sizes, self._unwrapped)}

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
    def prepare_dataloader(
        self, dataset: Any, data_collator: Optional[Callable] = None, *, model: Optional[nn.Module] = None
    ) -> torch.utils.data.DataLoader:
        """TRL's dataloader over ``dataset``: shuffled batches of ``config.batch_size``, the last
        incomplete one dropped; a ``datasets.Dataset`` loses the columns the model does not take when
        ``config.remove_unused_columns`` (see :mod:`rlhf_cli.trl.dataloader`)."""
        if self.config.remove_unused_columns and is_hf_dataset(dataset):
            dataset = remove_unused_columns(dataset, (model if model is not None else self._unwrapped).forward)
        return build_dataloader(dataset, batch_size=self.config.batch_size, seed=self.config.seed, data_collator=data_collator)

    def prepare_model_inputs(self, queries: Sequence[Tensor], responses: Sequence[Tensor]) -> dict[str, Tensor]:
        """TRL's model inputs for (query, response) pairs, as ``step()`` packs them: decoder-only
        ``input_ids``/``attention_mask``/``position_ids`` [B, Lq + T] (query left-padded, response
        right-padded); encoder-decoder ``input_ids``/``attention_mask`` and ``decoder_*``."""
        return self._pack(list(queries), list(responses)).model_inputs()

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
        batch = self._pack(list(queries), list(responses), None if response_masks is None else list(response_masks))
        chunk = self.sizes.mini_batch_size
        parts = [response_outputs(model, batch.select(range(start, min(start + chunk, batch.batch_size))))
                 for start in range(0, batch.batch_size, chunk)]
        width = batch.response_width

        def cat(tensors: list[Tensor]) -> Tensor:
            return cat_to_width(tensors, width)

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
        cfg = self.settings
        pl = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.cliprange)
        vl = value_loss(vpreds, values, returns, mask, cfg.cliprange_value)
        if bool(pl.ratio_mean > cfg.ratio_threshold):  # host sync, as TRL's .item()
            message = ratio_threshold_warning(cfg.ratio_threshold, 1, self.current_step, float(pl.ratio_mean))
            warnings.warn(message, UserWarning, stacklevel=2)
        pg_loss = ratio_guard(pl.loss, pl.ratio_mean, cfg.ratio_threshold)
        vf_loss = ratio_guard(vl.loss, pl.ratio_mean, cfg.ratio_threshold)
        total = pg_loss + cfg.vf_coef * vf_loss
        with torch.no_grad():
            fields = dict(
                policy_loss=pg_loss.detach(), value_loss=vf_loss.detach(), total_loss=total.detach(),
                entropy=masked_mean(_broadcast_to_mask(entropy_from_logits(logits.detach()), mask), mask), approxkl=pl.approxkl,
                policykl=pl.policykl, clipfrac=pl.clipfrac, advantages_mean=masked_mean(advantages.detach(), mask),
                ratio=pl.ratio_mean, returns_mean=masked_mean(returns, mask), returns_var=masked_var(returns, mask),
                vpred=vl.vpred_mean, val_error=vl.error, val_clipfrac=vl.clipfrac, val_mean=masked_mean(values, mask),
                val_var=masked_var(values, mask),
            )
            # TRL's names without their "ppo/" prefix (the step's names, written once in ppo.stats)
            stats = {TRAIN_NAMES[name].removeprefix("ppo/"): value for name, value in fields.items()}
            stats["policy/advantages"] = advantages.detach()
        return pg_loss, cfg.vf_coef * vf_loss, stats

    def record_step_stats(self, kl_coef: float, **data: Any) -> dict[str, Any]:
        """TRL's step stats from ``scores``, ``logprobs``, ``ref_logprobs``, ``non_score_reward``,
        ``kls``, ``masks`` ([B, T]), ``queries``, ``responses`` and ``train_stats`` (TRL's flat
        names, each stacked over mini-batches), via the flattening ``step()`` uses."""
        mask = data["masks"]
        lengths = {name: [len(x) for x in data[name]] for name in ("queries", "responses")}
        rollout = rollout_stats(
            kl=data["kls"], logprobs=data["logprobs"], ref_logprobs=data["ref_logprobs"],
            non_score=data["non_score_reward"], mask=mask, scores=as_score_tensor(data["scores"], mask.device),
            query_lengths=lengths["queries"], response_lengths=lengths["responses"],
        )
        train = {f"ppo/{key}": torch.as_tensor(value).float().mean(dim=0) for key, value in data["train_stats"].items()}
        means = MiniBatchStats(*(train.get(TRAIN_NAMES.get(name, ""), torch.tensor(float("nan"))) for name in MiniBatchStats._fields))
        stats = flatten_step_stats(
            rollout,
            [means._replace(skipped=torch.tensor(0.0), nonfinite=torch.tensor(0.0), nonfinite_loss=torch.tensor(0.0))],
            kl_coef=kl_coef,
            learning_rate=self.optimizer.param_groups[0]["lr"],
            timings={},
        )
        for key in ("ppo/skipped_minibatches", "ppo/nonfinite_minibatches", "ppo/nonfinite_loss_minibatches",
                    "ppo/minibatches", "ppo/learning_rate"):
            stats.pop(key)
        stats.update(train)
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


def runtime_fields(sizes: Sizes, model: nn.Module) -> dict[str, Any]:
    """What TRL's trainer writes into its config when built: world and global sizes, model kind."""
    return {
        "world_size": sizes.world_size,
        "global_batch_size": sizes.global_batch_size,
        "global_backward_batch_size": sizes.global_backward_batch_size,
        "is_encoder_decoder": bool(model.is_encoder_decoder),
        "is_peft_model": bool(model.is_peft_model),
    }


def _trl_response_columns(queries: Sequence[Tensor], responses: Sequence[Tensor], attention_mask: Tensor) -> list[int]:
    """Per row, the column of TRL's [B, L − 1] layout that predicts the first response token:
    len(query) − 1 plus the row's left padding in ``attention_mask``."""
    left_padding = attention_mask.long().argmax(dim=1).tolist()  # first attended position
    return [len(q) - 1 + pad for q, pad in zip(queries, left_padding)]


def _to_trl_layout(aligned: Tensor, columns: list[int], lengths: list[int], out_width: int) -> Tensor:
    """Response-aligned [B, T(, V)] -> TRL's [B, out_width(, V)]: response token t < lengths[i] of
    row i goes to column ``columns[i] + t``; everything else is 0."""
    rows, tokens = real_token_index(lengths, torch.device("cpu"))
    cols = torch.tensor(columns)[rows] + tokens
    rows, tokens, cols = rows.to(aligned.device), tokens.to(aligned.device), cols.to(aligned.device)
    out = aligned.new_zeros(aligned.shape[0], out_width, *aligned.shape[2:])
    return out.index_put((rows, cols), aligned[rows, tokens])


def _broadcast_to_mask(entropy: Tensor, mask: Tensor) -> Tensor:
    """Per-token entropy shaped like ``mask``. Logits [B, T, V] give it as is; TRL's own test passes
    [B, T] probabilities as ``logits``, whose entropy [B] TRL's masked mean broadcasts against the
    mask, and so does this."""
    return entropy if entropy.shape == mask.shape else torch.broadcast_to(entropy, mask.shape)
