"""A PPO script in legacy TRL 0.11's documented style. The only change from TRL: `trl` -> `rlhf_cli`.

The model comes from $MODEL_NAME (a Hub id or a local directory; "gpt2" in TRL's docs). The tests
run it on a tiny local GPT-2 and check its stats against the documented formulas.
"""

import os

import torch
from transformers import AutoTokenizer

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
from rlhf_cli.core import LengthSampler, respond_to_batch

model_name = os.environ.get("MODEL_NAME", "gpt2")

# 1. The README example ------------------------------------------------------------------------
model = AutoModelForCausalLMWithValueHead.from_pretrained(model_name)
model_ref = create_reference_model(model)
tokenizer = AutoTokenizer.from_pretrained(model_name)
tokenizer.pad_token = tokenizer.eos_token

ppo_config = PPOConfig(batch_size=1, mini_batch_size=1)
query_txt = "This morning I went to the "
query_tensor = tokenizer.encode(query_txt, return_tensors="pt")
response_tensor = respond_to_batch(model, query_tensor)
ppo_trainer = PPOTrainer(ppo_config, model, model_ref, tokenizer)
reward = [torch.tensor(1.0)]
readme_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)


# 2. A training loop over a dataset of tuples, with a scheduler and a reward-shaping subclass ----
LENGTH_PENALTY = 0.01
texts = [
    "the movie was", "this film is", "the acting was", "the story is", "the ending was",
    "the music is", "the plot was", "the scenes are", "the actors were", "the characters are",
]


class QueryDataset(torch.utils.data.Dataset):
    def __init__(self, texts):
        self.queries = [tokenizer.encode(text, return_tensors="pt")[0] for text in texts]

    def __len__(self):
        return len(self.queries)

    def __getitem__(self, index):
        return self.queries[index], torch.tensor(index)


class LengthPenaltyPPOTrainer(PPOTrainer):
    """Every response token costs LENGTH_PENALTY on top of the KL penalty."""

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        rewards, non_score_reward, kls = super().compute_rewards(scores, logprobs, ref_logprobs, masks)
        penalty = LENGTH_PENALTY * masks
        return rewards - penalty, non_score_reward - penalty, kls


config = PPOConfig(
    exp_name="migration",
    model_name=model_name,
    query_dataset="local-reviews",
    reward_model="count-of-good",
    learning_rate=1e-3,
    batch_size=4,
    mini_batch_size=2,
    ppo_epochs=2,
    seed=0,
)
policy = AutoModelForCausalLMWithValueHead.from_pretrained(model_name)
ref_policy = create_reference_model(policy)
optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, policy.parameters()), lr=config.learning_rate)
lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
trainer = LengthPenaltyPPOTrainer(
    config, policy, ref_policy, tokenizer, dataset=QueryDataset(texts), optimizer=optimizer, lr_scheduler=lr_scheduler
)

generation_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True, "pad_token_id": tokenizer.eos_token_id}
output_length_sampler = LengthSampler(2, 6)

history = []
for epoch in range(2):
    for batch in trainer.dataloader:
        query_tensors = list(batch[0])
        response_tensors, ref_response_tensors = trainer.generate(
            query_tensors,
            return_prompt=False,
            length_sampler=output_length_sampler,
            generate_ref_response=True,
            **generation_kwargs,
        )
        responses = tokenizer.batch_decode(response_tensors)
        rewards = [torch.tensor(float(text.split().count("good"))) for text in responses]

        # Monitor the policy/reference log-ratio with TRL's building blocks before the step.
        model_inputs = trainer.prepare_model_inputs(query_tensors, response_tensors)
        with torch.no_grad():
            logprobs, _, _, masks = trainer.batched_forward_pass(trainer.model, query_tensors, response_tensors, model_inputs)
            ref_logprobs, _, _, _ = trainer.batched_forward_pass(trainer.ref_model, query_tensors, response_tensors, model_inputs)

        stats = trainer.step(query_tensors, response_tensors, rewards)
        trainer.log_stats(stats, {"query": tokenizer.batch_decode(query_tensors), "response": responses}, rewards)
        history.append(
            {
                "stats": stats,
                "rewards": rewards,
                "responses": response_tensors,
                "ref_responses": ref_response_tensors,
                "logprobs": logprobs,
                "ref_logprobs": ref_logprobs,
                "masks": masks,
            }
        )
