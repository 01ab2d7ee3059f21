"""Group sampling in `rlhf train` (issue 15): generation.samples_per_prompt=G responses per prompt.

ppo.batch_size counts responses, so a step takes batch_size / G prompts; each prompt is repeated G
times in a row (prompt-major, the layout PPOTrainer.step expects) and its G responses share one
length budget. Bad group sizes fail before any model loads, in global numbers; under 2-process DDP
each process holds whole groups; the recipes imdb_grpo and imdb_rloo are deltas over the offline
default; a grpo run resumes exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_cli.config import paths
from rlhf_cli.config.compose import compose_train_config
from rlhf_cli.engine.checkpoint import compare_configs
from rlhf_cli.engine.components import check_launch
from rlhf_cli.errors import ConfigError
from rlhf_cli.algo.names import estimators_without_groups
from tests.cli.test_checkpoints import _final_weights, _metrics
from tests.cli.test_cli_errors import assert_one_paragraph_error, cli_env, rlhf
from tests.cli.test_multiprocess import LAUNCH

SMOKE = "+recipe=smoke"
RECIPES = ("imdb_grpo", "imdb_rloo")


def _state(num_processes: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(num_processes=num_processes, device=torch.device("cpu"))


def _train_on_two_processes(*overrides: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`accelerate launch` (2 CPU processes over gloo) of `rlhf train +recipe=smoke OVERRIDES`."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run([str(accelerate), *LAUNCH, "-m", "rlhf_cli", "train", SMOKE, *overrides], cwd=cwd,
                          env=cli_env(OMP_NUM_THREADS="1", **env), capture_output=True, text=True, timeout=300)


# Launch checks -------------------------------------------------------------------------------------
NO_GROUP = ["no spread", "generation.samples_per_prompt=4",
            *(f"ppo.advantage_estimator={name}" for name in estimators_without_groups())]
LAUNCH_MISTAKES = [
    (["ppo.advantage_estimator=grpo"], 1, ["ppo.advantage_estimator=grpo", "generation.samples_per_prompt=1", *NO_GROUP]),
    (["ppo.advantage_estimator=rloo"], 1, ["ppo.advantage_estimator=rloo", "generation.samples_per_prompt=1", *NO_GROUP]),
    (["ppo.batch_size=6", "generation.samples_per_prompt=4"], 1,
     ["ppo.batch_size=6 counts responses", "not divisible by generation.samples_per_prompt=4", "a multiple of 4 (e.g. 8)"]),
    (["ppo.batch_size=12", "generation.samples_per_prompt=4"], 2,
     ["ppo.batch_size=12 over the 2 processes", "6 responses per process", "generation.samples_per_prompt=4",
      "straddle two processes", "a multiple of 2 x 4 = 8 (e.g. 16)"]),
    # The example also fits the mini-batch, so following it does not walk into the next refusal.
    (["ppo.batch_size=32", "ppo.mini_batch_size=16", "generation.samples_per_prompt=3"], 1,
     ["a multiple of 3 (e.g. 48, which ppo.mini_batch_size=16 divides too)"]),
]


@pytest.mark.parametrize(("overrides", "processes", "fragments"), LAUNCH_MISTAKES)
def test_group_mistakes_are_caught_by_the_launch_check_in_global_numbers(overrides, processes, fragments, monkeypatch):
    """Before PPOConfig (whose wording is per process) and before any model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded during check_launch")

    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", refuse)
    with pytest.raises(ConfigError) as caught:
        check_launch(compose_train_config([SMOKE, *overrides]), _state(processes))
    message = str(caught.value)
    assert all(fragment in message for fragment in fragments), message
    assert "PPOConfig" not in message and "\n" not in message


def test_the_suggested_batch_size_passes_the_launch_check():
    overrides = [SMOKE, "ppo.batch_size=32", "ppo.mini_batch_size=16", "generation.samples_per_prompt=3"]
    with pytest.raises(ConfigError, match=r"e\.g\. 48"):
        check_launch(compose_train_config(overrides), _state(1))
    check_launch(compose_train_config([*overrides, "ppo.batch_size=48"]), _state(1))
    # A null mini-batch (derived from the batch) gives the plain multiple, not a crash.
    with pytest.raises(ConfigError, match=r"a multiple of 3 \(e\.g\. 33\)"):
        check_launch(compose_train_config([*overrides, "ppo.mini_batch_size=null"]), _state(1))


def test_groups_that_fit_pass_the_launch_check():
    check_launch(compose_train_config([SMOKE, "generation.samples_per_prompt=2"]), _state(2))  # 4 per process
    check_launch(compose_train_config([SMOKE, "ppo.advantage_estimator=grpo", "generation.samples_per_prompt=4"]), _state(2))
    check_launch(compose_train_config([SMOKE, "ppo.advantage_estimator=reinforce_pp"]), _state(1))  # needs no group


@pytest.mark.parametrize(("overrides", "processes", "fragments"), [m for m in LAUNCH_MISTAKES if m[1] == 1])
def test_group_mistakes_on_the_command_line_exit_2_and_write_nothing(overrides, processes, fragments, tmp_path):
    out = tmp_path / "run"
    done = rlhf("train", SMOKE, f"output_dir={out}", *overrides, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = assert_one_paragraph_error(done.stderr, done.stdout)
    assert all(fragment in message for fragment in fragments), message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_group_straddling_two_processes_stops_both_before_a_model_loads(tmp_path):
    """Under `accelerate launch` each process exits 2, rank 0 printing the paragraph once (the launcher then adds its own
    report of the failed children: not ours to shorten)."""
    out = tmp_path / "run"
    done = _train_on_two_processes(f"output_dir={out}", "ppo.batch_size=12", "generation.samples_per_prompt=4", cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("Error: ppo.batch_size=12 over the 2 processes of this launch") == 1, output[-3000:]  # rank 0 says it
    assert "exitcode  : 2" in output  # the children's ConfigError code, not a crash
    assert "rlhf_cli/" not in output  # no traceback through our code
    assert not out.exists()


# Rollouts --------------------------------------------------------------------------------------------
# Writes each call's prompts to REWARD_LOG_DIR/rank<RANK>.jsonl: what each process scored, in order.
RECORDING_REWARD = """
import json, os


def record(prompts, responses):
    path = os.path.join(os.environ["REWARD_LOG_DIR"], f"rank{os.environ['RANK']}.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(list(prompts)) + "\\n")
    return [len(response) / 10 for response in responses]
"""


@pytest.mark.slow
def test_two_processes_each_get_whole_groups_of_different_prompts(tmp_path):
    """`accelerate launch --num_processes 2 ... ppo.batch_size=8 generation.samples_per_prompt=2` with
    grpo: each process scores 2 prompts x 2 responses per step, each prompt's pair adjacent, and the two
    processes have different prompts (4 per step in all)."""
    logs, work = tmp_path / "logs", tmp_path / "work"
    logs.mkdir(), work.mkdir()
    (work / "recording_reward.py").write_text(RECORDING_REWARD, encoding="utf-8")
    done = _train_on_two_processes(
        "output_dir=run", "eval_prompts=0", "steps=2", "generation.samples_per_prompt=2", "ppo.advantage_estimator=grpo",
        "reward=callable", "reward.function=recording_reward:record", cwd=work, PYTHONPATH=str(work), REWARD_LOG_DIR=str(logs),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    calls = {rank: [json.loads(line) for line in (logs / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    assert len(calls[0]) == len(calls[1]) == 2
    for step in range(2):
        per_rank = [calls[rank][step] for rank in (0, 1)]
        assert all(len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3] for prompts in per_rank)
        assert len({prompt for prompts in per_rank for prompt in prompts}) == 4
    assert not any(key.startswith("ppo/val/") for key in json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[0]))


def test_rollout_generates_prompt_major_groups_sharing_one_budget(tmp_path, monkeypatch):
    """`+recipe=smoke generation.samples_per_prompt=2` (gae): 4 prompts per step, each twice in a row, in
    one generate call, the pair with one length budget; the trainer gets that very layout."""
    import transformers

    from rlhf_cli.engine import train

    generate_calls: list[tuple[list[torch.Tensor], list[int]]] = []
    real_generate = train.generate_responses

    def spy_generate(model, queries, *, max_new_tokens, **kwargs):
        generate_calls.append((list(queries), list(max_new_tokens)))
        return real_generate(model, queries, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(train, "generate_responses", spy_generate)
    chunk_rows: list[int] = []  # rows of each model.generate() call
    real_chunk = transformers.GenerationMixin.generate

    def spy_chunk(self, *args, **kwargs):
        chunk_rows.append(int(kwargs["input_ids"].shape[0]))
        return real_chunk(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy_chunk)
    cfg = compose_train_config([
        SMOKE, "generation.samples_per_prompt=2", "generation.response_min_tokens=1", "generation.response_max_tokens=8",
        "generation.batch_size=3", f"output_dir={tmp_path / 'run'}", "eval_prompts=0", "steps=2",
    ])
    run = train.TrainingRun(cfg)
    assert run.trainer.settings.samples_per_prompt == 2 and run.trainer.settings.batch_size == 8
    assert run.stream.global_batch_size == 4  # prompts per step: ppo.batch_size counts responses
    received = []
    real_step = run.trainer.step

    def spy_step(queries, responses, scores):
        received.append((queries, responses, scores))
        return real_step(queries, responses, scores)

    monkeypatch.setattr(run.trainer, "step", spy_step)
    rollouts = []
    for _ in range(run.steps):
        # The rollout the step will use: step 1's was made while building the run, later ones are made here.
        run.pending = run.pending or run.rollout()
        rollouts.append(run.pending)
        run.train_step()

    assert len(generate_calls) == run.steps == 2  # one batched generate call per step
    # generation.batch_size=3 counts prompts: chunks of 3 prompts x 2 responses, never a group split.
    assert chunk_rows == [6, 2] * run.steps
    differing_pairs = 0
    for (queries, budgets), rollout, (step_queries, step_responses, step_scores) in zip(generate_calls, rollouts, received):
        assert len(queries) == len(budgets) == 8
        prompts = rollout.batch.queries
        for row in range(0, 8, 2):
            assert torch.equal(queries[row], queries[row + 1]) and budgets[row] == budgets[row + 1]
            assert prompts[row] == prompts[row + 1]
            assert all(len(rollout.responses[r]) <= budgets[r] for r in (row, row + 1))
            differing_pairs += not torch.equal(rollout.responses[row], rollout.responses[row + 1])
        assert len(set(prompts)) == 4  # four different prompts, not one prompt's eight samples
        assert step_queries is rollout.batch.input_ids and step_responses is rollout.responses
        assert step_scores.shape == (8,)
    # Each row is sampled on its own: a group holds different responses, not one copied.
    assert differing_pairs > 0
    # One budget per prompt: 8 pairs agreeing by chance over 8 possible lengths would be a 1-in-8^8 event.
    assert len({budgets[row] for _, budgets in generate_calls for row in range(0, 8, 2)}) > 1


def test_cfg_job_shows_samples_per_prompt(tmp_path):
    done = rlhf("train", SMOKE, "generation.samples_per_prompt=3", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert OmegaConf.create(done.stdout).generation.samples_per_prompt == 3
    assert list(tmp_path.iterdir()) == []


# Checkpoints -------------------------------------------------------------------------------------------
# reinforce_pp: an estimator change that composes with one response per prompt (grpo alone is refused
# at composition now, the group-size rule being checked there).
@pytest.mark.parametrize("override", ["ppo.advantage_estimator=reinforce_pp", "generation.samples_per_prompt=2"])
def test_changing_estimator_or_group_size_on_resume_is_breaking(override):
    saved = compose_train_config([SMOKE, "output_dir=/tmp/unused"])
    current = compose_train_config([SMOKE, "output_dir=/tmp/unused", override])
    changes = compare_configs(saved, current)
    assert any(line.startswith(override.split("=")[0]) for line in changes.breaking), changes


@pytest.mark.slow
def test_grpo_run_resumes_exactly(tmp_path):
    """Interrupted after step 2 and resumed, a grpo run with groups of 2 (and imdb_grpo's KL placement)
    equals the uninterrupted one bit for bit: metrics and final weights."""
    common = [SMOKE, "ppo.advantage_estimator=grpo", "generation.samples_per_prompt=2", "ppo.kl_in_reward=false",
              "ppo.kl_loss_coef=0.05", "checkpoint.every=2", "eval_prompts=0"]

    def run(out: Path, steps: int, *extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "rlhf_cli", "train", *common, f"output_dir={out}", f"steps={steps}", *extra],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr

    run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, "checkpoint.resume=auto")
    whole, split = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    assert [row["step"] for row in split] == [1, 2, 3, 4] and whole == split
    # It ran grpo: no value head stats, the KL as a loss term and none in the reward.
    assert not any(key.startswith("ppo/val/") for row in whole for key in row)
    assert all("ppo/loss/kl" in row and row["objective/kl_coef"] == 0 for row in whole)
    wa, wb = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "split")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# Recipes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_group_recipes_are_deltas_over_the_offline_default(recipe):
    """Recipes are deltas (docs/architecture.md): every value the recipe writes differs from the offline default, and it keeps the
    default's responses per step (ppo.batch_size 32 = 8 prompts x 4)."""
    recipe_yaml = OmegaConf.to_container(OmegaConf.load(paths.recipe_files()[recipe]))
    default, cfg = compose_train_config(), compose_train_config([f"+recipe={recipe}"])
    written = [(group, key) for group, keys in recipe_yaml.items() if isinstance(keys, dict) for key in keys]
    assert written and all(default[group][key] != cfg[group][key] for group, key in written)
    assert "batch_size" not in recipe_yaml["ppo"] and cfg.ppo.batch_size == default.ppo.batch_size == 32
    assert cfg.generation.samples_per_prompt == 4 and cfg.ppo.advantage_estimator == recipe.removeprefix("imdb_")
    assert (cfg.model.source, cfg.reward.type, cfg.dataset.source, cfg.steps) == ("review_gpt2", "vader", "imdb_local", 60)
    check_launch(cfg, _state(1))
    check_launch(cfg, _state(2))


def test_grpo_recipe_moves_the_kl_into_the_loss_and_rloo_keeps_it_in_the_reward():
    grpo, rloo = (compose_train_config([f"+recipe={recipe}"]).ppo for recipe in RECIPES)
    assert (grpo.kl_in_reward, grpo.kl_loss_coef, grpo.kl_loss_estimator) == (False, 0.3, "k3")
    assert (rloo.kl_in_reward, rloo.kl_loss_coef) == (True, 0.0)


def test_prompt_stream_counts_prompts_not_responses():
    """A step of ppo.batch_size=8 responses in groups of 2 needs 4 prompts: 6 are enough, 3 are not, and
    each of 2 processes takes its own half of every step's prompts."""
    from datasets import Dataset

    from rlhf_cli.engine.batches import PromptStream

    prompts = Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(6)], "query": [f"q{i}" for i in range(6)]})
    halves = [PromptStream(prompts, prompts_per_step=4, process_index=rank, num_processes=2, seed=0) for rank in (0, 1)]
    batches = [stream.next_batch() for stream in halves]
    assert halves[0].batches_per_epoch == 1 and [len(batch.queries) for batch in batches] == [2, 2]
    assert not set(batches[0].queries) & set(batches[1].queries)
    assert batches[0].repeated(2).queries == [q for q in batches[0].queries for _ in range(2)]
    with pytest.raises(ConfigError, match=r"The training set has 3 prompts, fewer than one step's 4 \(ppo.batch_size / generation.samples_per_prompt\)"):
        PromptStream(prompts.select(range(3)), prompts_per_step=4, process_index=0, num_processes=1, seed=0)
