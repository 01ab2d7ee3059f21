"""logits_to_keep on every transformers release (issue 24): a model whose forward takes no
logits_to_keep (GPT-J, or GPT-2 under transformers 4.46), or takes only an int (4.57), gives the value-head
wrapper the same logits and values as slicing the full output."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from rlhf_cli import AutoModelForCausalLMWithValueHead
from rlhf_cli.models.logit_positions import keep_positions
from rlhf_cli.ppo.forward import response_outputs
from rlhf_cli.rollout.packing import pack_batch
from tests.tiny import make_tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


class NoKeepGPT2(GPT2LMHeadModel):
    """A causal LM whose forward has no logits_to_keep."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None, output_hidden_states=None, **kwargs):
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=output_hidden_states
        )


class IntKeepGPT2(NoKeepGPT2):
    """A causal LM whose forward takes logits_to_keep as an int only (its module has no slicing helper)."""

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None, output_hidden_states=None, logits_to_keep: int = 0, **kwargs):
        if not isinstance(logits_to_keep, int):
            raise TypeError("this model takes logits_to_keep as an int only")
        outputs = super().forward(input_ids, attention_mask, position_ids=position_ids, output_hidden_states=output_hidden_states)
        outputs.logits = outputs.logits[:, -logits_to_keep:] if logits_to_keep else outputs.logits
        return outputs


@pytest.fixture(scope="module")
def models(word_tokenizer):
    """The same weights as a stock GPT-2 and as the two restricted classes, each with the same head."""
    stock = make_tiny_gpt2(word_tokenizer)
    wrapped = {}
    for cls in (GPT2LMHeadModel, NoKeepGPT2, IntKeepGPT2):
        language_model = cls(stock.config)
        language_model.load_state_dict(stock.state_dict())
        model = AutoModelForCausalLMWithValueHead.from_pretrained(language_model).eval()
        if wrapped:
            model.v_head.load_state_dict(wrapped[GPT2LMHeadModel].v_head.state_dict())
        wrapped[cls] = model
    return wrapped


INPUTS = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
MASK = torch.tensor([[False, False, False, True, True, False, False], [False, True, False, True, True, True, True]])


@pytest.mark.parametrize(
    "keep", [0, 3, torch.tensor([1, 4, 6]), torch.tensor([[2, 3], [5, 6]]), MASK], ids=["all", "last3", "shared", "per_row", "mask"]
)
@pytest.mark.parametrize("restricted", [NoKeepGPT2, IntKeepGPT2], ids=["no_keep", "int_keep"])
def test_positions_match_slicing_the_full_output(models, keep, restricted):
    attention_mask = (INPUTS != 0).long()
    with torch.no_grad():
        full_logits, _, full_values = models[GPT2LMHeadModel](INPUTS, attention_mask=attention_mask)
        logits, _, values = models[restricted](INPUTS, attention_mask=attention_mask, logits_to_keep=keep)
    torch.testing.assert_close(logits, keep_positions(full_logits, keep))
    torch.testing.assert_close(values, keep_positions(full_values, keep))


@pytest.mark.parametrize("restricted", [NoKeepGPT2, IntKeepGPT2], ids=["no_keep", "int_keep"])
def test_step_forward_with_ragged_responses_runs_on_restricted_models(models, restricted):
    """The packed path (responses of different lengths) asks for a boolean mask of positions."""
    queries = [torch.tensor([3, 4, 5]), torch.tensor([6])]
    responses = [torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14])]
    batch = pack_batch(queries, responses, pad_token_id=0, is_encoder_decoder=False)
    with torch.no_grad():
        expected = response_outputs(models[GPT2LMHeadModel], batch)
        got = response_outputs(models[restricted], batch)
    torch.testing.assert_close(got.logprobs, expected.logprobs)
    torch.testing.assert_close(got.values, expected.values)
