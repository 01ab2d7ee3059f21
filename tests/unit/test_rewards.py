"""Reward sources, the reward factory and score validation (no models: VADER and Python callables)."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.errors import RewardError
from rlhf_cli.rewards import (
    CallableReward,
    VaderReward,
    WeightedSumReward,
    build_reward,
    describe,
    score_responses,
)
from rlhf_cli.rewards.examples import keyword_bonus, length_penalty
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

PROMPTS = ["The film was", "I thought it", "Honestly,", "Acting:", "Overall"]
RESPONSES = [" wonderful and moving.", " was terrible, a waste.", " fine I guess", " great great", " bad"]


def reward_cfg(**fields):
    """A reward config node with the schema's defaults (as Hydra would compose it)."""
    base = {
        "type": "vader",
        "text": "response",
        "model": None,
        "label": "POSITIVE",
        "output": "logit",
        "batch_size": 16,
        "device": "auto",
        "max_length": 512,
        "function": None,
        "kwargs": {},
        "components": [],
    }
    return OmegaConf.create({**base, **fields})


def component(**fields):
    node = {k: v for k, v in reward_cfg().items() if k != "components"}
    return {**node, "weight": 1.0, **fields}


# --- VADER -------------------------------------------------------------------------------------


def test_vader_matches_the_lexicon_and_orders_obvious_texts():
    reward = VaderReward()
    scores = reward(["", ""], ["I love this wonderful, brilliant film!", "A terrible, awful, boring mess."])
    analyzer = SentimentIntensityAnalyzer()
    assert scores == [
        analyzer.polarity_scores("I love this wonderful, brilliant film!")["compound"],
        analyzer.polarity_scores("A terrible, awful, boring mess.")["compound"],
    ]
    assert scores[0] > 0.5 > -0.5 > scores[1]


def test_vader_full_scores_prompt_plus_response():
    prompts, responses = ["What a horrible, awful"], [" day"]
    full = VaderReward(text="full")(prompts, responses)
    response_only = VaderReward(text="response")(prompts, responses)
    analyzer = SentimentIntensityAnalyzer()
    assert full == [analyzer.polarity_scores("What a horrible, awful day")["compound"]]
    assert response_only == [0.0]
    assert full[0] < -0.5


def test_vader_rejects_unknown_text_mode():
    with pytest.raises(RewardError, match=r"reward\.text=prompt .*response, full"):
        VaderReward(text="prompt")


# --- callables -----------------------------------------------------------------------------------


def test_callable_from_module_passes_kwargs():
    reward = CallableReward("rlhf_cli.rewards.examples:length_penalty", {"target_words": 2})
    responses = ["one two", "one two three four", ""]
    assert reward(["p"] * 3, responses) == [0.0, -2.0, -2.0]
    assert describe(reward) == "callable(rlhf_cli.rewards.examples:length_penalty)"


def test_example_keyword_bonus_counts_whole_words():
    assert keyword_bonus(["", ""], ["Great, GREAT fun!", "greatest"], keywords=("great", "fun")) == [3.0, 0.0]
    assert length_penalty([""], ["a b c"], target_words=3) == [0.0]


def test_callable_from_file_path(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            def score(prompts, responses, bonus=0.0, scale=1.0):
                return [scale * len(r) + bonus for r in responses]
            """
        )
    )
    reward = CallableReward(f"{path}:score", {"bonus": 0.5, "scale": 2.0})
    assert reward(["a", "b"], ["xyz", ""]) == [6.5, 0.5]


def test_callable_relative_file_path(tmp_path, monkeypatch):
    (tmp_path / "rel.py").write_text("def f(prompts, responses):\n    return [1.0 for _ in responses]\n")
    monkeypatch.chdir(tmp_path)
    assert CallableReward("./rel.py:f")(["a"], ["b"]) == [1.0]


def test_callable_missing_module_names_it():
    with pytest.raises(RewardError, match=r"reward\.function=no_such_pkg_xyz\.mod:f: there is no module named 'no_such_pkg_xyz'"):
        CallableReward("no_such_pkg_xyz.mod:f")


def test_callable_module_file_in_cwd_suggests_path_form(tmp_path, monkeypatch):
    (tmp_path / "localrewards.py").write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.chdir(tmp_path)
    # Under the `rlhf` console script the working directory is not on sys.path; make it so here too.
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    with pytest.raises(RewardError, match=r"name it by path instead \(reward\.function=\./localrewards\.py:f\)"):
        CallableReward("localrewards:f")


def test_callable_missing_function_lists_the_module_functions(tmp_path):
    path = tmp_path / "funcs.py"
    path.write_text("import os\n\ndef alpha(p, r):\n    return []\n\ndef beta(p, r):\n    return []\n\n_hidden = 1\n")
    with pytest.raises(RewardError) as info:
        CallableReward(f"{path}:gamma")
    message = str(info.value)
    assert "has no function 'gamma'; functions it has: alpha, beta." in message
    assert "os" not in message.split("functions it has:")[1]


def test_callable_file_that_raises_on_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise ImportError('needs package foo')\n")
    with pytest.raises(RewardError, match=r"raised ImportError: needs package foo") as info:
        CallableReward(f"{path}:f")
    assert isinstance(info.value.__cause__, ImportError)


def test_callable_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(RewardError, match=r"the file '.*nope\.py' does not exist"):
        CallableReward(f"{tmp_path}/nope.py:f")
    with pytest.raises(RewardError, match=r"must have the form 'package\.module:function'"):
        CallableReward("rlhf_cli.rewards.examples.length_penalty")


def test_callable_not_callable_and_bad_kwargs():
    with pytest.raises(RewardError, match=r"'__doc__' in 'rlhf_cli\.rewards\.examples' is a str, not a function"):
        CallableReward("rlhf_cli.rewards.examples:__doc__")
    with pytest.raises(RewardError, match=r"unexpected keyword argument 'target'.*reward\.kwargs"):
        CallableReward("rlhf_cli.rewards.examples:length_penalty", {"target": 3})


# --- score validation ----------------------------------------------------------------------------


def fails_on_index_3(prompts, responses):
    return [1.0 / (0 if "boom" in r else 1) for r in responses]


def test_score_responses_returns_float32_per_sample():
    scores = score_responses(lambda p, r: [len(x) for x in r], PROMPTS, RESPONSES)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.tolist() == [float(len(r)) for r in RESPONSES]


@pytest.mark.parametrize(
    "returned",
    [
        np.arange(3, dtype=np.float64),
        torch.arange(3, dtype=torch.bfloat16),
        (0, 1, 2),
        [torch.tensor(0.0), np.float32(1.0), np.array(2)],
        torch.arange(3.0, requires_grad=True),
    ],
)
def test_score_responses_accepts_numeric_sequences(returned):
    scores = score_responses(lambda p, r: returned, ["a"] * 3, ["b"] * 3)
    assert scores.tolist() == [0.0, 1.0, 2.0]


def test_raising_function_names_the_failing_sample():
    responses = ["ok", "fine", "good", "boom here", "boom again"]
    with pytest.raises(RewardError) as info:
        score_responses(fails_on_index_3, PROMPTS, responses)
    message = str(info.value)
    assert "raised ZeroDivisionError: float division by zero on sample 3" in message
    assert "prompt='Acting:', response='boom here'" in message
    assert "fails_on_index_3" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_batch_only_failure_says_so():
    def needs_two(prompts, responses):
        if len(responses) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(RewardError, match=r"raised RuntimeError: batch too big on the batch of 5 samples, though no single") as info:
        score_responses(needs_two, PROMPTS, RESPONSES)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_long_texts_are_truncated_in_messages():
    with pytest.raises(RewardError) as info:
        score_responses(lambda p, r: 1 / 0, ["x" * 500], ["y" * 500])
    assert "x" * 100 not in str(info.value) and "..." in str(info.value)


def test_wrong_count_gives_both_counts():
    with pytest.raises(RewardError, match=r"returned 4 scores for 5 samples"):
        score_responses(lambda p, r: [0.0] * 4, PROMPTS, RESPONSES)


@pytest.mark.parametrize("bad", ["0.5", True, None, np.bool_(False), [1.0], torch.tensor([1.0]), 1j])
def test_non_number_names_index_and_value(bad):
    returned = [0.0, 0.0, bad, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"at index 2, which is not a number") as info:
        score_responses(lambda p, r: returned, PROMPTS, RESPONSES)
    assert repr(bad)[:20] in str(info.value)


@pytest.mark.parametrize("returned", [0.5, "abc", {"a": 1}, (x for x in range(5)), np.zeros((5, 1)), torch.tensor(1.0)])
def test_non_sequence_results_are_rejected(returned):
    with pytest.raises(RewardError, match=r"one number per sample|must return a list"):
        score_responses(lambda p, r: returned, PROMPTS, RESPONSES)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_names_the_index(bad):
    with pytest.raises(RewardError, match=rf"returned {bad} at index 1 \(prompt='I thought it'"):
        score_responses(lambda p, r: [0.0, bad, 0.0, 0.0, 0.0], PROMPTS, RESPONSES)


def test_float32_overflow_is_reported():
    with pytest.raises(RewardError, match=r"index 0, which overflows float32"):
        score_responses(lambda p, r: [1e300], ["a"], ["b"])


def test_nan_from_tensor_is_caught():
    with pytest.raises(RewardError, match=r"returned nan at index 0"):
        score_responses(lambda p, r: torch.tensor([math.nan, 1.0]), ["a", "b"], ["c", "d"])


# --- weighted sum and factory ---------------------------------------------------------------------


def test_weighted_sum_equals_weighted_parts():
    vader = VaderReward()
    lengths = CallableReward("rlhf_cli.rewards.examples:length_penalty", {"target_words": 3})
    reward = WeightedSumReward([(0.5, vader, "vader"), (-2.0, lengths, "len")])
    expected = [0.5 * v - 2.0 * n for v, n in zip(vader(PROMPTS, RESPONSES), lengths(PROMPTS, RESPONSES))]
    assert reward(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-12)
    assert repr(reward) == "weighted_sum(0.5*vader + -2*len)"


def test_weighted_sum_names_the_bad_component():
    reward = WeightedSumReward([(1.0, VaderReward(), "vader"), (1.0, lambda p, r: [0.0], "short")])
    with pytest.raises(RewardError, match=r"short \(in the weighted sum\) returned 1 scores for 2 samples"):
        score_responses(reward, ["a", "b"], ["c", "d"])


def test_build_reward_vader_and_callable_from_config():
    vader = build_reward(reward_cfg(type="vader", text="full"))
    assert isinstance(vader, VaderReward) and vader.text == "full"
    callable_reward = build_reward(
        reward_cfg(type="callable", function="rlhf_cli.rewards.examples:keyword_bonus", kwargs={"keywords": ["bad"]})
    )
    assert callable_reward.kwargs == {"keywords": ["bad"]} and type(callable_reward.kwargs) is dict
    assert callable_reward(PROMPTS, RESPONSES) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_build_weighted_sum_from_config():
    cfg = reward_cfg(
        type="weighted_sum",
        components=[
            component(type="vader", weight=2.0),
            component(type="callable", weight=0.25, function="rlhf_cli.rewards.examples:length_penalty", kwargs={"target_words": 1}),
        ],
    )
    reward = build_reward(cfg)
    vader = VaderReward()(PROMPTS, RESPONSES)
    lengths = length_penalty(PROMPTS, RESPONSES, target_words=1)
    assert score_responses(reward, PROMPTS, RESPONSES).tolist() == pytest.approx(
        [2.0 * v + 0.25 * n for v, n in zip(vader, lengths)], abs=1e-6
    )


def test_build_reward_errors_name_the_config_key():
    with pytest.raises(RewardError, match=r"Unknown reward\.type 'sentiment'; valid types are vader, classifier, callable, learned, weighted_sum"):
        build_reward(reward_cfg(type="sentiment"))
    with pytest.raises(RewardError, match=r"reward\.type=classifier needs reward\.model="):
        build_reward(reward_cfg(type="classifier"))
    with pytest.raises(RewardError, match=r"reward\.type=callable needs reward\.function="):
        build_reward(reward_cfg(type="callable"))
    with pytest.raises(RewardError, match=r"reward\.components\[1\]\.type=callable needs reward\.components\[1\]\.function="):
        build_reward(reward_cfg(type="weighted_sum", components=[component(), component(type="callable")]))
    with pytest.raises(RewardError, match=r"reward\.components\[0\]\.type=weighted_sum: weighted sums cannot be nested"):
        build_reward(reward_cfg(type="weighted_sum", components=[component(type="weighted_sum")]))
    with pytest.raises(RewardError, match=r"Unknown reward\.components\[0\]\.type 'x'; valid types are vader, classifier, callable, learned\."):
        build_reward(reward_cfg(type="weighted_sum", components=[component(type="x")]))
    with pytest.raises(RewardError, match=r"reward\.type=weighted_sum needs reward\.components"):
        build_reward(reward_cfg(type="weighted_sum"))
    with pytest.raises(RewardError, match=r"reward\.components is only used with reward\.type=weighted_sum"):
        build_reward(reward_cfg(type="vader", components=[component()]))
    with pytest.raises(RewardError, match=r"reward\.components\[0\]\.weight=nan must be a finite number"):
        build_reward(reward_cfg(type="weighted_sum", components=[component(weight=float("nan"))]))
    with pytest.raises(RewardError, match=r"reward\.components\[0\]\.text=all is not a VADER text mode"):
        build_reward(reward_cfg(type="weighted_sum", components=[component(text="all")]))
