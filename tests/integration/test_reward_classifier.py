"""Reward models on sequence-classification backbones (issue 19 point 1): a GPT-2 and a BERT classifier
with one label, built from config and loaded as `model=local`, learn the planted preference, and the
learned-reward option scores them exactly as the trained model's forward does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from rlhf_cli.config.schema import ModelConfig
from rlhf_cli.reward_model.backbone import is_sequence_classifier, load_reward_backbone, save_sequence_classifier
from rlhf_cli.reward_model.data import tokenize_pairs
from rlhf_cli.reward_model.evaluate import score_model_on_pairs
from rlhf_cli.reward_model.scoring import SEQUENCE_CLASSIFICATION, VALUE_HEAD, ScoringRule, encode_texts
from rlhf_cli.reward_model.trainer import RewardModelTrainer
from rlhf_cli.rewards.learned import load_learned_reward
from tests.integration.test_reward_model import _planted_rows
from tests.tiny import WORDS, make_word_tokenizer


def _bert_tokenizer():
    """A word-level tokenizer that wraps a text in [CLS] ... [SEP], as BERT's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def _save_gpt2_classifier(path, tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _save_bert_classifier(path, tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


BACKBONES = {"gpt2": (make_word_tokenizer, _save_gpt2_classifier), "bert": (_bert_tokenizer, _save_bert_classifier)}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def classifier_dir(request, tmp_path_factory):
    make_tokenizer, save = BACKBONES[request.param]
    path = tmp_path_factory.mktemp(f"{request.param}-classifier")
    save(path, make_tokenizer())
    return path


def _local(path, **fields):
    return OmegaConf.structured(ModelConfig(source="pretrained", name_or_path=str(path), **fields))


def test_which_checkpoints_are_classifier_backbones():
    from transformers import BertConfig, DistilBertConfig, GPT2Config, T5Config

    assert is_sequence_classifier(GPT2Config(architectures=["GPT2ForSequenceClassification"]))
    assert is_sequence_classifier(BertConfig(architectures=["BertForMaskedLM"]))  # an encoder's pre-training head
    assert is_sequence_classifier(DistilBertConfig())  # no causal LM exists for the type
    assert not is_sequence_classifier(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert not is_sequence_classifier(T5Config(architectures=["T5ForConditionalGeneration"]))


def test_special_tokens_stay_when_a_long_text_is_cut():
    tokenizer = _bert_tokenizer()
    ids, cut = encode_texts(tokenizer, ["the movie was good", "bad"], 4, SEQUENCE_CLASSIFICATION)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids == [[cls, *tokenizer.convert_tokens_to_ids(["was", "good"]), sep], [cls, tokenizer.convert_tokens_to_ids("bad"), sep]]
    assert cut == [True, False]
    assert encode_texts(tokenizer, ["the movie"], 4, VALUE_HEAD)[0] == [tokenizer.convert_tokens_to_ids(["the", "movie"])]


def test_classifier_learns_the_planted_preference_and_the_learned_reward_scores_like_its_forward(classifier_dir, tmp_path, one_thread):
    torch.manual_seed(0)
    backbone = load_reward_backbone(_local(classifier_dir))
    assert backbone.head == SEQUENCE_CLASSIFICATION and backbone.model.config.num_labels == 1
    tokenizer = backbone.tokenizer
    train = tokenize_pairs(_planted_rows(512, seed=0), tokenizer, 64, SEQUENCE_CLASSIFICATION)
    heldout = tokenize_pairs(_planted_rows(200, seed=1), tokenizer, 64, SEQUENCE_CLASSIFICATION)
    trainer = RewardModelTrainer(backbone.model, tokenizer, train, learning_rate=3e-3, batch_size=16,
                                 accelerator=Accelerator(cpu=True), head=SEQUENCE_CLASSIFICATION)
    for epoch in range(2):
        for batch in range(trainer.batches_per_epoch):
            trainer.step(epoch, batch)
    model = trainer.unwrapped_model
    result = score_model_on_pairs("learned", model, tokenizer, heldout, batch_size=64, device="cpu", head=SEQUENCE_CLASSIFICATION)
    assert result.accuracy >= 0.95, result.line()

    final = tmp_path / "rm" / "final"
    save_sequence_classifier(model, tokenizer, final)
    ScoringRule(max_length=5, head=SEQUENCE_CLASSIFICATION).save(final)
    assert json.loads((final / "reward_model.json").read_text())["padding_side"] == "right"
    reward = load_learned_reward(tmp_path / "rm", batch_size=3, device="cpu")
    prompts = ["the movie", "a film that", "i"]
    responses = [" was good", " was really really bad and boring", " loved it"]
    scores = reward(prompts, responses)
    model.eval()
    for prompt, response, score in zip(prompts, responses, scores):
        ids = encode_texts(tokenizer, [prompt + response], 5, SEQUENCE_CLASSIFICATION)[0][0]  # the rule: 5 tokens in all
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0, 0].item()  # the model's own forward, unpadded
        assert score == pytest.approx(alone, abs=1e-5)


def _reward_cli(cwd, backbone, out, *extra):
    pairs = cwd / "pairs.jsonl"
    if not pairs.exists():
        rows = _planted_rows(48, seed=2)
        pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                 for p, c, r in zip(rows.chosen_prompts, rows.chosen, rows.rejected)))
    command = [sys.executable, "-m", "rlhf_cli", "reward", "model=local", f"model.name_or_path={backbone}", "data=files",
               f"data.data_files=[{pairs}]", "data.eval_size=16", "optim.batch_size=8", "optim.learning_rate=3e-3",
               "eval.baselines=[]", "threads=1", "logging.progress=false", f"output_dir={out}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "LOAD REPORT" not in done.stderr
    return done


def test_rlhf_reward_trains_a_local_classifier_end_to_end(classifier_dir, tmp_path):
    """`rlhf reward model=local` on a classifier checkpoint: final/ is a classifier the learned reward loads."""
    out = tmp_path / "rm"
    _reward_cli(tmp_path, classifier_dir, out)
    rule = json.loads((out / "final" / "reward_model.json").read_text())
    assert rule["head"] == SEQUENCE_CLASSIFICATION
    assert "ForSequenceClassification" in json.loads((out / "final" / "config.json").read_text())["architectures"][0]
    assert len(load_learned_reward(out, device="cpu")(["the movie"], [" was good"])) == 1


def test_a_classifier_run_resumes_bit_identically(tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends with the weights of an unbroken run."""
    from safetensors.torch import load_file

    backbone = tmp_path / "gpt2-classifier"
    _save_gpt2_classifier(backbone, make_word_tokenizer())
    _reward_cli(tmp_path, backbone, tmp_path / "whole", "optim.steps=4")
    _reward_cli(tmp_path, backbone, tmp_path / "broken", "optim.steps=2", "checkpoint.every=2")
    _reward_cli(tmp_path, backbone, tmp_path / "broken", "optim.steps=4", "checkpoint.resume=auto")
    whole, broken = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("whole", "broken"))
    assert whole.keys() == broken.keys() and all(torch.equal(whole[k], broken[k]) for k in whole)
