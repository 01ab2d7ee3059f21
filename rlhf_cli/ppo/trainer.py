"""PPOTrainer: legacy TRL's ``step(queries, responses, scores)`` API on Accelerate.

The trainer orchestrates; the math lives in :mod:`rlhf_cli.ppo.functional`. One ``step`` runs
DESIGN §4 stage 4: (a) score processing, (b) packing, (c) one no-gradient pass each of policy and
reference, (d) per-token rewards and GAE, (e) PPO epochs over shuffled mini-batches, (f) stats and
the KL controller update.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration
from torch import Tensor, nn

from rlhf_cli.errors import ConfigError
from rlhf_cli.models import PreTrainedModelWrapper, create_reference_model, disable_dropout
from rlhf_cli.ppo.config import PPOConfig
from rlhf_cli.ppo.distributed import cpu_process_group_needed, gather_rows, gather_samples, own_share
from rlhf_cli.ppo.forward import RolloutScores, response_outputs, score_rollout
from rlhf_cli.ppo.functional import (
    Advantages,
    entropy_from_logits,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    process_scores,
    ratio_guard,
    value_loss,
)
from rlhf_cli.ppo.inputs import check_step_inputs
from rlhf_cli.ppo.kl_control import make_kl_controller
from rlhf_cli.ppo.precision import apply_precision
from rlhf_cli.ppo.running_moments import RunningMoments
from rlhf_cli.ppo.stats import MiniBatchStats, RolloutStats, flatten_step_stats
from rlhf_cli.ppo.trl_compat import TRLCompatMixin, fill_runtime_fields
from rlhf_cli.rollout.packing import PackedBatch, pack_batch
from rlhf_cli.rollout.unwrap import zero_stage
from rlhf_cli.seeding import set_seed


# MiniBatchStats fields that each process computes as its share of a mean over the global mini-batch
# (they depend on its own forward pass); the others are computed from the whole mini-batch's rollout.
_SHARE_FIELDS = (
    "policy_loss", "value_loss", "total_loss", "entropy", "approxkl", "policykl", "clipfrac",
    "vpred", "val_error", "val_clipfrac",
)


def make_accelerator(config: PPOConfig) -> Accelerator:
    """The Accelerator of a trainer: the config's trackers, project and accelerator keyword arguments.

    Gradient accumulation counts mini-batches only (not the end of a dataloader, which would force an
    optimiser step on every mini-batch of a dataloader's last batch), and a prepared scheduler steps
    once per ``step()`` whatever the number of processes.
    """
    kwargs = dict(config.accelerator_kwargs)
    # Processes launched on a CPU-only machine must be told to join over gloo (see distributed.py).
    kwargs.setdefault("cpu", cpu_process_group_needed())
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    if "gradient_accumulation_plugin" not in kwargs:
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        )
    return Accelerator(log_with=config.log_with, project_config=ProjectConfiguration(**config.project_kwargs), **kwargs)


class _Timer:
    """Wall-clock seconds per named phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class PPOTrainer(TRLCompatMixin):
    """PPO for a language model with a value head, kept near a frozen reference by a KL penalty.

    ``config.batch_size`` (query, response, score) triplets go into each :meth:`step` on each
    process. ``ref_model=None`` makes a frozen copy of ``model`` (sharing its first
    ``num_shared_layers`` layers), or, for a PEFT model, uses the policy with its adapter disabled.
    Sizes are derived from ``config`` as it is when the trainer is built. TRL 0.11's protected
    methods come from :class:`~rlhf_cli.ppo.trl_compat.TRLCompatMixin`.

    On P processes a step computes what one process computes on the P·b samples concatenated in
    rank order (to float rounding): see :mod:`rlhf_cli.ppo.distributed` for the convention.
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
        self.config = config if config is not None else PPOConfig()
        if not isinstance(self.config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(self.config).__name__}.")
        if not isinstance(model, PreTrainedModelWrapper):
            raise TypeError(
                "model must be an AutoModelForCausalLMWithValueHead or AutoModelForSeq2SeqLMWithValueHead "
                f"(got {type(model).__name__}); wrap a transformers model with "
                "AutoModelForCausalLMWithValueHead.from_pretrained(model)."
            )
        if ref_model is not None and not isinstance(ref_model, PreTrainedModelWrapper):
            raise TypeError(f"ref_model must be a value-head model like model, or None; got {type(ref_model).__name__}.")
        if ref_model is not None and num_shared_layers is not None:
            warnings.warn(
                "num_shared_layers is ignored when ref_model is given: the reference is that model and no "
                "layers are shared with the policy.",
                UserWarning,
                stacklevel=2,
            )
            num_shared_layers = None
        self.config.check_sizes()  # the config as it is now, not as it was constructed
        self.accelerator = make_accelerator(self.config)
        self.sizes = self.config.sizes(self.accelerator.num_processes)
        fill_runtime_fields(self.config, self.sizes, model)
        if zero_stage(self.accelerator) == 3 and not (ref_model is None and model.is_peft_model):
            raise ConfigError(
                "DeepSpeed ZeRO-3 shards the policy's parameters over the processes, but a separate reference "
                "model (a frozen copy, or the ref_model given) would be a full unsharded copy on every device, "
                "copied from parameters ZeRO-3 may already have partitioned; running it would need its own "
                "DeepSpeed inference engine, which rlhf_cli does not build. Use LoRA (model.lora.enabled=true, or a "
                "PEFT model with ref_model=None: the reference is then the policy with its adapter disabled), or "
                "launch with ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)."
            )
        set_seed(self.config.seed)
        self.tokenizer = tokenizer
        self.is_encoder_decoder = model.is_encoder_decoder
        self.is_peft_model = model.is_peft_model

        # The reference: an explicit model, the adapter-less policy (PEFT), or a frozen copy.
        if ref_model is None and not self.is_peft_model:
            ref_model = create_reference_model(model, num_shared_layers=num_shared_layers)
        if self.config.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)

        if optimizer is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            # The fused kernel updates all parameters in one pass: 5x faster than torch's per-tensor
            # default on CPU (12 ms vs 60 ms per step for a 6 x 384 GPT-2), run 16x per PPO step.
            fused = self.accelerator.device.type in ("cpu", "cuda")
            optimizer = torch.optim.Adam(
                trainable,
                lr=self.config.learning_rate,
                eps=self.config.adam_eps,
                weight_decay=self.config.weight_decay,
                fused=fused or None,
            )
        # precision="bf16": bfloat16 policy and reference, float32 masters in the optimiser.
        optimizer = apply_precision(self.config.precision, optimizer, model, ref_model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.dataset = dataset
        self.model = model  # prepared below; prepare_dataloader reads its forward signature
        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None
        if dataset is None:
            warnings.warn(
                "No dataset was given to PPOTrainer: make sure config.batch_size matches the number of samples "
                f"you pass to step() (batch_size={self.config.batch_size}).",
                UserWarning,
                stacklevel=2,
            )
        # Accelerate wraps the scheduler (trainer.lr_scheduler.scheduler is the user's); see make_accelerator.
        extras = [x for x in (self.dataloader, lr_scheduler) if x is not None]
        self.model, self.optimizer, *prepared = self.accelerator.prepare(model, optimizer, *extras)
        self.dataloader = prepared.pop(0) if self.dataloader is not None else None
        self.lr_scheduler = prepared.pop(0) if lr_scheduler is not None else None
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None

        self.kl_ctl = make_kl_controller(
            self.config.adap_kl_ctrl, self.config.init_kl_coef, self.config.target, self.config.horizon
        )
        self.running = RunningMoments() if self.config.use_score_scaling else None
        # Mini-batch order comes from the trainer's own seeded generator, not the global RNG, so
        # generation sampling and shuffling do not perturb each other.
        self.shuffle_generator = torch.Generator().manual_seed(self.config.seed)
        self.current_step = 0
        if self.accelerator.is_main_process and self.config.log_with is not None:
            self.accelerator.init_trackers(
                self.config.tracker_project_name, config=self.config.to_dict(), init_kwargs=self.config.tracker_kwargs
            )

    # Token ids ---------------------------------------------------------------------------------
    @property
    def _unwrapped(self) -> PreTrainedModelWrapper:
        return self.accelerator.unwrap_model(self.model)

    @property
    def pad_token_id(self) -> int:
        """Padding id: the tokenizer's pad, else its EOS, else the model config's; any id is safe
        because padded positions are masked out of attention and of every loss."""
        for source in (self.tokenizer, self._unwrapped.config):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, int):
                    return value
        return 0

    @property
    def eos_token_id(self) -> Optional[int]:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return getattr(self._unwrapped.config, "eos_token_id", None)

    # Reference model ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference_context(self) -> Iterator[nn.Module]:
        """The module that computes reference logprobs: the frozen model, or the policy with its
        PEFT adapter disabled (no second copy of the weights).

        The frozen model is not prepared by Accelerate, so it runs under the accelerator's autocast
        here: with mixed precision, reference and policy logprobs then come from the same precision
        and the KL of the untrained policy is zero, not rounding noise.
        """
        if self.ref_model is not None:
            with self.accelerator.autocast():
                yield self.ref_model
            return
        with self._unwrapped.pretrained_model.disable_adapter():
            yield self.model

    # The step ----------------------------------------------------------------------------------
    def step(
        self,
        queries: list[Tensor],
        responses: list[Tensor],
        scores: list[Tensor] | list[float] | Tensor,
        response_masks: Optional[list[Tensor]] = None,
    ) -> dict[str, Any]:
        """One PPO step on ``config.batch_size`` samples per process; returns legacy TRL's stats dict
        (DESIGN §7), computed over the global batch of all processes and the same on every process."""
        timer = _Timer()
        step_start = time.perf_counter()
        queries, responses, scores, response_masks = check_step_inputs(
            queries, responses, scores, response_masks, self.config.batch_size
        )
        device = self.accelerator.device

        # (a) The global batch, on every process; then score scaling/normalisation/clipping.
        scores = scores.to(device)
        if self.accelerator.num_processes > 1:
            queries, responses, response_masks = gather_samples(queries, responses, response_masks)
            scores = self.accelerator.gather(scores)
        scores = process_scores(
            scores,
            running=self.running,
            use_score_norm=self.config.use_score_norm,
            score_clip=self.config.score_clip,
        )

        # (b) Pack into response-aligned model inputs.
        decoder_start = getattr(self._unwrapped.config, "decoder_start_token_id", None) if self.is_encoder_decoder else None
        batch = pack_batch(
            queries,
            responses,
            pad_token_id=self.pad_token_id,
            is_encoder_decoder=self.is_encoder_decoder,
            decoder_start_token_id=decoder_start,
            response_masks=response_masks,
            device=device,
        )
        mask = batch.response_mask

        # (c) Old logprobs and values (policy) and reference logprobs: one no-gradient pass each.
        with timer("forward_pass"):
            rollout = self._score_global_batch(batch)

        # (d) Per-token rewards (−β·KL, score on the last token) and GAE advantages. Every process
        # holds the whole batch, so whitening uses the statistics of the global batch.
        # compute_rewards and compute_advantages may be overridden (TRL's extension points).
        kl_coef = self.kl_ctl.value
        with timer("compute_rewards"):
            if rollout.full_kl is None:
                rewards, non_score, kl = self.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask)
            else:  # kl_penalty="full": computed per chunk in the forward pass (see trl_compat)
                kl = rollout.full_kl
                rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
        with timer("compute_advantages"):
            _, whitened, returns = self.compute_advantages(rollout.values, rewards, mask)
            advantages = Advantages(whitened, returns)

        # (e) PPO epochs over shuffled mini-batches.
        with timer("optimize_step"):
            minibatch_stats = self._optimise(batch, rollout, advantages)

        # (f) Stats over the global batch, then the KL controller and scheduler.
        with timer("calc_stats"):
            rollout_stats = self._rollout_stats(batch, rollout, kl, non_score, scores)
            timer.seconds["total"] = time.perf_counter() - step_start
            stats = flatten_step_stats(
                rollout_stats,
                minibatch_stats,
                kl_coef=kl_coef,
                learning_rate=self.optimizer.param_groups[0]["lr"],
                timings=timer.seconds,
            )
        if stats["ppo/skipped_minibatches"] > 0:
            warnings.warn(
                f"The mean probability ratio exceeded ratio_threshold={self.config.ratio_threshold} in "
                f"{int(stats['ppo/skipped_minibatches'])} mini-batch(es) of step {self.current_step}; their loss was zeroed.",
                stacklevel=2,
            )
        self.kl_ctl.update(stats["objective/kl"], batch.batch_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1
        return stats

    def _score_global_batch(self, batch: PackedBatch) -> RolloutScores:
        """Rollout scores [B, T] of the global batch: each process scores its own samples (rows
        r·b … (r+1)·b − 1), then the results are gathered."""
        processes = self.accelerator.num_processes
        own = batch
        if processes > 1:
            own = batch.select(own_share(torch.arange(batch.batch_size), self.accelerator.process_index, processes))
        rollout = score_rollout(
            self.model,
            self.reference_context,
            own,
            chunk_size=self.config.forward_batch_size or own.batch_size,
            need_full_kl=self.config.kl_penalty == "full",
        )
        if processes == 1:
            return rollout
        width = batch.response_width
        return RolloutScores(*(None if t is None else gather_rows(self.accelerator, t, width) for t in rollout))

    def _optimise(self, batch: PackedBatch, rollout: RolloutScores, advantages: Advantages) -> list[MiniBatchStats]:
        cfg = self.config
        global_mini_batch = self.sizes.mini_batch_size * self.accelerator.num_processes
        self.model.train()
        collected: list[MiniBatchStats] = []
        for _ in range(cfg.ppo_epochs):
            # The generator advances identically on every process: one permutation of the global rows.
            order = torch.randperm(batch.batch_size, generator=self.shuffle_generator)
            epoch_policykl = []
            for start in range(0, batch.batch_size, global_mini_batch):
                stats = self._train_minibatch(batch, order[start : start + global_mini_batch], rollout, advantages)
                collected.append(stats)
                epoch_policykl.append(stats.policykl)
            if cfg.early_stopping and self._should_stop_early(torch.stack(epoch_policykl).mean()):
                break
        return self._sum_shares(collected)

    def _train_minibatch(
        self, batch: PackedBatch, rows: Tensor, rollout: RolloutScores, advantages: Advantages
    ) -> MiniBatchStats:
        """One optimisation mini-batch: ``rows`` are its global rows; this process trains on its share.

        Fields named in ``_SHARE_FIELDS`` are this process's share of a mean over the global
        mini-batch (summed over processes in :meth:`_sum_shares`); the others are already global.
        """
        cfg = self.config
        processes = self.accelerator.num_processes
        whole = batch.select(rows)
        mb = whole if processes == 1 else batch.select(own_share(rows, self.accelerator.process_index, processes))
        token_count = whole.response_mask.sum()
        device = mb.response_ids.device
        own_index = (rows if processes == 1 else own_share(rows, self.accelerator.process_index, processes)).to(device)
        whole_index = rows.to(device)

        def take(t: Tensor) -> Tensor:
            return t[own_index, : mb.response_width]

        def take_whole(t: Tensor) -> Tensor:
            return t[whole_index, : whole.response_width]

        mask = mb.response_mask
        old_logprobs, old_values = take(rollout.logprobs), take(rollout.values)
        mb_advantages, mb_returns = take(advantages.advantages), take(advantages.returns)
        with self.accelerator.accumulate(self.model):
            out = response_outputs(self.model, mb)
            pl = policy_loss(out.logprobs, old_logprobs, mb_advantages, mask, cfg.cliprange, token_count=token_count)
            vl = value_loss(out.values, old_values, mb_returns, mask, cfg.cliprange_value, token_count=token_count)
            ratio_mean = self._sum_across_processes(pl.ratio_mean.detach())
            loss = ratio_guard(pl.loss + cfg.vf_coef * vl.loss, ratio_mean, cfg.ratio_threshold)
            # The loss is this process's share of the global mini-batch mean; DDP averages the
            # gradients over the processes, so scaling by their number gives the mean's gradient.
            self.accelerator.backward(loss * processes)
            if cfg.max_grad_norm is not None and self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        skipped = (ratio_mean > cfg.ratio_threshold).float()
        keep = 1.0 - skipped  # legacy TRL reports zero losses for a skipped mini-batch
        whole_mask = whole.response_mask
        with torch.no_grad():
            old_values_whole, returns_whole = take_whole(rollout.values), take_whole(advantages.returns)
            return MiniBatchStats(
                policy_loss=pl.loss.detach() * keep,
                value_loss=vl.loss.detach() * keep,
                total_loss=loss.detach(),
                entropy=masked_mean(entropy_from_logits(out.logits.detach()), mask, count=token_count),
                approxkl=pl.approxkl,
                policykl=pl.policykl,
                clipfrac=pl.clipfrac,
                advantages_mean=masked_mean(take_whole(advantages.advantages), whole_mask),
                ratio=ratio_mean,
                returns_mean=masked_mean(returns_whole, whole_mask),
                returns_var=masked_var(returns_whole, whole_mask),
                vpred=vl.vpred_mean,
                val_error=vl.error,
                val_clipfrac=vl.clipfrac,
                val_mean=masked_mean(old_values_whole, whole_mask),
                val_var=masked_var(old_values_whole, whole_mask),
                skipped=skipped,
            )

    def _should_stop_early(self, policykl: Tensor) -> bool:
        """Stop the epochs when the policy moved too far (agreed across processes: one host sync)."""
        policykl = self._sum_across_processes(policykl)
        return bool(policykl > 1.5 * self.config.target_kl)

    # Multi-process helpers ---------------------------------------------------------------------
    def _sum_across_processes(self, value: Tensor) -> Tensor:
        if self.accelerator.num_processes == 1:
            return value
        return self.accelerator.reduce(value, reduction="sum")

    def _sum_shares(self, collected: list[MiniBatchStats]) -> list[MiniBatchStats]:
        """Add up the processes' shares of every mini-batch's means (one collective per step)."""
        if self.accelerator.num_processes == 1:
            return collected
        columns = [MiniBatchStats._fields.index(name) for name in _SHARE_FIELDS]
        table = torch.stack([torch.stack([t.float() for t in mb]) for mb in collected])
        table[:, columns] = self.accelerator.reduce(table[:, columns].contiguous(), reduction="sum")
        return [MiniBatchStats(*row.unbind()) for row in table]

    def _rollout_stats(
        self, batch: PackedBatch, rollout: RolloutScores, kl: Tensor, non_score: Tensor, scores: Tensor
    ) -> RolloutStats:
        mask = batch.response_mask
        device = mask.device
        return RolloutStats(
            kl_per_sample=(kl * mask).sum(dim=-1),
            neg_logprob_sum=(-rollout.logprobs * mask).sum(dim=-1),
            mean_non_score_reward=(non_score * mask).sum() / mask.sum(),
            scores=scores,
            query_lengths=torch.tensor(batch.query_lengths, device=device, dtype=torch.float32),
            response_lengths=torch.tensor(batch.response_lengths, device=device, dtype=torch.float32),
            logprobs=rollout.logprobs,
            ref_logprobs=rollout.ref_logprobs,
        )

    # State for checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything of the trainer that an exact continuation needs besides the model weights:
        optimizer and scheduler state, KL coefficient, running score moments, the mini-batch
        shuffling generator and the step counter."""
        return {
            "current_step": self.current_step,
            "kl_ctl": self.kl_ctl.state_dict(),
            "running": self.running.state_dict() if self.running is not None else None,
            "shuffle_generator": self.shuffle_generator.get_state(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (model weights are loaded separately)."""
        self.current_step = int(state["current_step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if (state["running"] is None) != (self.running is None):
            raise ValueError("The saved trainer state and this config disagree on use_score_scaling.")
        if self.running is not None:
            self.running.load_state_dict(state["running"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
