"""PPOEngine: the PPO trainer itself; ``step()`` below reads top to bottom, one method per stage.

One ``step`` on the global batch of all processes: (a) the batch gathered and its scores processed,
(b) packed into response-aligned model inputs, (c) one no-gradient pass each of policy and
reference, (d) per-token rewards (:meth:`compute_rewards`) and advantages
(:meth:`compute_advantages`), both overridable, (e) PPO epochs over shuffled mini-batches,
(f) stats, then the KL controller and scheduler. The math is in :mod:`rlhf_cli.algo`; the forward
passes in :mod:`rlhf_cli.ppo.forward`; construction in :mod:`rlhf_cli.ppo.setup`; one mini-batch's
losses in :mod:`rlhf_cli.ppo.minibatch`; stats records in :mod:`rlhf_cli.ppo.stats`; collectives in
:mod:`rlhf_cli.ppo.distributed`. Legacy TRL's ``PPOTrainer`` (:mod:`rlhf_cli.trl.trainer`)
subclasses this class; nothing here knows about it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from rlhf_cli.algo.advantages import ESTIMATE, settings_from
from rlhf_cli.algo.functional import Advantages, per_token_rewards, process_scores, ratio_guard
from rlhf_cli.algo.kl import full_kl, kl_penalty
from rlhf_cli.models import PreTrainedModelWrapper
from rlhf_cli.ppo.distributed import gather_rows, gather_samples, own_share, sum_across_processes
from rlhf_cli.ppo.forward import RolloutScores, response_entropy, response_outputs, score_rollout
from rlhf_cli.ppo.guard import GuardVerdict, guard_update, nonfinite_warning
from rlhf_cli.ppo.inputs import as_score_tensor, check_prompt_groups, check_step_inputs, token_ids
from rlhf_cli.ppo.minibatch import Rows, minibatch_losses, ratio_threshold_warning
from rlhf_cli.ppo.settings import Launch, PPOSettings
from rlhf_cli.ppo.setup import build_parts
from rlhf_cli.ppo.state import engine_state, init_engine_state, restore_engine_state
from rlhf_cli.ppo.stats import (MiniBatchStats, StepStats, WholeMiniBatch, assemble_step_stats, minibatch_stats,
                                record_final_timings, rollout_stats, sum_minibatch_shares)
from rlhf_cli.ppo.timing import PhaseTimer
from rlhf_cli.rollout.packing import PackedBatch, pack_batch


class PPOEngine:
    """PPO for a language model with a value head, kept near a frozen reference by a KL penalty.

    ``settings.batch_size`` (query, response, score) triplets go into each :meth:`step` on each
    process. ``ref_model=None`` makes a frozen copy of ``model`` (sharing its first
    ``num_shared_layers`` layers), or, for a PEFT model, uses the policy with its adapter disabled.

    On P processes a step computes what one process computes on the P·b samples concatenated in
    rank order (to float rounding): see :mod:`rlhf_cli.ppo.distributed` for the convention.
    """

    def __init__(
        self,
        settings: PPOSettings,
        model: PreTrainedModelWrapper,
        ref_model: Optional[PreTrainedModelWrapper] = None,
        *,
        tokenizer: Any = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        num_shared_layers: Optional[int] = None,
        lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        dataloader: Optional[torch.utils.data.DataLoader] = None,
        launch: Optional[Launch] = None,
    ) -> None:
        """Built in this order (:func:`rlhf_cli.ppo.setup.build_parts`): arguments checked, accelerator and
        sizes, reference model, optimiser, everything prepared by Accelerate (``dataloader`` too, when
        given); then the PPO state (KL controller, score moments, shuffling: :func:`rlhf_cli.ppo.state.init_engine_state`)
        and the trackers."""
        self.settings = settings
        self.launch = launch if launch is not None else Launch()
        parts = build_parts(settings, self.launch, model, ref_model, optimizer=optimizer, num_shared_layers=num_shared_layers,
                            lr_scheduler=lr_scheduler, dataloader=dataloader)
        self.estimator, self.accelerator, self.sizes, self.sharded = parts.estimator, parts.accelerator, parts.sizes, parts.sharded
        self.model, self.optimizer, self.dataloader, self.lr_scheduler, self.ref_model = parts.prepared
        self.tokenizer = tokenizer
        self.is_encoder_decoder = model.is_encoder_decoder
        self.is_peft_model = model.is_peft_model
        init_engine_state(self)
        # The raw scores of the last step's global batch (all processes, rank order), gathered once.
        self.gathered_scores: Optional[Tensor] = None
        if self.start_trackers_on_init:
            self.start_trackers()

    # Construction ------------------------------------------------------------------------------
    # As TRL; the CLI's run starts them once it has really started (no trackers/ for a failed start).
    start_trackers_on_init = True

    def start_trackers(self) -> None:
        """Create the trackers of ``launch.log_with`` (main process)."""
        if self.accelerator.is_main_process and self.launch.log_with is not None:
            self.accelerator.init_trackers(self.launch.tracker_project_name, config=self._tracker_config(),
                                           init_kwargs=dict(self.launch.tracker_kwargs))

    def _tracker_config(self) -> dict[str, Any]:
        """The hyper-parameters the trackers record."""
        return self.settings.to_dict()

    # Token ids and the reference ---------------------------------------------------------------
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
        return self.kl_ctl.value if self.settings.kl_in_reward else 0.0

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
        """One PPO step on ``settings.batch_size`` samples per process; returns legacy TRL's stats dict
        (see :mod:`rlhf_cli.ppo.stats`), computed over the global batch of all processes and the same
        on every process.

        With ``samples_per_prompt`` = G > 1 the samples come prompt-major: the G responses of
        each prompt next to each other (``queries[g*G : (g+1)*G]`` one prompt's tensor repeated), so
        ``batch_size`` counts responses. Critic-free estimators (``advantage_estimator``) then
        compare each response with its group; without a critic the ``ppo/val/*``, ``ppo/returns/*``
        and ``ppo/loss/value`` stats are absent."""
        timer = PhaseTimer()
        queries, responses, scores, response_masks = check_step_inputs(
            queries, responses, scores, response_masks, self.settings.batch_size
        )
        check_prompt_groups(queries, self.settings.samples_per_prompt)
        # (a) The global batch, on every process; then score scaling/normalisation/clipping.
        queries, responses, response_masks = self._gather_batch(queries, responses, scores, response_masks)
        scores = self._process_scores(self.gathered_scores)
        # (b) Pack into response-aligned model inputs.
        batch = self._pack(queries, responses, response_masks)
        mask = batch.response_mask
        # (c) Old logprobs and values (policy) and reference logprobs: one no-gradient pass each.
        with timer("forward_pass"):
            rollout = self._score_global_batch(batch)
        # (d) Per-token rewards and advantages. Every process holds the whole batch, so whitening
        # and groups use the global batch.
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
            result = self._step_stats(batch, rollout, kl, non_score, scores, minibatches, kl_coef, timer, advantages)
        record_final_timings(result.flat, timer)
        self._finish_step(result, batch.batch_size)
        return result.flat

    # (a) The global batch ------------------------------------------------------------------------
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

    def _process_scores(self, scores: Tensor) -> Tensor:
        """Score scaling (running moments), normalisation and clipping, as the settings ask."""
        s = self.settings
        return process_scores(scores, running=self.running, use_score_norm=s.use_score_norm, score_clip=s.score_clip)

    # (b) Packing -------------------------------------------------------------------------------
    def _pack(self, queries: list[Tensor], responses: list[Tensor], response_masks: Optional[list[Tensor]] = None) -> PackedBatch:
        """Left-padded queries, right-padded responses, explicit positions (see :mod:`rlhf_cli.rollout.packing`)."""
        decoder_start = getattr(self._unwrapped.config, "decoder_start_token_id", None) if self.is_encoder_decoder else None
        return pack_batch(queries, responses, pad_token_id=self.pad_token_id, is_encoder_decoder=self.is_encoder_decoder,
                          decoder_start_token_id=decoder_start, response_masks=response_masks, device=self.accelerator.device)

    # (c) No-gradient forward passes ------------------------------------------------------------
    def _score_global_batch(self, batch: PackedBatch) -> RolloutScores:
        """Rollout scores [B, T] of the global batch: each process scores its own samples (rows
        r·b … (r+1)·b − 1), then the results are gathered."""
        processes = self.accelerator.num_processes
        own = batch
        if processes > 1:
            own = batch.select(own_share(torch.arange(batch.batch_size), self.accelerator.process_index, processes))
        s = self.settings
        rollout = score_rollout(self.model, self.reference_context, own, chunk_size=s.forward_batch_size or own.batch_size,
                                need_full_kl=s.kl_penalty == "full", need_values=self.estimator.needs_critic)
        if processes == 1:
            return rollout
        width = batch.response_width
        return RolloutScores(*(None if t is None else gather_rows(self.accelerator, t, width) for t in rollout))

    # (d) Rewards and advantages: the overridable hooks -------------------------------------------
    def _rewards(self, scores: Tensor, rollout: RolloutScores, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token rewards, non-score rewards and KL, through :meth:`compute_rewards` unless the KL
        is ``full``: then it was computed per chunk in the forward pass, so that [B, T, V]
        log-probabilities of both models never sit in memory at once."""
        if rollout.full_kl is None:
            return self.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask)
        rewards, non_score = per_token_rewards(scores, rollout.full_kl, mask, kl_coef)
        return rewards, non_score, rollout.full_kl

    def _kl_penalty(self, logprob: Tensor, ref_logprob: Tensor) -> Tensor:
        """Per-token KL estimate for ``kl_penalty``: sampled-token logprobs [B, T] for
        ``kl``/``abs``/``mse``; full log-probabilities [B, T, V] for ``full``."""
        if self.settings.kl_penalty == "full":
            # full_kl log-softmaxes its inputs, which leaves log-probabilities unchanged.
            return full_kl(logprob, ref_logprob)
        return kl_penalty(logprob, ref_logprob, self.settings.kl_penalty)

    def compute_rewards(
        self, scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(rewards, non-score rewards, KL) [B, T]: −β·KL per token, the score added at each row's
        last masked token. ``step()`` calls this: override it to shape rewards."""
        kls = self._kl_penalty(logprobs, ref_logprobs)
        terms = per_token_rewards(as_score_tensor(scores, kls.device), kls, masks, self.reward_kl_coef)
        return terms.rewards, terms.non_score_rewards, kls

    def compute_advantages(
        self, values: Optional[Tensor], rewards: Tensor, mask: Tensor
    ) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        """(values, advantages, returns) [B, T] from the advantage estimator. For ``gae`` (TRL's):
        GAE with ``gamma``/``lam`` (``whiten_rewards`` applied), whitened advantages, returns = raw
        advantages + values; values masked as in TRL. A critic-free estimator gets and returns no
        values and no returns (None). ``step()`` calls this: override it to change the estimate."""
        result = ESTIMATE[self.estimator.name](rewards, values, mask, settings_from(self.settings))
        if values is not None:
            values = torch.where(mask.bool(), values, torch.zeros_like(values))
        return values, result.advantages, result.returns

    # (e) PPO epochs ----------------------------------------------------------------------------
    def _optimise(self, batch: PackedBatch, rollout: RolloutScores, advantages: Advantages) -> list[MiniBatchStats]:
        """``ppo_epochs`` passes over the global batch in shuffled mini-batches (early stopping on the
        policy KL when asked); each process trains on its share of every mini-batch."""
        s = self.settings
        global_mini_batch = self.sizes.mini_batch_size * self.accelerator.num_processes
        self.model.train()
        collected: list[MiniBatchStats] = []
        for _ in range(s.ppo_epochs):
            # The generator advances identically on every process: one permutation of the global rows.
            order = torch.randperm(batch.batch_size, generator=self.shuffle_generator)
            epoch_policykl = []
            for start in range(0, batch.batch_size, global_mini_batch):
                stats = self._train_minibatch(batch, order[start : start + global_mini_batch], rollout, advantages)
                collected.append(stats)
                epoch_policykl.append(stats.policykl)
            if s.early_stopping and self._should_stop_early(torch.stack(epoch_policykl).mean()):
                break
        return sum_minibatch_shares(self.accelerator, collected)

    def _train_minibatch(
        self, batch: PackedBatch, rows: Tensor, rollout: RolloutScores, advantages: Advantages
    ) -> MiniBatchStats:
        """One optimisation mini-batch: ``rows`` are its global rows; this process trains on its share.

        Fields named in ``stats.SHARE_FIELDS`` are this process's share of a mean over the global
        mini-batch (summed over processes by :func:`~rlhf_cli.ppo.stats.sum_minibatch_shares`); the others are already global.
        """
        processes = self.accelerator.num_processes
        own_rows = rows if processes == 1 else own_share(rows, self.accelerator.process_index, processes)
        whole = batch.select(rows)
        mb = whole if processes == 1 else batch.select(own_rows)
        token_count = whole.response_mask.sum()
        critic = self.estimator.needs_critic
        with self.accelerator.accumulate(self.model):
            out = response_outputs(self.model, mb, values=critic, logits=False)
            losses = minibatch_losses(out, Rows(own_rows, mb.response_width), rollout, advantages, mb.response_mask,
                                      self.settings, critic=critic, token_count=token_count)
            ratio_mean = self._sum_across_processes(losses.policy.ratio_mean.detach())
            loss = ratio_guard(losses.total, ratio_mean, self.settings.ratio_threshold)
            verdict = self._backward_and_step(loss, processes)
        take_whole = Rows(rows, whole.response_width).take
        whole_rollout = WholeMiniBatch(
            take_whole(advantages.advantages), take_whole(advantages.returns), take_whole(rollout.values), whole.response_mask
        )
        return minibatch_stats(losses.policy, losses.value, losses.kl, loss, response_entropy(out), mb.response_mask, token_count,
                               ratio_mean, self.settings.ratio_threshold, whole_rollout, verdict)

    def _backward_and_step(self, loss: Tensor, processes: int) -> GuardVerdict:
        """Backward pass, gradient clipping and the optimiser step (inside ``accelerator.accumulate``),
        unless the divergence guard (:mod:`rlhf_cli.ppo.guard`) finds the loss or gradient norm non-finite."""
        # The loss is this process's share of the global mini-batch mean; DDP averages the
        # gradients over the processes, so scaling by their number gives the mean's gradient.
        self.accelerator.backward(loss * processes)
        verdict = guard_update(self.accelerator, self.model, loss, self.settings.max_grad_norm)
        if not bool(verdict.skipped):  # the guard's one host sync per mini-batch
            self.optimizer.step()
        self.optimizer.zero_grad()
        return verdict

    def _should_stop_early(self, policykl: Tensor) -> bool:
        """Stop the epochs when the policy moved too far (agreed across processes: one host sync)."""
        policykl = self._sum_across_processes(policykl)
        return bool(policykl > 1.5 * self.settings.target_kl)

    def _sum_across_processes(self, value: Tensor) -> Tensor:
        return sum_across_processes(self.accelerator, value)

    # (f) Stats, the KL controller and the scheduler ------------------------------------------------
    def _step_stats(self, batch: PackedBatch, rollout: RolloutScores, kl: Tensor, non_score: Tensor, scores: Tensor,
                    minibatches: list[MiniBatchStats], kl_coef: float, timer: PhaseTimer, advantages: Advantages) -> StepStats:
        """The step's typed stats over the global batch (timings up to now included)."""
        rollout_record = rollout_stats(kl=kl, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs, non_score=non_score,
                                       mask=batch.response_mask, scores=scores, query_lengths=batch.query_lengths,
                                       response_lengths=batch.response_lengths)
        timer.seconds["total"] = timer.elapsed()
        return assemble_step_stats(rollout_record, minibatches, kl_coef=kl_coef,
                                   learning_rate=self.optimizer.param_groups[0]["lr"], timings=timer.seconds,
                                   critic=self.estimator.needs_critic, kl_loss_coef=self.settings.kl_loss_coef,
                                   advantages=advantages.advantages[batch.response_mask.bool()])

    def _finish_step(self, result: StepStats, batch_size: int) -> None:
        """Warn about skipped and non-finite mini-batches, update the KL controller and scheduler, count the step:
        from the step's typed values, not its flattened metric names."""
        if result.skipped_minibatches > 0:
            warnings.warn(ratio_threshold_warning(self.settings.ratio_threshold, result.skipped_minibatches, self.current_step), stacklevel=3)
        if result.nonfinite_minibatches > 0:
            warnings.warn(nonfinite_warning(result.nonfinite_minibatches, result.minibatches, self.current_step), stacklevel=3)
        # β is unused without the KL in the reward; a non-finite KL would poison the controller for good.
        if self.settings.kl_in_reward and math.isfinite(result.kl):
            self.kl_ctl.update(result.kl, batch_size)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1

    # State for checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything of the trainer an exact continuation needs besides the model weights (see :mod:`rlhf_cli.ppo.state`)."""
        return engine_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (model weights are loaded separately)."""
        restore_engine_state(self, state)
