"""Composition and validation of the training config, in-process (no Hydra app, no subprocess)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_cli.config import paths
from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.config.schema import CheckpointSection, GenerationSection, LoggingSection, PPOSection, TrainConfig
from rlhf_cli.errors import ConfigError
from rlhf_cli.ppo.settings import ppo_group_fields
from rlhf_cli.trl.config import PPOConfig

CONFIGS = paths.config_dir()
GROUPS = ("model", "reward", "dataset", "ppo", "generation")

# Options that deliberately leave a value for the user to give (null in the YAML, checked by validate).
REQUIRED_VALUES = {
    "model/local": ("model.name_or_path", "model.name_or_path=/tmp/some-model"),
    "reward/classifier": ("reward.model", "reward.model=/tmp/some-classifier"),
    "reward/callable": ("reward.function", "reward.function=my_rewards:score"),
    "dataset/files": ("dataset.data_files", "dataset.data_files=[/tmp/prompts.jsonl]"),
    "reward/learned": ("reward.model", "reward.model=/tmp/some-reward-run"),
}
# Recipes that need a value only the user can give.
RECIPE_VALUES = {"imdb_rlhf": ["reward.model=/tmp/some-reward-run"]}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative run directories resolve under a scratch cwd."""
    monkeypatch.chdir(tmp_path)


def group_options() -> list[str]:
    return sorted(f"{group}/{path.stem}" for group in GROUPS for path in (CONFIGS / group).glob("*.yaml"))


def test_group_options_on_disk_are_the_expected_ones() -> None:
    assert set(group_options()) >= {
        "model/tiny_gpt2", "model/gpt2", "model/gpt2_imdb", "model/local", "model/t5_small",
        "reward/vader", "reward/distilbert_imdb", "reward/classifier", "reward/callable", "reward/weighted_sum",
        "dataset/imdb_local", "dataset/imdb_hub", "dataset/files", "ppo/default", "generation/default",
    }


@pytest.mark.parametrize("option", group_options())
def test_every_group_option_composes_and_validates(option: str) -> None:
    group, name = option.split("/")
    extra = [REQUIRED_VALUES[option][1]] if option in REQUIRED_VALUES else []
    cfg = compose_train_config([f"{group}={name}", *extra])
    # The option's own YAML values are what the composed group holds, except where train.yaml's
    # offline default or the test's extra override sets the key.
    own = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    offline = OmegaConf.load(CONFIGS / "train.yaml").get(group, {})
    for key, value in OmegaConf.to_container(own).items():
        if key in offline or f"{group}.{key}=" in " ".join(extra):
            continue
        composed = OmegaConf.to_container(cfg[group])[key]
        if isinstance(value, list) and value and isinstance(value[0], dict):  # components: schema fills the rest
            composed = [{k: item[k] for k in own_item} for item, own_item in zip(composed, value)]
        assert composed == value, f"{option}: {key}"


@pytest.mark.parametrize("option", sorted(REQUIRED_VALUES))
def test_options_needing_a_value_fail_without_it(option: str) -> None:
    group, name = option.split("/")
    key, _ = REQUIRED_VALUES[option]
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        compose_train_config([f"{group}={name}"])
    # --cfg printing does not demand it.
    compose_train_config([f"{group}={name}"], require_complete=False)


@pytest.mark.parametrize("recipe", sorted(paths.recipe_files()))
def test_every_recipe_composes_and_has_a_description(recipe: str) -> None:
    cfg = compose_train_config([f"+recipe={recipe}", *RECIPE_VALUES.get(recipe, [])])
    assert isinstance(cfg.steps, int)
    text = paths.recipe_files()[recipe].read_text(encoding="utf-8").splitlines()
    assert text[0].startswith("# ") and len(text[0]) > 20, "first line: the one-line description"
    assert "# @package _global_" in text[:3]
    assert paths.recipe_description(paths.recipe_files()[recipe]) == text[0][2:].strip()


def test_imdb_sentiment_recipe_sets_the_classic_trl_values() -> None:
    cfg = compose_train_config(["+recipe=imdb_sentiment"])
    assert cfg.model.source == "pretrained" and cfg.model.name_or_path == "lvwerra/gpt2-imdb"
    assert cfg.model.kind == "causal"
    assert (cfg.reward.type, cfg.reward.model, cfg.reward.label, cfg.reward.output, cfg.reward.text) == (
        "classifier", "lvwerra/distilbert-imdb", "POSITIVE", "logit", "full")
    assert (cfg.dataset.source, cfg.dataset.path, cfg.dataset.split, cfg.dataset.eval_split) == (
        "hub", "stanfordnlp/imdb", "train", "test")
    assert (cfg.dataset.min_text_chars, cfg.dataset.prompt_min_tokens, cfg.dataset.prompt_max_tokens) == (200, 2, 8)
    gen = cfg.generation
    assert (gen.response_min_tokens, gen.response_max_tokens, gen.top_k, gen.top_p, gen.do_sample) == (4, 16, 0, 1.0, True)
    ppo = cfg.ppo
    assert ppo.learning_rate == pytest.approx(1.41e-5)
    assert (ppo.batch_size, ppo.ppo_epochs, ppo.gradient_accumulation_steps) == (128, 4, 1)
    assert ppo.mini_batch_size is None  # min(batch_size, 128) = 128, TRL's value
    assert (ppo.adap_kl_ctrl, ppo.init_kl_coef, ppo.target, ppo.horizon) == (True, 0.2, 6.0, 10000.0)
    assert cfg.epochs == 1


def test_imdb_sentiment_recipe_undoes_every_offline_default() -> None:
    """Every key train.yaml sets inside a group (the offline default) is set back by the recipe, and
    in ppo/ and generation/ to the group default (TRL's value)."""
    train_yaml = OmegaConf.load(CONFIGS / "train.yaml")
    recipe_yaml = OmegaConf.load(paths.recipe_files()["imdb_sentiment"])
    cfg = compose_train_config(["+recipe=imdb_sentiment"])
    offline_keys = [(group, key) for group in GROUPS if group in train_yaml for key in train_yaml[group]]
    assert len(offline_keys) >= 6
    for group, key in offline_keys:
        assert key in recipe_yaml.get(group, {}), f"imdb_sentiment must set {group}.{key} back"
        if group in ("ppo", "generation"):
            default = getattr(PPOSection() if group == "ppo" else GenerationSection(), key)
            assert cfg[group][key] == default, f"{group}.{key}"


def test_imdb_sentiment_recipe_is_a_true_delta() -> None:
    """Recipes are deltas (docs/architecture.md): the recipe sets inside a group only what train.yaml's offline default changed (no
    restated TRL value), and the composed run still has TRL's controller and sampling settings."""
    train_yaml = OmegaConf.load(CONFIGS / "train.yaml")
    recipe_yaml = OmegaConf.load(paths.recipe_files()["imdb_sentiment"])
    for group in ("ppo", "generation"):
        assert set(recipe_yaml[group]) == set(train_yaml[group]), group
    cfg = compose_train_config(["+recipe=imdb_sentiment"])
    assert (cfg.ppo.adap_kl_ctrl, cfg.ppo.target, cfg.ppo.horizon) == (True, 6.0, 10000.0)
    assert (cfg.generation.top_k, cfg.generation.top_p, cfg.generation.do_sample) == (0, 1.0, True)


def test_batch_size_can_be_lowered_under_the_classic_recipe() -> None:
    """The documented override example: `+recipe=imdb_sentiment ppo.learning_rate=1e-5 ppo.batch_size=64 model=gpt2`."""
    cfg = compose_train_config(["+recipe=imdb_sentiment", "ppo.learning_rate=1e-5", "ppo.batch_size=64", "model=gpt2"])
    assert (cfg.ppo.batch_size, cfg.ppo.learning_rate, cfg.model.name_or_path) == (64, 1e-5, "gpt2")


def test_offline_default_is_the_review_gpt2_vader_run() -> None:
    cfg = compose_train_config()
    assert (cfg.model.source, cfg.reward.type, cfg.dataset.source) == ("review_gpt2", "vader", "imdb_local")
    assert (cfg.steps, cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.ppo_epochs) == (60, 32, 16, 2)
    assert cfg.ppo.learning_rate == pytest.approx(3e-4) and cfg.ppo.init_kl_coef == pytest.approx(0.1)
    # Held-out prompts from the test reviews (never seen by the review LM), enough for a standard error.
    assert (cfg.dataset.eval_split, cfg.dataset.eval_size, cfg.eval_prompts) == ("test", 128, 128)
    assert (cfg.generation.response_min_tokens, cfg.generation.response_max_tokens) == (8, 12)
    assert (cfg.dataset.min_text_chars, cfg.dataset.prompt_min_tokens, cfg.dataset.prompt_max_tokens) == (200, 2, 8)


def test_generation_group_defaults_are_the_schema_defaults() -> None:
    """The schema writes the generation defaults (TRL's), once: the group file writes no value."""
    assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "generation/default.yaml")) == {}
    assert compose_train_config(["generation=default", "+recipe=imdb_sentiment"]).generation == OmegaConf.structured(GenerationSection())


def test_ppo_group_defaults_are_ppo_config_defaults() -> None:
    """The ppo group has the engine's knobs with their (TRL's) defaults, as PPOConfig has them, key for key, plus the
    run-only mixed_precision: one source, and the group file writes no value of its own."""
    assert OmegaConf.to_container(OmegaConf.load(CONFIGS / "ppo/default.yaml")) == {}
    library = PPOConfig().to_dict()
    knobs = [f.name for f in ppo_group_fields()]
    declared = {f.name: f.default for f in ppo_group_fields()}
    assert dataclasses.asdict(PPOSection()) == {**declared, "mixed_precision": None}
    assert {name: library[name] for name in knobs if name != "mini_batch_size"} == {
        name: value for name, value in declared.items() if name != "mini_batch_size"}
    # Everything the old hand-written list passed, the sizes, and forward_batch_size (new to the CLI).
    assert {"learning_rate", "kl_penalty", "adam_eps", "disable_dropout", "batch_size", "mini_batch_size",
            "forward_batch_size", "gradient_accumulation_steps"} <= set(knobs)
    assert library["mini_batch_size"] == 128 and PPOSection().mini_batch_size is None  # the automatic size


def test_train_yaml_writes_only_the_offline_default() -> None:
    """train.yaml sets no value the schema already has: only the offline default block's deviations
    (steps, threads and the ppo/generation numbers); logging and checkpoint come from the schema."""
    train_yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))
    train_yaml.pop("defaults"), train_yaml.pop("hydra")
    assert set(train_yaml) == {"steps", "threads", "ppo", "generation"}
    defaults = TrainConfig()
    assert (train_yaml["steps"], train_yaml["threads"]) != (defaults.steps, defaults.threads)
    cfg = compose_train_config()
    assert OmegaConf.to_container(cfg.logging) == dataclasses.asdict(LoggingSection())
    assert OmegaConf.to_container(cfg.checkpoint) == dataclasses.asdict(CheckpointSection())


def test_smoke_recipe_is_tiny() -> None:
    cfg = compose_train_config(["+recipe=smoke"])
    assert cfg.model.source == "tiny_gpt2" and cfg.reward.type == "vader" and cfg.dataset.source == "imdb_local"
    assert (cfg.model.tiny.n_layer, cfg.model.tiny.n_embd) == (2, 64)
    assert cfg.model.tiny.n_embd < TrainConfig().model.tiny.n_embd
    assert (cfg.steps, cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.ppo_epochs) == (3, 8, 4, 2)
    assert cfg.generation.response_max_tokens <= 4


def test_composed_config_is_resolved_without_hydra_node(tmp_path: Path) -> None:
    cfg = compose_train_config()
    assert "hydra" not in cfg
    assert OmegaConf.to_yaml(cfg, resolve=False) == OmegaConf.to_yaml(cfg, resolve=True)
    out = Path(cfg.output_dir)
    assert out.is_absolute() and out.parent.parent == tmp_path / "outputs"
    assert not (tmp_path / "outputs").exists(), "composing creates nothing"


@pytest.mark.parametrize("override", ["output_dir=runs/x", "hydra.run.dir=runs/x", "+output_dir=runs/x"])
def test_output_dir_override_is_absolute(override: str, tmp_path: Path) -> None:
    cfg = compose_train_config([override])
    assert cfg.output_dir == str(tmp_path / "runs" / "x")


def test_output_dir_cannot_be_swept() -> None:
    with pytest.raises(ConfigError, match="sweeps the output directory"):
        compose_train_config(["output_dir=a,b"])


def choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, choices) of every enumerated field reachable without a list index."""
    out = []

    def walk(dc_type: type, prefix: str) -> None:
        for f in dataclasses.fields(dc_type):
            inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if "choices" in f.metadata:
                out.append((prefix + f.name, f.metadata["choices"]))
            elif inner is not None and dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}.")

    walk(TrainConfig, "")
    return out


def test_every_enumerated_field_is_covered() -> None:
    keys = {key for key, _ in choice_fields()}
    assert keys == {"model.source", "model.kind", "model.dtype", "model.padding_side", "reward.type", "reward.text",
                    "reward.output", "dataset.source", "ppo.kl_penalty", "ppo.mixed_precision", "ppo.precision", "ppo.sharding",
                    "ppo.advantage_estimator", "ppo.kl_loss_estimator",
                    "logging.trackers"}


@pytest.mark.parametrize(("key", "choices"), choice_fields())
def test_invalid_enum_value_names_key_choices_and_closest(key: str, choices: tuple[str, ...]) -> None:
    bad = choices[0] + "x"  # a typo of the first choice
    override = f"{key}=[{bad}]" if key == "logging.trackers" else f"{key}={bad}"
    with pytest.raises(ConfigError) as info:
        compose_train_config([override])
    message = str(info.value)
    assert f"'{bad}'" in message and key in message
    assert f"Valid values: {', '.join(choices)}." in message
    assert f"Did you mean '{choices[0]}'?" in message


def test_invalid_choice_inside_a_reward_component() -> None:
    with pytest.raises(ConfigError, match=r"reward\.components\.1\.type.*Valid values: vader, classifier, callable"):
        compose_train_config(["reward=weighted_sum", "reward.components.1.type=weighted_sum"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ppo.gamma=1.5", "'ppo.gamma': it must be at most 1"),
        ("ppo.batch_size=0", "'ppo.batch_size': it must be at least 1"),
        ("ppo.learning_rate=0", "'ppo.learning_rate': it must be greater than 0"),
        ("generation.top_p=0", "'generation.top_p': it must be greater than 0"),
        ("steps=0", "'steps': it must be at least 1"),
        ("reward.device=gpu", "Did you mean 'cpu'?"),
        ("dataset.prompt_min_tokens=9", "'dataset.prompt_min_tokens' (9) is larger than 'dataset.prompt_max_tokens' (8)"),
        ("generation.response_max_tokens=4", "'generation.response_min_tokens' (8) is larger"),
        ("ppo.mini_batch_size=64", "'ppo.mini_batch_size' (64) is larger than 'ppo.batch_size' (32)"),
        ("model=tiny_gpt2 model.tiny.n_head=3", "'model.tiny.n_embd' (128) is not divisible by 'model.tiny.n_head' (3)"),
        ("model.kind=seq2seq", "model.source=review_gpt2 is a decoder-only"),
        ("model=tiny_gpt2 model.kind=seq2seq", "model.source=tiny_gpt2 is a decoder-only"),
    ],
)
def test_ranges_and_consistency(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose_train_config(override.split())


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ppo.learnin_rate=1", "Did you mean 'ppo.learning_rate'?"),
        ("+ppo.learnin_rate=1", "Did you mean 'ppo.learning_rate'?"),  # `+` bypasses struct mode; still caught
        ("+modle=gpt2", "Did you mean 'model'?"),
        ("learning_rate=1e-5", "'learning_rate' belongs to another section: 'ppo.learning_rate'"),
        ("reward=weighted_sum reward.components.0.wieght=3", "Did you mean 'reward.components.0.weight'?"),
        ("hydra.run.dri=x", "Did you mean 'hydra.run.dir'?"),
    ],
)
def test_unknown_keys_suggest_the_closest(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose_train_config(override.split())


def test_wrong_type_names_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"Wrong type for 'ppo\.batch_size'.*expected an integer, got 'abc'"):
        compose_train_config(["ppo.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"'ppo\.batch_size'.*got null"):
        compose_train_config(["ppo.batch_size=null"])


def test_unknown_option_and_recipe_list_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"Unknown model option 'gpt3'.*gpt2, gpt2_imdb, local, review_gpt2, smollm2, t5_small, tiny_gpt2.*'gpt2'"):
        compose_train_config(["model=gpt3"])
    with pytest.raises(ConfigError, match=r"Unknown recipe 'smok'.*imdb_sentiment, rm_smoke, smoke, smollm2_imdb.*Did you mean 'smoke'"):
        compose_train_config(["+recipe=smok"])


def test_reward_kwargs_accept_any_key() -> None:
    cfg = compose_train_config(["reward=callable", "reward.function=m:f", "+reward.kwargs.scale=2"])
    assert cfg.reward.kwargs.scale == 2


# --- where configs live --------------------------------------------------------------------------


def test_config_and_recipe_dirs_of_the_checkout_are_absolute() -> None:
    assert paths.config_dir().is_absolute() and (paths.config_dir() / "train.yaml").is_file()
    assert set(paths.recipe_files()) >= {"imdb_sentiment", "smoke"}


def test_installed_layout_wins_over_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "rlhf_cli"
    (package / "_configs").mkdir(parents=True)
    (package / "_configs" / "train.yaml").write_text("{}\n")
    (package / "_recipes").mkdir()
    (package / "_recipes" / "r.yaml").write_text("# d\n")
    (tmp_path / "site" / "configs").mkdir()
    (tmp_path / "site" / "configs" / "train.yaml").write_text("{}\n")
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    assert paths.config_dir() == package / "_configs"
    assert paths.recipes_dir() == package / "_recipes"


def test_missing_config_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "rlhf_cli")
    with pytest.raises(ConfigError, match="Cannot find the rlhf_cli 'configs' directory"):
        paths.config_dir()


# --- YAML documentation ----------------------------------------------------------------------------

_KEY = re.compile(r"^(\s*)(- )?([A-Za-z_][A-Za-z0-9_]*):(\s|$)")


def uncommented_keys(path: Path) -> list[str]:
    """Mapping keys without a comment line right above them (defaults lists and block scalars skipped)."""
    missing, previous, block_indent, in_defaults = [], "", None, False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            continue  # inside a multi-line string
        block_indent = None
        if not line.strip():
            continue
        match = _KEY.match(line)
        if match:
            if indent == 0:
                in_defaults = match.group(3) == "defaults"
            if not in_defaults and not previous.startswith(("#", "- #")):
                missing.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r":\s*[|>][-+]?\s*$", line):
                block_indent = indent
        previous = line.strip()
    return missing


@pytest.mark.parametrize(
    "path",
    sorted(p for p in [*CONFIGS.rglob("*.yaml"), *paths.recipes_dir().rglob("*.yaml")] if "accelerate" not in p.parts),
    ids=lambda p: str(p.relative_to(p.parent.parent)),
)
def test_every_yaml_field_has_a_comment_above_it(path: Path) -> None:
    assert uncommented_keys(path) == []


def test_compose_works_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert compose_train_config(["+recipe=smoke"]).steps == 3


def test_compose_inside_another_hydra_session_leaves_it_intact(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "app.yaml").write_text("value: 7\n", encoding="utf-8")
    with initialize_config_dir(config_dir=str(tmp_path / "host"), version_base="1.3"):
        assert compose_train_config(["+recipe=smoke"]).steps == 3
        assert compose("app").value == 7
    assert not GlobalHydra.instance().is_initialized()
