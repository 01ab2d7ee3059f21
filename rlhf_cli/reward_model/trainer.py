"""Training a scalar reward model on preference pairs: the library API behind ``rlhf reward``.

Example (what ``rlhf reward`` does, without the run directory)::

    from rlhf_cli.reward_model import RewardModelTrainer, tokenize_pairs, PreferenceRows
    from rlhf_cli.reward_model.backbone import load_reward_backbone

    backbone = load_reward_backbone(model_cfg)     # a causal LM + scalar head, or a sequence classifier
    rows = PreferenceRows(prompts, chosen, prompts, rejected)
    trainer = RewardModelTrainer(backbone.model, backbone.tokenizer,
                                 tokenize_pairs(rows, backbone.tokenizer, 512, backbone.head),
                                 learning_rate=1e-4, batch_size=16, head=backbone.head)
    for step in range(trainer.batches_per_epoch):
        stats = trainer.step(epoch=0, batch_in_epoch=step)          # loss, accuracy, margin of the batch

Each step takes one global batch of ``batch_size`` pairs (the epoch's order is a permutation seeded by
(seed, epoch), so a step's pairs depend on its position alone: exact resume needs no data state). Under
several processes each scores its contiguous share of the batch; chosen and rejected texts go through
the model in one forward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator

from rlhf_cli.data.preferences import PreferencePairs
from rlhf_cli.ppo.guard import check_update, gradient_norm
from rlhf_cli.reward_model.bradley_terry import bradley_terry_loss, pair_correct, pair_losses, pair_weights
from rlhf_cli.models.reward_scoring import VALUE_HEAD, pad_id_of, padded_batch, sequence_scores

_ORDER_STREAM = 4  # NumPy stream of the pair order (independent of every other seeded draw)


def _adamw(params: list[torch.nn.Parameter], **options: Any) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel for these parameters (float tensors on CPU or CUDA): one
    pass per parameter without the for-loop version's temporaries of each parameter's size, so a step
    is faster and its peak memory lower; the for-loop version elsewhere."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, ValueError):  # no fused kernel for these tensors' device or dtype
        return torch.optim.AdamW(params, **options)


class RewardModelTrainer:
    """AdamW on the Bradley–Terry loss of ``pairs``; ``model`` is a value-head causal LM (``head="value_head"``)
    or an ``AutoModelForSequenceClassification`` with one label (``head="sequence_classification"``), and
    ``pairs`` were tokenised for that head (``tokenize_pairs(..., head=head)``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        pairs: PreferencePairs,
        *,
        learning_rate: float,
        batch_size: int,
        seed: int = 0,
        ties: str = "skip",
        center_rewards_coefficient: float = 0.0,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        max_grad_norm: Optional[float] = 1.0,
        accelerator: Optional[Accelerator] = None,
        head: str = VALUE_HEAD,
    ) -> None:
        self.accelerator = accelerator or Accelerator()
        self.pairs, self.batch_size, self.seed, self.ties = pairs, int(batch_size), int(seed), ties
        self.center = float(center_rewards_coefficient)
        self.max_grad_norm = max_grad_norm
        processes = self.accelerator.num_processes
        if self.batch_size % processes:
            raise ValueError(f"batch_size={batch_size} must divide by the number of processes ({processes}).")
        self.pad_id, self.head = pad_id_of(tokenizer), head
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _adamw(params, lr=learning_rate, weight_decay=weight_decay, eps=adam_eps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch (a last partial batch is left out, so every step has batch_size pairs)."""
        return len(self.pairs) // self.batch_size

    def batch_indices(self, epoch: int, batch_in_epoch: int) -> list[int]:
        """The pair indices of one global batch."""
        order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(len(self.pairs))
        return order[batch_in_epoch * self.batch_size:(batch_in_epoch + 1) * self.batch_size].tolist()

    def _share(self, indices: list[int]) -> list[int]:
        size = len(indices) // self.accelerator.num_processes
        start = self.accelerator.process_index * size
        return indices[start:start + size]

    def _tensors(self, indices: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        pairs = self.pairs
        sequences = [pairs.chosen_ids[i] for i in indices] + [pairs.rejected_ids[i] for i in indices]
        margin = torch.tensor([pairs.margins[i] for i in indices], dtype=torch.float32, device=device)
        tie = torch.tensor([pairs.ties[i] for i in indices], dtype=torch.bool, device=device)
        return padded_batch(sequences, self.pad_id, device, self.head), margin, tie

    def step(self, epoch: int, batch_in_epoch: int) -> dict[str, float]:
        """One optimisation step on the global batch at (epoch, batch_in_epoch); returns its statistics
        over the whole batch (all processes): loss, accuracy, margin, chosen/rejected means, grad norm."""
        self.model.train()
        everyone = self.batch_indices(epoch, batch_in_epoch)
        mine = self._share(everyone)
        batch, margin, tie = self._tensors(mine)
        scores = sequence_scores(self.model, batch, self.head)
        chosen, rejected = scores[: len(mine)], scores[len(mine):]
        # Normalised by the global batch's counted pairs over the processes: the all-reduced mean of the
        # processes' gradients is then the gradient of the global mean loss, however the pairs split.
        all_ties = torch.tensor([self.pairs.ties[i] for i in everyone], dtype=torch.bool)
        counted = float(pair_weights(all_ties, len(everyone), self.ties).sum())
        loss = bradley_terry_loss(chosen, rejected, margin=margin, tie=tie, ties=self.ties,
                                  center_coefficient=self.center, normaliser=counted / self.accelerator.num_processes)
        self.accelerator.backward(loss)
        # The divergence guard PPO uses: a non-finite loss or gradient norm skips the update (the
        # weights and the optimiser state stay as they were); the stats say so.
        norm = gradient_norm(self.accelerator, self.model, self.max_grad_norm)  # clipped to max_grad_norm if set
        verdict = check_update(self.accelerator, loss, norm)
        skipped = bool(verdict.skipped)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = self._stats(chosen.detach(), rejected.detach(), margin, tie, float(norm) if norm is not None else float("nan"))
        stats.update({"train/skipped_update": float(skipped), "train/nonfinite_loss": float(verdict.loss_nonfinite)})
        return stats

    def _stats(self, chosen, rejected, margin, tie, grad_norm: float) -> dict[str, float]:
        gather = self.accelerator.gather
        chosen, rejected, margin, tie = gather(chosen), gather(rejected), gather(margin), gather(tie)
        weights = pair_weights(tie, chosen.shape[0], self.ties, device=chosen.device)
        count = max(float(weights.sum()), 1.0)
        decisive = ~tie
        return {
            "train/loss": float((pair_losses(chosen, rejected, margin, tie, self.ties) * weights).sum()) / count,
            "train/accuracy": float(pair_correct(chosen[decisive], rejected[decisive]).mean()) if decisive.any() else float("nan"),
            "train/margin": float((chosen - rejected)[decisive].mean()) if decisive.any() else float("nan"),
            "train/chosen_mean": float(chosen.mean()),
            "train/rejected_mean": float(rejected.mean()),
            "train/grad_norm": grad_norm,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)
