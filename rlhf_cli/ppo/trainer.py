"""PPOTrainer: legacy TRL's ``step(queries, responses, scores)`` API on Accelerate.

The trainer orchestrates; the math lives in :mod:`rlhf_cli.ppo.functional`. One ``step`` runs
DESIGN §4 stage 4: (a) score processing, (b) packing, (c) one no-gradient pass each of policy and
reference, (d) per-token rewards and GAE, (e) PPO epochs over shuffled mini-batches, (f) stats and
the KL controller update.

Where things live: construction in named parts (the functions of ``setup``: accelerator, reference,
default optimiser, a critic-free estimator's frozen value head; then ``_prepare`` and
``_init_ppo_state``), advantage estimators in ``estimators`` (registry) and ``advantages`` (math),
the rest of the math in ``functional``, statistics assembly as pure functions in ``stats`` (``minibatch_stats``,
``assemble_step_stats``, whose typed :class:`~rlhf_cli.ppo.stats.StepStats` drive the KL controller
and the skipped-mini-batch warning), collectives in ``distributed``, the one timer in ``timing``,
TRL's protected methods in ``trl_compat``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from rlhf_cli.models import PreTrainedModelWrapper
from rlhf_cli.ppo.config import PPOConfig
from rlhf_cli.ppo.estimators import estimator_named
from rlhf_cli.ppo.distributed import (
    gather_rows,
    gather_samples,
    own_share,
    sum_across_processes,
    sum_shares,
)
from rlhf_cli.ppo.forward import RolloutScores, response_outputs, score_rollout
from rlhf_cli.ppo.functional import Advantages, kl_loss, per_token_rewards, policy_loss, process_scores, ratio_guard, value_loss
from rlhf_cli.ppo.inputs import check_groups, check_step_inputs, token_ids
from rlhf_cli.ppo.kl_control import make_kl_controller
from rlhf_cli.ppo.precision import apply_precision
from rlhf_cli.ppo.running_moments import RunningMoments
from rlhf_cli.ppo.sharding import full_optimizer_state, load_full_optimizer_state, shard_for_training, sharding_wanted
from rlhf_cli.ppo.setup import (
    check_sharding,
    checked_arguments,
    default_optimizer,
    freeze_value_head,
    make_accelerator,
    reference_model,
    shared_layers,
)
from rlhf_cli.ppo.stats import (
    SHARE_FIELDS,
    MiniBatchStats,
    RolloutStats,
    StepStats,
    WholeMiniBatch,
    assemble_step_stats,
    minibatch_stats,
)
from rlhf_cli.ppo.timing import PhaseTimer
from rlhf_cli.ppo.trl_compat import TRLCompatMixin, fill_runtime_fields
from rlhf_cli.rollout.packing import PackedBatch
from rlhf_cli.seeding import set_seed


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
        effect: ``step()`` packs its model inputs itself (see :mod:`rlhf_cli.rollout.packing`).

        Built in this order: arguments checked, accelerator and sizes, reference model, optimiser,
        everything prepared by Accelerate, PPO state (KL controller, score moments, shuffling), trackers."""
        if training_data_collator is not None:
            warnings.warn("training_data_collator has no effect in rlhf_cli: step() packs model inputs itself.", UserWarning, stacklevel=2)
        self.config = checked_arguments(config, model, ref_model)
        num_shared_layers = shared_layers(ref_model, num_shared_layers)
        self.config.check_sizes()  # the config as it is now, not as it was constructed
        self.config.check_estimator()
        self.estimator = estimator_named(self.config.advantage_estimator)
        self.accelerator = make_accelerator(self.config)
        self.sizes = self.config.sizes(self.accelerator.num_processes)
        fill_runtime_fields(self.config, self.sizes, model)
        check_sharding(self.accelerator, model, ref_model)
        set_seed(self.config.seed)
        self.tokenizer = tokenizer
        self.is_encoder_decoder = model.is_encoder_decoder
        self.is_peft_model = model.is_peft_model
        ref_model = reference_model(model, ref_model, num_shared_layers, disable_dropout=self.config.disable_dropout)
        if not self.estimator.needs_critic:
            freeze_value_head(model)
        self.sharded = sharding_wanted(self.config, self.accelerator)
        optimizer = self._optimizer_over(model, ref_model, optimizer)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self._prepare(model, optimizer, ref_model, dataset, data_collator, lr_scheduler)
        self._init_ppo_state()
        if self.accelerator.is_main_process and self.config.log_with is not None:
            self.accelerator.init_trackers(
                self.config.tracker_project_name, config=self.config.to_dict(), init_kwargs=self.config.tracker_kwargs
            )

    # Construction ------------------------------------------------------------------------------
    def _optimizer_over(
        self, model: PreTrainedModelWrapper, ref_model: Optional[PreTrainedModelWrapper], optimizer: Optional[torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        """The optimiser (the given one, or Adam) over the parameters as they will train: sharded first
        with ``ppo.sharding=fsdp2`` (policy and reference; bf16 is then FSDP2's mixed-precision policy,
        see rlhf_cli.ppo.sharding), else with ``precision="bf16"``'s float32 masters."""
        device = self.accelerator.device
        if self.sharded:
            build = lambda m: default_optimizer(m, self.config, device)  # noqa: E731
            return shard_for_training(model, ref_model, optimizer, build, device=device, precision=self.config.precision)
        if self.config.precision == "bf16":
            # The float32 masters are copies of the weights: made where the weights will live (on a GPU they
            # were made on the CPU before Accelerate moved the model, and the first step failed assigning
            # CUDA gradients to CPU masters; seen on an H200).
            model.to(device)
        optimizer = optimizer if optimizer is not None else default_optimizer(model, self.config, device)
        # precision="bf16": bfloat16 policy and reference, float32 masters in the optimiser.
        return apply_precision(self.config.precision, optimizer, model, ref_model)

    def _prepare(
        self,
        model: PreTrainedModelWrapper,
        optimizer: torch.optim.Optimizer,
        ref_model: Optional[PreTrainedModelWrapper],
        dataset: Any,
        data_collator: Optional[Callable],
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
    ) -> None:
        """Model, optimiser, dataloader and scheduler through ``accelerator.prepare``; the reference to the device."""
        self.dataset = dataset
        self.model = model  # prepared below; prepare_dataloader reads its forward signature
        self.dataloader = self.prepare_dataloader(dataset, data_collator) if dataset is not None else None
        if dataset is None:
            warnings.warn(
                "No dataset was given to PPOTrainer: make sure config.batch_size matches the number of samples "
                f"you pass to step() (batch_size={self.config.batch_size}).",
                UserWarning,
                stacklevel=3,
            )
        # Accelerate wraps the scheduler (trainer.lr_scheduler.scheduler is the user's); see make_accelerator.
        extras = [x for x in (self.dataloader, lr_scheduler) if x is not None]
        if self.sharded and not self.accelerator.is_fsdp2:
            # Already sharded: Accelerate must not wrap it in DDP; it prepares the optimiser only.
            self.model, (self.optimizer, *prepared) = model, self.accelerator.prepare(optimizer, *extras, None)[:-1]
        else:
            self.model, self.optimizer, *prepared = self.accelerator.prepare(model, optimizer, *extras)
        self.dataloader = prepared.pop(0) if self.dataloader is not None else None
        self.lr_scheduler = prepared.pop(0) if lr_scheduler is not None else None
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None

    def _init_ppo_state(self) -> None:
        """KL controller, running score moments, mini-batch shuffling and the step counter (what
        :meth:`state_dict` saves)."""
        self.kl_ctl = make_kl_controller(
            self.config.adap_kl_ctrl, self.config.init_kl_coef, self.config.target, self.config.horizon
        )
        self.running = RunningMoments() if self.config.use_score_scaling else None
        # Mini-batch order comes from the trainer's own seeded generator, not the global RNG, so
        # generation sampling and shuffling do not perturb each other.
        self.shuffle_generator = torch.Generator().manual_seed(self.config.seed)
        self.current_step = 0
        # The raw scores of the last step's global batch (all processes, rank order), gathered once.
        self.gathered_scores: Optional[Tensor] = None

    # Token ids ---------------------------------------------------------------------------------
    @property
    def _unwrapped(self) -> PreTrainedModelWrapper:
        return self.accelerator.unwrap_model(self.model)

    @property
    def pad_token_id(self) -> int:
        """Padding id (see :func:`rlhf_cli.ppo.inputs.token_ids`)."""
        return token_ids(self.tokenizer, self._unwrapped.config)[0]

    @property
    def eos_token_id(self) -> Optional[int]:
        return token_ids(self.tokenizer, self._unwrapped.config)[1]

    @property
    def reward_kl_coef(self) -> float:
        """β of the reward-side KL penalty: the controller's value, or 0 with ``kl_in_reward=False``."""
        return self.kl_ctl.value if self.config.kl_in_reward else 0.0

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
        (DESIGN §7), computed over the global batch of all processes and the same on every process.

        With ``config.samples_per_prompt`` = G > 1 the samples come prompt-major: the G responses of
        each prompt next to each other (``queries[g*G : (g+1)*G]`` one prompt's tensor repeated), so
        ``batch_size`` counts responses. Critic-free estimators (``config.advantage_estimator``) then
        compare each response with its group; without a critic the ``ppo/val/*``, ``ppo/returns/*``
        and ``ppo/loss/value`` stats are absent."""
        timer = PhaseTimer()
        queries, responses, scores, response_masks = check_step_inputs(
            queries, responses, scores, response_masks, self.config.batch_size
        )
        check_groups(queries, self.config.samples_per_prompt)
        # (a) The global batch, on every process; then score scaling/normalisation/clipping.
        queries, responses, response_masks = self._gather_batch(queries, responses, scores, response_masks)
        scores = process_scores(
            self.gathered_scores,
            running=self.running,
            use_score_norm=self.config.use_score_norm,
            score_clip=self.config.score_clip,
        )
        # (b) Pack into response-aligned model inputs (TRLCompatMixin._pack, also TRL's prepare_model_inputs).
        batch = self._pack(queries, responses, response_masks)
        mask = batch.response_mask
        # (c) Old logprobs and values (policy) and reference logprobs: one no-gradient pass each.
        with timer("forward_pass"):
            rollout = self._score_global_batch(batch)
        # (d) Per-token rewards (−β·KL, score on the last token) and advantages (GAE, or a critic-free
        # estimator of ppo.estimators). Every process holds the whole batch, so whitening and groups
        # use the global batch.
        kl_coef = self.reward_kl_coef
        with timer("compute_rewards"):
            rewards, non_score, kl = self._rewards(scores, rollout, mask, kl_coef)
        with timer("compute_advantages"):
            _, advantage, returns = self.compute_advantages(rollout.values, rewards, mask)
            advantages = Advantages(advantage, returns)
        # (e) PPO epochs over shuffled mini-batches.
        with timer("optimize_step"):
            minibatches = self._optimise(batch, rollout, advantages)
        # (f) Stats over the global batch, then the KL controller and scheduler.
        with timer("calc_stats"):
            rollout_stats = self._rollout_stats(batch, rollout, kl, non_score, scores)
            timer.seconds["total"] = timer.elapsed()
            result = assemble_step_stats(
                rollout_stats,
                minibatches,
                kl_coef=kl_coef,
                learning_rate=self.optimizer.param_groups[0]["lr"],
                timings=timer.seconds,
                critic=self.estimator.needs_critic,
                kl_loss_coef=self.config.kl_loss_coef,
            )
        self._finish_step(result, batch.batch_size)
        return result.flat

    def _gather_batch(
        self, queries: list[Tensor], responses: list[Tensor], scores: Tensor, response_masks: Optional[list[Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], Optional[list[Tensor]]]:
        """Every process's samples in rank order (the global batch); the raw scores, gathered once,
        are kept in :attr:`gathered_scores`."""
        scores = scores.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            queries, responses, response_masks = gather_samples(queries, responses, response_masks)
            scores = self.accelerator.gather(scores)
        self.gathered_scores = scores
        return queries, responses, response_masks

    def _rewards(self, scores: Tensor, rollout: RolloutScores, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token rewards, non-score rewards and KL. ``compute_rewards`` (and ``compute_advantages``)
        may be overridden: TRL's extension points."""
        if rollout.full_kl is None:
            return self.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask)
        # kl_penalty="full": computed per chunk in the forward pass (see trl_compat)
        rewards, non_score = per_token_rewards(scores, rollout.full_kl, mask, kl_coef)
        return rewards, non_score, rollout.full_kl

    def _finish_step(self, result: StepStats, batch_size: int) -> None:
        """Warn about skipped mini-batches, update the KL controller and scheduler, count the step:
        from the step's typed values, not its flattened metric names."""
        if result.skipped_minibatches > 0:
            warnings.warn(
                f"The mean probability ratio exceeded ratio_threshold={self.config.ratio_threshold} in "
                f"{result.skipped_minibatches} mini-batch(es) of step {self.current_step}; their loss was zeroed.",
                stacklevel=3,
            )
        if self.config.kl_in_reward:  # β is unused otherwise; the controller keeps its value
            self.kl_ctl.update(result.kl, batch_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1

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
            need_values=self.estimator.needs_critic,
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

        Fields named in ``stats.SHARE_FIELDS`` are this process's share of a mean over the global
        mini-batch (summed over processes in :meth:`_sum_shares`); the others are already global.
        """
        cfg = self.config
        processes = self.accelerator.num_processes
        own_rows = rows if processes == 1 else own_share(rows, self.accelerator.process_index, processes)
        whole = batch.select(rows)
        mb = whole if processes == 1 else batch.select(own_rows)
        token_count = whole.response_mask.sum()
        own_index, whole_index = own_rows.to(mb.response_ids.device), rows.to(mb.response_ids.device)

        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[own_index, : mb.response_width]

        def take_whole(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[whole_index, : whole.response_width]

        mask = mb.response_mask
        critic = self.estimator.needs_critic
        with self.accelerator.accumulate(self.model):
            out = response_outputs(self.model, mb, values=critic)
            pl = policy_loss(out.logprobs, take(rollout.logprobs), take(advantages.advantages), mask, cfg.cliprange, token_count=token_count)
            loss = pl.loss
            vl = kl_term = None
            if critic:
                vl = value_loss(out.values, take(rollout.values), take(advantages.returns), mask, cfg.cliprange_value, token_count=token_count)
                loss = loss + cfg.vf_coef * vl.loss
            if cfg.kl_loss_coef > 0:
                kl_term = kl_loss(out.logprobs, take(rollout.ref_logprobs), mask, cfg.kl_loss_estimator, token_count=token_count)
                loss = loss + cfg.kl_loss_coef * kl_term
            ratio_mean = self._sum_across_processes(pl.ratio_mean.detach())
            loss = ratio_guard(loss, ratio_mean, cfg.ratio_threshold)
            self._backward_and_step(loss, processes)
        whole_rollout = WholeMiniBatch(
            take_whole(advantages.advantages), take_whole(advantages.returns), take_whole(rollout.values), whole.response_mask
        )
        return minibatch_stats(pl, vl, kl_term, loss, out.logits, mask, token_count, ratio_mean, cfg.ratio_threshold, whole_rollout)

    def _backward_and_step(self, loss: Tensor, processes: int) -> None:
        """Backward pass, gradient clipping and the optimiser step (inside ``accelerator.accumulate``)."""
        # The loss is this process's share of the global mini-batch mean; DDP averages the
        # gradients over the processes, so scaling by their number gives the mean's gradient.
        self.accelerator.backward(loss * processes)
        if self.config.max_grad_norm is not None and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _should_stop_early(self, policykl: Tensor) -> bool:
        """Stop the epochs when the policy moved too far (agreed across processes: one host sync)."""
        policykl = self._sum_across_processes(policykl)
        return bool(policykl > 1.5 * self.config.target_kl)

    # Multi-process helpers (the collectives live in ppo.distributed) -----------------------------
    def _sum_across_processes(self, value: Tensor) -> Tensor:
        return sum_across_processes(self.accelerator, value)

    def _sum_shares(self, collected: list[MiniBatchStats]) -> list[MiniBatchStats]:
        """Add up the processes' shares of every mini-batch's means (one collective per step)."""
        if self.accelerator.num_processes == 1:
            return collected
        columns = [MiniBatchStats._fields.index(name) for name in SHARE_FIELDS]
        return [MiniBatchStats(*row.unbind()) for row in sum_shares(self.accelerator, collected, columns)]

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
            "optimizer": full_optimizer_state(self.model, self.optimizer.optimizer) if self.sharded else self.optimizer.state_dict(),
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
        if self.sharded:
            load_full_optimizer_state(self.model, self.optimizer.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
