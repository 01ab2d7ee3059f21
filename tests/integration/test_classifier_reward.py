"""ClassifierReward against a tiny BERT classifier saved to disk (built from config, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.errors import ModelLoadError, RewardError
from rlhf_cli.rewards import ClassifierReward, build_reward, score_responses

WORDS = "the a movie film was is great good bad awful terrible fun boring i loved hated it plot . , !".split()
TEXTS_PROMPTS = ["The movie was", "I", "It is", "The plot", "A film", "Fun", "The", "Boring"]
TEXTS_RESPONSES = [
    " great fun !",
    " loved it , the plot was good",
    " bad",
    " was awful . awful . terrible",
    " unknownword great",
    "",
    " movie movie movie movie movie movie movie movie movie",
    " i hated it",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A 2-layer BERT with labels {0: NEGATIVE, 1: POSITIVE} and a word-level tokenizer ([CLS] x [SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    path = tmp_path_factory.mktemp("tiny-bert-classifier")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def manual_logits(classifier_dir, texts):
    """Naive reference: each text alone through a freshly loaded model, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            rows.append(model(**tokenizer(text, return_tensors="pt")).logits[0])
    return torch.stack(rows)  # [n, 2]


def test_logit_and_probability_match_a_manual_forward(classifier_dir):
    expected = manual_logits(classifier_dir, TEXTS_RESPONSES)
    logit = ClassifierReward(str(classifier_dir), label="POSITIVE", output="logit", batch_size=3)
    probability = ClassifierReward(str(classifier_dir), label="POSITIVE", output="probability", batch_size=3)
    assert torch.tensor(logit(TEXTS_PROMPTS, TEXTS_RESPONSES)) == pytest.approx(expected[:, 1], abs=1e-5)
    assert torch.tensor(probability(TEXTS_PROMPTS, TEXTS_RESPONSES)) == pytest.approx(expected.softmax(-1)[:, 1], abs=1e-6)
    negative = ClassifierReward(str(classifier_dir), label="negative")  # case-insensitive
    assert negative.label == "NEGATIVE" and negative.label_index == 0
    assert torch.tensor(negative(TEXTS_PROMPTS, TEXTS_RESPONSES)) == pytest.approx(expected[:, 0], abs=1e-5)


def test_batching_does_not_change_scores(classifier_dir):
    one = ClassifierReward(str(classifier_dir), batch_size=1)(TEXTS_PROMPTS, TEXTS_RESPONSES)
    eight = ClassifierReward(str(classifier_dir), batch_size=8)(TEXTS_PROMPTS, TEXTS_RESPONSES)
    assert eight == pytest.approx(one, abs=1e-5)
    assert len(set(one)) > 1  # the scores do depend on the text


def test_full_text_scores_prompt_plus_response(classifier_dir):
    expected = manual_logits(classifier_dir, [p + r for p, r in zip(TEXTS_PROMPTS, TEXTS_RESPONSES)])
    full = ClassifierReward(str(classifier_dir), text="full")(TEXTS_PROMPTS, TEXTS_RESPONSES)
    assert torch.tensor(full) == pytest.approx(expected[:, 1], abs=1e-5)


def test_truncation_at_max_length(classifier_dir):
    long_text = " great" * 200  # longer than the model's 64 positions
    expected = manual_logits(classifier_dir, [" great" * 8])  # [CLS] + 8 words + [SEP] = 10 tokens
    scores = ClassifierReward(str(classifier_dir), max_length=10)([""], [long_text])
    assert scores == pytest.approx(expected[:, 1].tolist(), abs=1e-5)


def test_unknown_label_lists_the_model_labels(classifier_dir):
    with pytest.raises(RewardError, match=r"has no label 'joy' \(reward\.label\); its labels are NEGATIVE, POSITIVE"):
        ClassifierReward(str(classifier_dir), label="joy")


def test_missing_model_directory_names_the_config_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"reward classifier path '.*nowhere' does not exist\. Point reward\.model="):
        ClassifierReward(str(tmp_path / "nowhere"))


def test_uncached_hub_id_offline_fails_fast():
    with pytest.raises(ModelLoadError, match=r"Hub is offline .* reward\.model=/path/to/that/directory"):
        ClassifierReward("someone/not-a-cached-classifier")


def test_bad_options_are_reward_errors(classifier_dir):
    with pytest.raises(RewardError, match=r"reward\.output=score is not a classifier output; use one of logit, probability"):
        ClassifierReward(str(classifier_dir), output="score")
    with pytest.raises(RewardError, match=r"reward\.device=gpu0 is not a device"):
        ClassifierReward(str(classifier_dir), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(RewardError, match=r"reward\.device=cuda:0 asks for CUDA"):
            ClassifierReward(str(classifier_dir), device="cuda:0")


def test_build_reward_classifier_component(classifier_dir):
    base = {
        "type": "classifier", "text": "response", "model": str(classifier_dir), "label": "POSITIVE", "output": "probability",
        "batch_size": 4, "device": "cpu", "max_length": 64, "function": None, "kwargs": {},
    }
    cfg = OmegaConf.create({**base, "type": "weighted_sum", "components": [{**base, "weight": 3.0}]})
    reward = build_reward(cfg)
    scores = score_responses(reward, TEXTS_PROMPTS, TEXTS_RESPONSES)
    expected = manual_logits(classifier_dir, TEXTS_RESPONSES).softmax(-1)[:, 1] * 3.0
    assert scores.dtype == torch.float32
    assert scores == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ModelLoadError, match=r"reward\.components\[0\]\.model="):
        build_reward(OmegaConf.create({**base, "type": "weighted_sum", "components": [{**base, "weight": 1.0, "model": "./missing"}]}))
