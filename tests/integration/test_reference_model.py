"""create_reference_model: a frozen, independent copy, or one that shares its first layers with the policy."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig, PreTrainedModel, T5Config, T5ForConditionalGeneration

from rlhf_cli.models import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, create_reference_model

torch.set_num_threads(1)
VOCAB = 60


def gpt2_policy() -> AutoModelForCausalLMWithValueHead:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    return AutoModelForCausalLMWithValueHead.from_pretrained(GPT2LMHeadModel(config))


def t5_policy() -> AutoModelForSeq2SeqLMWithValueHead:
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return AutoModelForSeq2SeqLMWithValueHead.from_pretrained(T5ForConditionalGeneration(config))


def ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def optimizer_step(model: nn.Module) -> None:
    """One SGD step on a loss over logits and values, so every trainable parameter moves."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    logits, _, values = model(input_ids=ids())
    (logits.pow(2).mean() + values.pow(2).mean()).backward()
    optimizer.step()


def test_full_copy_is_frozen_eval_equal_and_independent():
    policy = gpt2_policy()
    reference = create_reference_model(policy)

    assert not reference.training
    assert all(not parameter.requires_grad for parameter in reference.parameters())
    assert all(parameter.requires_grad for parameter in policy.parameters())  # the policy is untouched
    policy_storage = {parameter.data_ptr() for parameter in policy.parameters()}
    assert not policy_storage & {parameter.data_ptr() for parameter in reference.parameters()}
    # Tied weights stay tied inside the copy.
    assert reference.pretrained_model.lm_head.weight is reference.pretrained_model.transformer.wte.weight

    policy.eval()
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids())[0], reference(input_ids=ids())[0])
        assert torch.equal(policy(input_ids=ids())[2], reference(input_ids=ids())[2])

    before = snapshot(reference)
    policy.train()
    optimizer_step(policy)
    assert any(not torch.equal(before[name], parameter) for name, parameter in policy.named_parameters())
    for name, parameter in reference.named_parameters():
        assert torch.equal(before[name], parameter), name


def test_shared_layers_are_the_same_frozen_parameters():
    policy = gpt2_policy()
    reference = create_reference_model(policy, num_shared_layers=2)
    lm, ref_lm = policy.pretrained_model, reference.pretrained_model

    shared = [
        (lm.transformer.wte.weight, ref_lm.transformer.wte.weight),
        (lm.transformer.wpe.weight, ref_lm.transformer.wpe.weight),
        *zip(lm.transformer.h[0].parameters(), ref_lm.transformer.h[0].parameters()),
        *zip(lm.transformer.h[1].parameters(), ref_lm.transformer.h[1].parameters()),
    ]
    for policy_parameter, reference_parameter in shared:
        assert policy_parameter is reference_parameter
        assert not policy_parameter.requires_grad

    unshared = [
        *zip(lm.transformer.h[2].parameters(), ref_lm.transformer.h[2].parameters()),
        *zip(lm.transformer.ln_f.parameters(), ref_lm.transformer.ln_f.parameters()),
        *zip(policy.v_head.parameters(), reference.v_head.parameters()),
    ]
    for policy_parameter, reference_parameter in unshared:
        assert policy_parameter is not reference_parameter
        assert policy_parameter.data_ptr() != reference_parameter.data_ptr()
        assert policy_parameter.requires_grad and not reference_parameter.requires_grad
        assert torch.equal(policy_parameter, reference_parameter)

    # Memory: the reference adds only the unshared parameters.
    distinct = {id(parameter) for model in (policy, reference) for parameter in model.parameters()}
    assert len(distinct) == len(list(policy.parameters())) + len(unshared)

    before = snapshot(reference)
    optimizer_step(policy)
    assert not torch.equal(lm.transformer.h[2].attn.c_attn.weight, ref_lm.transformer.h[2].attn.c_attn.weight)
    for name, parameter in reference.named_parameters():
        assert torch.equal(before[name], parameter), name


def test_t5_shares_the_embedding_and_first_block_of_both_stacks():
    policy = t5_policy()
    reference = create_reference_model(policy, num_shared_layers=1)
    lm, ref_lm = policy.pretrained_model, reference.pretrained_model

    assert lm.shared.weight is ref_lm.shared.weight and not lm.shared.weight.requires_grad
    for stack, ref_stack in ((lm.encoder, ref_lm.encoder), (lm.decoder, ref_lm.decoder)):
        for parameter, ref_parameter in zip(stack.block[0].parameters(), ref_stack.block[0].parameters()):
            assert parameter is ref_parameter and not parameter.requires_grad
        for parameter, ref_parameter in zip(stack.block[1].parameters(), ref_stack.block[1].parameters()):
            assert parameter is not ref_parameter and parameter.requires_grad
        assert stack.final_layer_norm.weight is not ref_stack.final_layer_norm.weight


def test_explicit_pattern_gives_the_same_split_as_the_known_one():
    policy = gpt2_policy()
    reference = create_reference_model(policy, num_shared_layers=1, pattern="transformer.h.{layer}")
    lm, ref_lm = policy.pretrained_model, reference.pretrained_model
    assert lm.transformer.h[0].attn.c_attn.weight is ref_lm.transformer.h[0].attn.c_attn.weight
    assert lm.transformer.h[1].attn.c_attn.weight is not ref_lm.transformer.h[1].attn.c_attn.weight


def test_zero_shared_layers_shares_only_the_embeddings():
    policy = gpt2_policy()
    reference = create_reference_model(policy, num_shared_layers=0)
    lm, ref_lm = policy.pretrained_model, reference.pretrained_model
    assert lm.transformer.wte.weight is ref_lm.transformer.wte.weight
    assert lm.transformer.h[0].attn.c_attn.weight is not ref_lm.transformer.h[0].attn.c_attn.weight


class OddConfig(PretrainedConfig):
    model_type = "rlhf_cli_test_odd"

    def __init__(self, hidden_size: int = 8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class OddLM(PreTrainedModel):
    """A model whose layers live under a name no known architecture uses."""

    config_class = OddConfig

    def __init__(self, config: OddConfig):
        super().__init__(config)
        self.embed = nn.Embedding(10, config.hidden_size)
        self.stack = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size) for _ in range(2))
        self.lm_head = nn.Linear(config.hidden_size, 10)  # a value-head wrapper needs a language-model head


def test_unknown_architecture_asks_for_a_pattern():
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(OddLM(OddConfig()))
    with pytest.raises(ValueError) as error:
        create_reference_model(policy, num_shared_layers=1)
    message = str(error.value)
    assert "not recognised" in message
    assert "stack.0.weight" in message  # shows the user what the names look like
    assert 'pattern="...{layer}..."' in message

    reference = create_reference_model(policy, num_shared_layers=1, pattern="stack.{layer}")
    assert reference.pretrained_model.embed.weight is policy.pretrained_model.embed.weight
    assert reference.pretrained_model.stack[0].weight is policy.pretrained_model.stack[0].weight
    assert reference.pretrained_model.stack[1].weight is not policy.pretrained_model.stack[1].weight


def test_bad_arguments_name_themselves():
    policy = gpt2_policy()
    with pytest.raises(ValueError, match="num_shared_layers=4 exceeds the model's 3 layers"):
        create_reference_model(policy, num_shared_layers=4)
    with pytest.raises(ValueError, match="must contain '\\{layer\\}'"):
        create_reference_model(policy, num_shared_layers=1, pattern="transformer.h")
    with pytest.raises(ValueError, match="num_shared_layers must be >= 0"):
        create_reference_model(policy, num_shared_layers=-1)
    # A failed call froze nothing.
    assert all(parameter.requires_grad for parameter in policy.parameters())
