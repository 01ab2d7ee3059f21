"""Building the policy (a value-head model) and its tokenizer from the ``model`` config group.

``source: pretrained`` loads a Hub id or a local directory (or a llama.cpp GGUF file given as
``model.gguf_file``, see ``models.gguf``); ``source: review_gpt2`` loads the small GPT-2
pre-trained on the local IMDb train reviews that ships inside the package (the offline default,
see ``rlhf_cli/assets/review_gpt2``); ``source: tiny_gpt2`` builds a small randomly initialised
GPT-2 over the review tokenizer. Neither offline source needs a download.
``lora.enabled`` puts PEFT LoRA adapters on the language model.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from rlhf_cli.choices import DTYPES
from rlhf_cli.errors import ConfigError, ModelLoadError
from rlhf_cli.hub import check_loadable, hub_failure_message
from rlhf_cli.models.dropout import disable_dropout as disable_dropout_in
from rlhf_cli.models.gguf import resolve_gguf
from rlhf_cli.models.model_facts import dtype_kwargs
from rlhf_cli.models.value_head import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
    check_model_source,
    is_seq2seq_config,
)

if TYPE_CHECKING:
    from rlhf_cli.config.schema import ModelConfig

# model.dtype -> what from_pretrained takes: a torch dtype, or "auto" (what the checkpoint's config.json records).
_DTYPES: dict[str, torch.dtype | str] = {name: name if name == "auto" else getattr(torch, name) for name in DTYPES}
_POLICY_CLASSES: dict[str, type[PreTrainedModelWrapper]] = {
    "causal": AutoModelForCausalLMWithValueHead,
    "seq2seq": AutoModelForSeq2SeqLMWithValueHead,
}


def load_policy_and_tokenizer(
    model_cfg: "ModelConfig", *, disable_dropout: bool = True
) -> tuple[PreTrainedModelWrapper, PreTrainedTokenizerBase]:
    """The value-head policy and its tokenizer as ``model_cfg`` (the ``model`` config group) describes.

    ``disable_dropout`` zeroes every dropout probability of the policy (see ``models.dropout``).
    """
    if model_cfg.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(_DTYPES)}, got '{model_cfg.dtype}'.")
    # A GGUF checkpoint becomes (once, cached) a plain Hugging Face directory; from here on it loads as one.
    model_cfg = resolve_gguf(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    if model_cfg.source == "tiny_gpt2":
        policy = _build_tiny_gpt2(model_cfg, tokenizer)
    elif model_cfg.source == "review_gpt2":
        policy = _load_review_gpt2(model_cfg)
    else:
        policy = _load_pretrained_policy(model_cfg)
    if model_cfg.lora.enabled:
        policy = _with_lora(policy, model_cfg)
    # Generation reads the pad id from the generation config; checkpoints without one would warn
    # on every generate() call and pad with eos silently.
    generation_config = policy.pretrained_model.generation_config
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing still back-propagates when the inputs of a checkpointed block
        # need no gradient, which is the case once embeddings are frozen (shared with the reference).
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if disable_dropout:
        disable_dropout_in(policy)
    return policy, tokenizer


def check_peft_installed() -> None:
    """A ConfigError unless peft is installed (model.lora.enabled=true needs it); checked by the launch
    checks before any model loads, and again here for callers that build a model directly."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(
            "model.lora.enabled=true needs the 'peft' package, which is not installed. Run `pip install peft` "
            "(or `pip install 'rlhf-cli[peft]'`), or set model.lora.enabled=false to train all weights."
        )


def _with_lora(policy: PreTrainedModelWrapper, model_cfg: "ModelConfig") -> PreTrainedModelWrapper:
    """``policy`` with LoRA adapters (``model.lora``) on its language model, and the same value head.

    PEFT freezes the language model's own weights; only the adapters and the value head train.
    """
    lora = model_cfg.lora
    check_peft_installed()
    import peft

    language_model = policy.pretrained_model
    config = peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM" if policy.is_encoder_decoder else "CAUSAL_LM",
        r=int(lora.r),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=list(lora.target_modules) if lora.target_modules is not None else None,
    )
    # The adapters' random A matrices (B starts at zero, so the initial policy is the base model) and
    # the new wrapper's head init draw from a fixed seed: the same in every run and on every rank,
    # and the run's global generator is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            adapted = peft.get_peft_model(language_model, config)
        except ValueError as err:  # no default target modules for the architecture, or names not found
            raise ConfigError(
                f"LoRA cannot be applied to this {type(language_model).__name__}: {err} Set "
                "model.lora.target_modules to the names of its linear layers (e.g. [c_attn] for GPT-2, "
                "[q_proj, v_proj] for Llama)."
            ) from err
        wrapped = type(policy)(adapted)
    wrapped.v_head.load_state_dict(policy.v_head.state_dict())
    return wrapped


def load_tokenizer(model_cfg: "ModelConfig") -> PreTrainedTokenizerBase:
    """The tokenizer for ``model_cfg``, with its pad token and padding side set from the config."""
    model_cfg = resolve_gguf(model_cfg)  # a no-op when it names no GGUF file, or already names its conversion
    if model_cfg.source == "tiny_gpt2":
        # Imported here: the review tokenizer (and the IMDb reviews it is trained on) only serves this source.
        from rlhf_cli.data.tokenizer import review_tokenizer

        tokenizer = review_tokenizer(model_cfg.tiny.vocab_size)
    elif model_cfg.source == "review_gpt2":
        from rlhf_cli.assets import review_gpt2_dir

        tokenizer = AutoTokenizer.from_pretrained(str(review_gpt2_dir(needs="tokenizer.json")))
    elif model_cfg.source == "pretrained":
        tokenizer = _load_pretrained_tokenizer(model_cfg)
    else:
        raise ConfigError(f"model.source must be 'pretrained', 'review_gpt2' or 'tiny_gpt2', got '{model_cfg.source}'.")
    _set_pad_token(tokenizer, model_cfg.pad_token)
    if model_cfg.padding_side not in ("left", "right"):
        raise ConfigError(f"model.padding_side must be 'left' or 'right', got '{model_cfg.padding_side}'.")
    tokenizer.padding_side = model_cfg.padding_side
    return tokenizer


def _pretrained_name(model_cfg: "ModelConfig") -> str:
    if not model_cfg.name_or_path:
        raise ConfigError(
            "model.name_or_path is not set, but model.source=pretrained needs it. Set model.name_or_path= "
            "to a Hugging Face Hub id or a local model directory, or use model.source=tiny_gpt2."
        )
    return str(model_cfg.name_or_path)


def _load_pretrained_tokenizer(model_cfg: "ModelConfig") -> PreTrainedTokenizerBase:
    if model_cfg.tokenizer_name_or_path:
        name, config_key, revision = str(model_cfg.tokenizer_name_or_path), "model.tokenizer_name_or_path", None
        what, loading = "tokenizer", "tokenizer"
    else:
        # The model's revision pins its tokenizer too when both come from the same repository.
        name, config_key, revision = _pretrained_name(model_cfg), "model.name_or_path", model_cfg.revision
        # The user named a model; that its tokenizer is read first is a detail.
        what, loading = "policy model", "policy model's tokenizer"
    check_loadable(name, what=what, config_key=config_key, filename="tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:  # missing files, unknown repo, no network, no tokenizer files in a directory
        raise ModelLoadError(hub_failure_message(name, what=loading, config_key=config_key, error=err)) from err


def _set_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str | None) -> None:
    """Pad with ``pad_token`` if given (it must be in the vocabulary), else the tokenizer's own, else eos."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"model.pad_token='{pad_token}' is not in the tokenizer's vocabulary, and adding a token would "
                f"need a new embedding row the model never trained. Pick an existing token (often the eos "
                f"token '{tokenizer.eos_token}'), or set model.pad_token=null to use the tokenizer's own."
            )
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "The tokenizer has neither a pad token nor an eos token to pad with. Set model.pad_token= "
                "to a token of its vocabulary."
            )
        tokenizer.pad_token = tokenizer.eos_token


def _load_pretrained_policy(model_cfg: "ModelConfig") -> PreTrainedModelWrapper:
    name = _pretrained_name(model_cfg)
    if model_cfg.kind not in _POLICY_CLASSES:
        raise ConfigError(f"model.kind must be 'causal' or 'seq2seq', got '{model_cfg.kind}'.")
    check_model_source(name, what="policy model", config_key="model.name_or_path")
    hub_kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
    except OSError as err:
        raise ModelLoadError(hub_failure_message(name, what="policy model", config_key="model.name_or_path", error=err)) from err
    # Checked here, where the config key can be named, before any weights are read.
    actual_kind = "seq2seq" if is_seq2seq_config(config) else "causal"
    if actual_kind != model_cfg.kind:
        raise ConfigError(
            f"model.kind={model_cfg.kind}, but '{name}' is a {type(config).__name__} ({actual_kind} model). "
            f"Set model.kind={actual_kind}."
        )
    policy_class = _POLICY_CLASSES[model_cfg.kind]
    return policy_class.from_pretrained(name, config=config, **dtype_kwargs(_DTYPES[model_cfg.dtype]), **hub_kwargs)


def _load_review_gpt2(model_cfg: "ModelConfig") -> PreTrainedModelWrapper:
    """The review LM shipped in the package (fp16 on disk), in ``model.dtype`` ("auto": float16)."""
    from rlhf_cli.assets import review_gpt2_dir

    if model_cfg.kind != "causal":
        raise ConfigError(
            f"model.kind={model_cfg.kind}, but model.source=review_gpt2 is a GPT-2 (causal model). Set model.kind=causal."
        )
    # The value head's random init draws from a fixed seed, as tiny_gpt2's does: the same head in
    # every run and on every rank, and the run's global generator is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLMWithValueHead.from_pretrained(str(review_gpt2_dir()), **dtype_kwargs(_DTYPES[model_cfg.dtype]))


def _build_tiny_gpt2(model_cfg: "ModelConfig", tokenizer: PreTrainedTokenizerBase) -> PreTrainedModelWrapper:
    """A randomly initialised GPT-2 (and value head) sized by ``model.tiny``, over ``tokenizer``'s vocabulary."""
    tiny = model_cfg.tiny
    bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),  # the real size, added special tokens included
        n_positions=tiny.n_positions,
        n_embd=tiny.n_embd,
        n_layer=tiny.n_layer,
        n_head=tiny.n_head,
        bos_token_id=bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The init depends on tiny.init_seed alone; fork_rng restores the global CPU generator afterwards
    # so the run's seeded sampling does not depend on whether the model was built first.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        policy = AutoModelForCausalLMWithValueHead.from_pretrained(GPT2LMHeadModel(config))
    if model_cfg.dtype in ("bfloat16", "float16"):  # "auto" means the float32 it was built in
        policy.pretrained_model.to(_DTYPES[model_cfg.dtype])  # the value head stays float32
    return policy
