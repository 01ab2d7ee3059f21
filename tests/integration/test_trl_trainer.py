"""PPOTrainer behaves as legacy TRL 0.11.4's for code written against it (issue 10, points 1-10)."""

from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch
from datasets import Dataset

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
from tests.tiny import make_tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(tokenizer, seed: int = 0):
    return AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(tokenizer, seed=seed))


def _trainer(tokenizer, config=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PPOTrainer(config or PPOConfig(batch_size=2), _policy(tokenizer), tokenizer=tokenizer, **kwargs)


class PairDataset(torch.utils.data.Dataset):
    """TRL's test dataset shape: (query_tensor, response_tensor) tuples of fixed lengths."""

    def __init__(self, size: int) -> None:
        self.rows = [(torch.tensor([3 + i, 4, 5]), torch.tensor([6, 7 + i])) for i in range(size)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index]


# 1. Dataloader --------------------------------------------------------------------------------
def test_tuple_rows_collate_into_stacked_tensors(word_tokenizer):
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=2), dataset=PairDataset(4))
    batches = list(trainer.dataloader)
    assert len(batches) == 2
    for queries, responses in batches:
        assert isinstance(queries, torch.Tensor) and queries.shape == (2, 3)
        assert isinstance(responses, torch.Tensor) and responses.shape == (2, 2)
    seen = sorted(int(q[0]) for queries, _ in batches for q in queries)
    assert seen == [3, 4, 5, 6]  # every row once, shuffled into batches


def test_dict_rows_keep_ragged_lists(word_tokenizer):
    rows = [{"input_ids": torch.arange(3, 3 + n), "query": f"q{n}"} for n in (1, 2, 3, 4)]
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=2), dataset=rows_dataset(rows))
    batch = next(iter(trainer.dataloader))
    assert isinstance(batch["input_ids"], list) and len(batch["input_ids"]) == 2
    assert all(isinstance(text, str) for text in batch["query"])


def rows_dataset(rows):
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return rows[index]

    return Rows()


def test_dataset_smaller_than_the_batch_gives_an_empty_dataloader(word_tokenizer):
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=8), dataset=PairDataset(3))
    assert len(trainer.dataloader) == 0
    assert list(trainer.dataloader) == []


def test_hf_dataset_loses_the_columns_the_model_does_not_take(word_tokenizer):
    data = Dataset.from_dict({"input_ids": [[3, 4], [5, 6]], "query": ["a", "b"], "review": ["x", "y"]})
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=2), dataset=data)
    assert set(next(iter(trainer.dataloader))) == {"input_ids", "query"}
    kept = _trainer(word_tokenizer, PPOConfig(batch_size=2, remove_unused_columns=False), dataset=data)
    assert set(next(iter(kept.dataloader))) == {"input_ids", "query", "review"}


# 2. No dataset ---------------------------------------------------------------------------------
def test_no_dataset_warns_that_batch_size_must_match(word_tokenizer):
    with pytest.warns(UserWarning, match="No dataset was given.*batch_size"):
        trainer = PPOTrainer(PPOConfig(batch_size=2), _policy(word_tokenizer), tokenizer=word_tokenizer)
    assert trainer.dataloader is None


# 3. lr_scheduler ---------------------------------------------------------------------------------
def test_user_lr_scheduler_is_prepared_and_stepped_once_per_step(word_tokenizer):
    from accelerate.scheduler import AcceleratedScheduler

    policy = _policy(word_tokenizer)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = PPOTrainer(
            PPOConfig(batch_size=2, mini_batch_size=1), policy, tokenizer=word_tokenizer,
            optimizer=optimizer, lr_scheduler=scheduler,
        )
    assert isinstance(trainer.lr_scheduler, AcceleratedScheduler)
    assert trainer.lr_scheduler.scheduler is scheduler
    queries, responses = [torch.tensor([3, 4]), torch.tensor([5])], [torch.tensor([6, 7]), torch.tensor([8, 9])]
    first = trainer.step(queries, responses, [1.0, 0.0])
    second = trainer.step(queries, responses, [1.0, 0.0])
    # Four optimiser steps per step() (2 mini-batches x 4 epochs), but one scheduler step.
    assert first["ppo/learning_rate"] == pytest.approx(1e-3)
    assert second["ppo/learning_rate"] == pytest.approx(0.5e-3)
    assert scheduler.last_epoch == 2


# 4. ref_model and num_shared_layers ------------------------------------------------------------------
def test_num_shared_layers_with_a_ref_model_warns_and_is_ignored(word_tokenizer):
    policy = _policy(word_tokenizer)
    reference = create_reference_model(policy)
    with pytest.warns(UserWarning, match="num_shared_layers is ignored"):
        trainer = PPOTrainer(PPOConfig(batch_size=2), policy, reference, word_tokenizer, num_shared_layers=1)
    assert trainer.ref_model is reference
    assert all(p.requires_grad for p in policy.parameters())  # nothing was shared and frozen


# 5. generate(..., generate_ref_response=True) -------------------------------------------------------
def test_generate_ref_response_single_and_list(word_tokenizer):
    trainer = _trainer(word_tokenizer, ref_model=AutoModelForCausalLMWithValueHead.from_pretrained(make_tiny_gpt2(word_tokenizer, seed=5)))
    query = torch.tensor([3, 4, 5])
    kwargs = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    response, ref_response = trainer.generate(query, generate_ref_response=True, **kwargs)
    assert response.shape == ref_response.shape == (1, 7)
    assert torch.equal(response, trainer.generate(query, **kwargs))
    # The reference generated with its own weights (greedy decoding of another model).
    expected_ref = trainer.ref_model.generate(input_ids=query[None], attention_mask=torch.ones(1, 3, dtype=torch.long), pad_token_id=0, **kwargs)
    assert torch.equal(ref_response, expected_ref)

    queries = [query, torch.tensor([6, 7])]
    responses, ref_responses = trainer.generate(queries, generate_ref_response=True, return_prompt=False, **kwargs)
    assert isinstance(responses, list) and isinstance(ref_responses, list) and len(ref_responses) == 2
    assert torch.equal(ref_responses[0], expected_ref[0, 3:])
    assert [len(r) for r in ref_responses] == [4, 4]


# 6 (trainer side). step() goes through compute_rewards, which a subclass may override --------------
def test_step_calls_an_overridden_compute_rewards(word_tokenizer):
    class Shaped(PPOTrainer):
        def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
            rewards, non_score, kls = super().compute_rewards(scores, logprobs, ref_logprobs, masks)
            return rewards, non_score - 1.0 * masks, kls  # what mean_non_score_reward reports

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = Shaped(PPOConfig(batch_size=2), _policy(word_tokenizer), tokenizer=word_tokenizer)
    stats = trainer.step([torch.tensor([3, 4]), torch.tensor([5])], [torch.tensor([6, 7]), torch.tensor([8])], [1.0, 0.0])
    # Untrained policy = reference: KL is 0, so the non-score reward is exactly the subclass's -1.
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(-1.0, abs=1e-6)


# 7. Config mutated after construction ------------------------------------------------------------------
def test_sizes_come_from_the_config_as_it_is_when_the_trainer_is_built(word_tokenizer):
    config = PPOConfig(batch_size=256)
    assert config.mini_batch_size == 128
    config.batch_size = 4  # automatic mini-batch follows: min(4, 128)
    assert (config.mini_batch_size, config.backward_batch_size) == (4, 4)
    config.mini_batch_size = 2
    config.gradient_accumulation_steps = 2
    trainer = _trainer(word_tokenizer, config)
    assert trainer.sizes.mini_batch_size == 2 and trainer.sizes.backward_batch_size == 4
    assert config.backward_batch_size == 4
    assert (config.world_size, config.global_batch_size, config.global_backward_batch_size) == (1, 4, 4)
    assert config.is_encoder_decoder is False and config.is_peft_model is False

    config.mini_batch_size = 3
    with pytest.raises(ValueError, match=r"batch_size=4 is not divisible by mini_batch_size × gradient_accumulation_steps = 3 × 2 = 6"):
        _trainer(word_tokenizer, config)
    assert PPOConfig(batch_size=1).mini_batch_size == 1


def test_accumulation_of_mutated_config_matches_one_bigger_minibatch(word_tokenizer):
    """mini 1 × accumulation 2 gives the weights of mini 2, both set after PPOConfig() (TRL's tolerance)."""

    def run(mini, accumulation):
        config = PPOConfig(batch_size=2, ppo_epochs=1, learning_rate=1e-2)
        config.mini_batch_size = mini
        config.gradient_accumulation_steps = accumulation
        policy = _policy(word_tokenizer)
        sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer, optimizer=sgd)
        trainer.step([torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])], [torch.tensor([9, 10]), torch.tensor([11, 12])], [1.0, -1.0])
        return trainer.model.state_dict()

    small, big = run(1, 2), run(2, 1)
    moved = run(1, 1)
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-3, rtol=0)
    assert any(not torch.allclose(moved[key], big[key], atol=1e-6) for key in big)  # the check can fail


def test_accumulation_holds_inside_the_trainers_own_dataloader_loop(word_tokenizer):
    """step() called while iterating trainer.dataloader: on its last batch Accelerate's end-of-dataloader
    flag must not force an optimiser step on every mini-batch (mini 1 x accumulation 2 == mini 2)."""

    def run(mini, accumulation):
        config = PPOConfig(batch_size=2, mini_batch_size=mini, gradient_accumulation_steps=accumulation, ppo_epochs=1)
        policy = _policy(word_tokenizer)
        sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = PPOTrainer(config, policy, tokenizer=word_tokenizer, optimizer=sgd, dataset=PairDataset(2))
        for queries, responses in trainer.dataloader:  # one batch: the last one
            trainer.step(list(queries), list(responses), [1.0, -1.0])
        return trainer.model.state_dict()

    small, big = run(1, 2), run(2, 1)
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-3, rtol=0)


# 8. Every field of TRL 0.11.4's PPOConfig --------------------------------------------------------------
TRL_PPO_CONFIG_FIELDS = {
    "exp_name": "my_run", "seed": 1, "log_with": None, "task_name": "sentiment", "model_name": "gpt2",
    "query_dataset": "imdb", "reward_model": "sentiment-analysis:lvwerra/distilbert-imdb",
    "remove_unused_columns": True, "tracker_kwargs": {}, "accelerator_kwargs": {}, "project_kwargs": {},
    "tracker_project_name": "trl", "push_to_hub_if_best_kwargs": {}, "steps": 100, "learning_rate": 1e-5,
    "adap_kl_ctrl": True, "init_kl_coef": 0.2, "kl_penalty": "kl", "target": 6.0, "horizon": 10000.0,
    "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "batch_size": 8,
    "forward_batch_size": None, "mini_batch_size": 4, "gradient_accumulation_steps": 1, "world_size": None,
    "ppo_epochs": 4, "max_grad_norm": None, "optimize_cuda_cache": None, "optimize_device_cache": False,
    "early_stopping": False, "target_kl": 1.0, "compare_steps": 1, "ratio_threshold": 10.0,
    "use_score_scaling": False, "use_score_norm": False, "score_clip": None, "whiten_rewards": False,
    "gradient_checkpointing": False, "is_encoder_decoder": None, "is_peft_model": None,
    "backward_batch_size": None, "global_backward_batch_size": None, "global_batch_size": None,
    "dataset_num_proc": None,
}


def test_config_accepts_every_trl_field_and_shows_it():
    config = PPOConfig(**TRL_PPO_CONFIG_FIELDS)
    shown = config.to_dict()
    assert set(TRL_PPO_CONFIG_FIELDS) <= set(shown)
    assert (shown["exp_name"], shown["query_dataset"], shown["steps"]) == ("my_run", "imdb", 100)
    assert shown["backward_batch_size"] == 4  # derived, as TRL's __post_init__ does
    assert config.total_ppo_epochs == 13  # ceil(100 / 8), TRL's formula


def test_push_to_hub_if_best_warns_that_it_has_no_effect():
    with pytest.warns(UserWarning, match="push_to_hub_if_best_kwargs has no effect"):
        PPOConfig(push_to_hub_if_best_kwargs={"repo_id": "me/model"})


def test_gradient_checkpointing_field_enables_it(word_tokenizer):
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=2, gradient_checkpointing=True))
    assert trainer._unwrapped.pretrained_model.is_gradient_checkpointing


# 9. _generate_batched ---------------------------------------------------------------------------------
def test_generate_batched_matches_trl_behaviour(word_tokenizer):
    trainer = _trainer(word_tokenizer)
    queries = [torch.tensor([3, 4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
    lengths = iter([2, 5])
    out = trainer._generate_batched(
        trainer.ref_model, queries, length_sampler=lambda: next(lengths), batch_size=2,
        do_sample=False, min_new_tokens=5, pad_to_multiple_of=8,
    )
    # One length per batch of 2 (TRL draws per batch): 2 new tokens, then 5; the prompt comes first.
    assert [len(o) for o in out] == [3 + 2, 1 + 2, 2 + 5]
    assert all(torch.equal(o[: len(q)], q) for o, q in zip(out, queries))
    for query, output in zip(queries, out):
        alone = trainer.ref_model.generate(
            input_ids=query[None], attention_mask=torch.ones(1, len(query), dtype=torch.long),
            max_new_tokens=len(output) - len(query), do_sample=False, pad_token_id=0,
        )
        assert torch.equal(output, alone[0])  # padding (to 8 columns) changed nothing
    no_prompt = trainer._generate_batched(trainer.ref_model, queries[:1], return_prompt=False, max_new_tokens=3, do_sample=False, remove_padding=False)
    alone = trainer.ref_model.generate(input_ids=queries[0][None], attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(no_prompt[0], alone[0, 3:])


def test_generate_batched_cuts_after_eos_unless_told_not_to(word_tokenizer):
    trainer = _trainer(word_tokenizer)
    stop = 5  # the tokenizer's EOS here; the model's own EOS (1) is never sampled, so generation runs on
    trainer.tokenizer = types.SimpleNamespace(eos_token_id=stop, pad_token_id=0, padding_side="right")
    lm = trainer.ref_model.pretrained_model
    with torch.no_grad():  # constant hidden state, and token 5 is the only one with a nonzero logit
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[stop] = 1.0
    cut = trainer._generate_batched(trainer.ref_model, [torch.tensor([3, 4])], max_new_tokens=4, do_sample=False)
    full = trainer._generate_batched(trainer.ref_model, [torch.tensor([3, 4])], max_new_tokens=4, do_sample=False, remove_padding=False)
    assert cut[0].tolist() == [3, 4, stop]
    assert full[0].tolist() == [3, 4, stop, stop, stop, stop]


# 10. Every trainable parameter has a gradient after step() ---------------------------------------------
def test_every_trainable_parameter_has_a_grad_after_step(word_tokenizer):
    trainer = _trainer(word_tokenizer, PPOConfig(batch_size=2, mini_batch_size=1))
    trainer.optimizer.zero_grad = functools.partial(trainer.optimizer.zero_grad, set_to_none=False)
    trainer.step([torch.tensor([3, 4]), torch.tensor([5, 6, 7])], [torch.tensor([8, 9, 10]), torch.tensor([11])], [1.0, -1.0])
    trainable = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]


# rlhf_cli.core.respond_to_batch ------------------------------------------------------------------------
def test_respond_to_batch_samples_txt_len_tokens_even_through_eos(word_tokenizer):
    """TRL's respond_to_batch samples exactly txt_len tokens; a sampled EOS must not end the response."""
    from rlhf_cli.core import respond_to_batch

    lm = make_tiny_gpt2(word_tokenizer)
    eos = word_tokenizer.eos_token_id
    with torch.no_grad():  # constant hidden state; EOS is the only likely token
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[eos] = 1.0
    response = respond_to_batch(AutoModelForCausalLMWithValueHead.from_pretrained(lm), torch.tensor([[3, 4, 5]]), txt_len=6)
    assert response.tolist() == [[eos] * 6]
    assert lm.generation_config.eos_token_id == eos  # the model's own config is left as it was


# More of TRL's trainer surface ------------------------------------------------------------------------
def test_trainer_save_pretrained_writes_model_and_tokenizer(word_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = _trainer(word_tokenizer)
    trainer.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trainer._unwrapped.pretrained_model.state_dict()[key].cpu()), key  # the model may be on a GPU
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == word_tokenizer.get_vocab()
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert torch.equal(reloaded.v_head.summary.weight, trainer._unwrapped.v_head.summary.weight.cpu())


def test_trl_only_constructor_argument_and_peft_context(word_tokenizer):
    with pytest.warns(UserWarning, match="training_data_collator has no effect"):
        trainer = PPOTrainer(PPOConfig(batch_size=2), _policy(word_tokenizer), tokenizer=word_tokenizer, training_data_collator=lambda rows: rows)
    with trainer.optional_peft_ctx():  # no adapter: a no-op context, as in TRL
        assert trainer.ref_model is not None
