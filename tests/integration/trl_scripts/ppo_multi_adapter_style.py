"""A PPO script in the style of TRL 0.11's multi-adapter example and sentiment-control notebook. The only
change from TRL: `trl` -> `rlhf_cli`.

One base model serves policy, reference and reward: the policy is a LoRA adapter made from
`peft_config`, the reference is the base model with adapters disabled, and the reward is a LoRA
reward model loaded with `reward_adapter` and read with `compute_reward_score`. The prompts are a
`datasets.Dataset` in torch format with a dict collator; generation passes the user's own
`eos_token_id` (-1: never stop early, as the notebook does) and a `LinearLR` schedule runs beside.
$MODEL_NAME and $RM_ADAPTER name the base model and the reward adapter (Hub ids in TRL's example);
the tests run it on a tiny local GPT-2 and a tiny reward adapter.
"""

import os

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

from rlhf_cli import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from rlhf_cli.core import LengthSampler

model_name = os.environ.get("MODEL_NAME", "gpt2")
rm_adapter = os.environ.get("RM_ADAPTER", "trl-lib/gpt2-imdb-rm-adapter")
MAX_NEW_TOKENS = 4

lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
model = AutoModelForCausalLMWithValueHead.from_pretrained(
    model_name,
    device_map=None,
    load_in_8bit=False,
    peft_config=lora_config,
    reward_adapter=rm_adapter,
)
tokenizer = AutoTokenizer.from_pretrained(model_name)
tokenizer.pad_token = tokenizer.eos_token

texts = ["the movie was", "this film is", "the acting was", "the story is", "the ending was", "the music is", "the plot was", "the scenes are"]
input_size = LengthSampler(2, 4)


def tokenize(example):
    example["input_ids"] = tokenizer.encode(example["review"])[: input_size()]
    example["query"] = tokenizer.decode(example["input_ids"])
    return example


dataset = Dataset.from_dict({"review": texts}).map(tokenize, batched=False)
dataset.set_format("torch")


def collator(data):
    return {key: [d[key] for d in data] for key in data[0]}


config = PPOConfig(model_name=model_name, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=2, seed=0)
optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=config.learning_rate)
lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.5, total_iters=2)
ppo_trainer = PPOTrainer(
    config, model, ref_model=None, tokenizer=tokenizer, dataset=dataset, data_collator=collator, optimizer=optimizer, lr_scheduler=lr_scheduler
)

generation_kwargs = {
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
    "eos_token_id": -1,
    "max_new_tokens": MAX_NEW_TOKENS,
}

history = []
for batch in ppo_trainer.dataloader:
    question_tensors = batch["input_ids"]
    response_tensors = ppo_trainer.generate(question_tensors, return_prompt=False, remove_padding=False, **generation_kwargs)
    batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)

    texts = [q + r for q, r in zip(batch["query"], batch["response"])]
    inputs = tokenizer(texts, padding=True, return_tensors="pt").to(ppo_trainer.accelerator.device)
    raw_rewards = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).compute_reward_score(**inputs)
    rewards = [raw_rewards[i, -1, 1] for i in range(len(raw_rewards))]

    stats = ppo_trainer.step(question_tensors, response_tensors, rewards)
    ppo_trainer.log_stats(stats, batch, rewards)
    history.append({"stats": stats, "responses": response_tensors, "rewards": rewards, "inputs": inputs})
