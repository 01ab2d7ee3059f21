"""A failed or repeated start never touches an earlier run (issue 13).

One finished ``+recipe=smoke`` run (config, metrics, two checkpoints, final/, report, .hydra/, train.log)
is built once; every case starts ``rlhf train`` against a fresh copy of it with one mistake and checks the
exit code, that the message names the problem in one paragraph without a traceback (nor a library's own
ERROR line), and that every file of the earlier run is byte for byte what it was (sha256), none added,
none removed. Cases are subprocesses run two at a time: most fail within seconds (before any model
loads); those that need a model use the smoke recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.test_cli_errors import cli_env

SMOKE = "+recipe=smoke"
BAD_REWARDS = '''
import math
from rlhf_cli.rewards.lexicon import VaderReward

_vader = VaderReward()


def raises(prompts, responses):
    raise ZeroDivisionError("no reward for you")


def wrong_count(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def nan(prompts, responses):
    return [math.nan] * len(prompts)


def strings(prompts, responses):
    return ["good"] * len(prompts)


def vader(prompts, responses):
    return list(_vader(prompts, responses))
'''


@dataclass(frozen=True)
class Case:
    """One bad start: its command-line overrides, the expected exit code and message fragments."""

    name: str
    args: tuple[str, ...]
    fragments: tuple[str, ...]
    code: int = 2


def _cases(inputs: Path) -> list[Case]:
    rewards = inputs / "bad_rewards.py"
    files = lambda name: ("dataset=files", f"dataset.data_files=[{inputs / name}]")  # noqa: E731
    damaged_ckpt = inputs / "damaged" / "checkpoints" / "step-3"
    # Errors found after the job starts replace the earlier run unless overwrite=true is also given: it is,
    # so these cases also show that overwrite=true deletes nothing when the start fails.
    new = (SMOKE, "overwrite=true")
    return [
        # Config, found while composing (before Hydra runs the job).
        Case("unknown_key", ("ppo.learnin_rate=1",), ("Unknown config key 'ppo.learnin_rate'", "Did you mean 'ppo.learning_rate'?")),
        Case("wrong_type", ("ppo.batch_size=abc",), ("Wrong type for 'ppo.batch_size'",)),
        Case("unknown_option", ("model=gpt3",), ("Unknown model option 'gpt3'",)),
        Case("unknown_recipe", ("+recipe=nope",), ("Unknown recipe 'nope'",)),
        Case("bad_choice", ("ppo.kl_penalty=klx",), ("Invalid value 'klx' for 'ppo.kl_penalty'",)),
        Case("out_of_range", ("steps=0",), ("Invalid value 0 for 'steps'",)),
        Case("key_in_list_of_sections", ("reward=weighted_sum", "reward.components=[{type: vader, wieght: 1.0}]"),
             ("Unknown config key 'reward.components.0.wieght'", "Did you mean 'reward.components.0.weight'?")),
        Case("index_past_end", ("reward=weighted_sum", "reward.components.5.weight=1.0"),
             ("No item 5 in 'reward.components'", "there are 2 components")),
        Case("min_above_max", ("generation.response_min_tokens=9", "generation.response_max_tokens=3"),
             ("'generation.response_min_tokens' (9) is larger than",)),
        Case("mini_batch_above_batch", ("ppo.mini_batch_size=64",), ("'ppo.mini_batch_size' (64) is larger than",)),
        Case("heads_do_not_divide", ("model=tiny_gpt2", "model.tiny.n_embd=65"), ("not divisible by 'model.tiny.n_head'",)),
        Case("unparsable_override", ("ppo.batch_size=[",), ("Cannot parse the command-line override",)),
        Case("callable_without_function", ("reward=callable",), ("'reward.function' is empty",)),
        Case("pretrained_without_path", ("model=local",), ("'model.name_or_path' is empty",)),
        # Launch: found by the engine before any model loads.
        Case("sizes_do_not_divide", (SMOKE, "ppo.mini_batch_size=3"), ("is not divisible by ppo.mini_batch_size × ppo.gradient_accumulation_steps",)),
        Case("fp16_on_cpu", (SMOKE, "ppo.mixed_precision=fp16"), ("ppo.mixed_precision=fp16 needs a GPU",)),
        Case("tracker_missing", (SMOKE, "logging.trackers=[wandb]"), ("logging.trackers asks for 'wandb'",)),
        # The run directory and its checkpoints.
        Case("new_run_into_a_run", (SMOKE,), ("already holds a run", "checkpoint.resume=auto", "overwrite=true")),
        Case("resume_changes_batch", (SMOKE, "checkpoint.resume=auto", "ppo.batch_size=4", "ppo.mini_batch_size=4"),
             ("Cannot resume from", "ppo.batch_size: 8 → 4")),
        Case("resume_missing_path", (SMOKE, f"checkpoint.resume={inputs / 'nope'}"), ("does not exist",)),
        Case("resume_damaged_path", (*new, f"checkpoint.resume={damaged_ckpt}"), ("weights.safetensors is corrupt",)),
        Case("overwrite_own_checkpoint", (SMOKE, "checkpoint.resume=auto", "overwrite=true"), ("overwrite=true would delete",)),
        # Models.
        Case("hub_model_offline", ("model=gpt2", "overwrite=true"), ("'gpt2'", "the Hub is offline")),
        Case("model_path_missing", (*new, "model=local", f"model.name_or_path={inputs / 'no_model'}"), ("no_model' does not exist",)),
        Case("model_path_not_a_model", (*new, "model=local", f"model.name_or_path={inputs}"), (f"tokenizer '{inputs}'",)),
        # Data.
        Case("data_file_empty", (*new, *files("empty.jsonl")), ("empty.jsonl", "is empty")),
        Case("data_line_malformed", (*new, *files("bad.jsonl")), ("bad.jsonl", "line 2 is not valid JSON")),
        Case("data_file_missing", (*new, *files("missing.jsonl")), ("missing.jsonl", "not a file")),
        Case("data_column_missing", (*new, *files("good.jsonl"), "dataset.text_column=review"), ("no column 'review'",)),
        Case("data_extension", (*new, *files("prompts.xml")), ("extension '.xml'",)),
        Case("data_filtered_away", (*new, "dataset.min_text_chars=1000000"), ("No training prompts are left",)),
        Case("hub_dataset_offline", (*new, "dataset.source=hub", "dataset.path=someone/reviews"), ("Hub is offline",)),
        # Rewards: each fails on the first step's batch, which is scored before anything is written.
        Case("reward_raises", (*new, "reward=callable", f"reward.function={rewards}:raises"), ("raised ZeroDivisionError",)),
        Case("reward_wrong_count", (*new, "reward=callable", f"reward.function={rewards}:wrong_count"), ("returned 7 scores for 8 samples",)),
        Case("reward_nan", (*new, "reward=callable", f"reward.function={rewards}:nan"), ("returned nan",)),
        Case("reward_strings", (*new, "reward=callable", f"reward.function={rewards}:strings"), ("which is not a number",)),
        Case("reward_nan_in_weighted_sum",
             (*new, "reward=weighted_sum", f"reward.components=[{{type: vader, weight: 1.0}}, {{type: callable, function: '{rewards}:nan', weight: 1.0}}]"),
             ("(in the weighted sum) returned nan",)),
        Case("reward_module_missing", (*new, "reward=callable", "reward.function=no_such_module:score"), ("no module named 'no_such_module'",)),
        Case("reward_model_missing", (*new, "reward=classifier", f"reward.model={inputs / 'no_classifier'}"), ("no_classifier' does not exist",)),
    ]


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", "train", *args], cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The bad inputs the cases point at: data files, reward functions, and a finished run."""
    path = tmp_path_factory.mktemp("inputs")
    (path / "bad_rewards.py").write_text(BAD_REWARDS)
    (path / "empty.jsonl").write_text("")
    good = "".join(json.dumps({"text": f"review number {i} says this film was a fine evening out"}) + "\n" for i in range(40))
    (path / "good.jsonl").write_text(good)
    (path / "bad.jsonl").write_text('{"text": "a good movie"}\n{"text": "bad\n{"text": "fine"}\n')
    (path / "prompts.xml").write_text("<texts/>")
    done = _rlhf(SMOKE, f"output_dir={path / 'finished'}", "checkpoint.every=1", cwd=path)
    assert done.returncode == 0, done.stderr
    damaged = path / "damaged"
    shutil.copytree(path / "finished", damaged)
    (damaged / "checkpoints" / "step-3" / "weights.safetensors").write_bytes(b"\x00" * 16)
    return path


@pytest.fixture(scope="module")
def finished(inputs: Path) -> Path:
    run = inputs / "finished"
    assert {"config.yaml", "metrics.jsonl", "final", "checkpoints", "report.md", ".hydra", "train.log"} <= {p.name for p in run.iterdir()}
    return run


@pytest.fixture(scope="module")
def outcomes(inputs: Path, finished: Path, tmp_path_factory) -> dict[str, tuple[Case, subprocess.CompletedProcess[str], dict, dict]]:
    """Every case run against its own copy of the finished run, two at a time."""
    workdir = tmp_path_factory.mktemp("cases")
    before = _digest(finished)

    def run(case: Case):
        target = workdir / case.name
        shutil.copytree(finished, target)
        done = _rlhf(f"output_dir={target}", *case.args, cwd=workdir)
        return case.name, (case, done, before, _digest(target))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, _cases(inputs)))


CASE_NAMES = [case.name for case in _cases(Path("/x"))]


def test_there_are_at_least_thirty_failure_classes():
    assert len(CASE_NAMES) >= 30 and len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_failed_start_leaves_the_earlier_run_untouched(outcomes, name):
    case, done, before, after = outcomes[name]
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output
    assert "Traceback" not in output
    assert "ERROR" not in output and "Failed to load" not in output, "a library's own error line reached the console"
    message = " ".join(done.stderr.split())
    assert message.startswith("Error: "), output
    for fragment in case.fragments:
        assert fragment in message, message
    assert after == before, f"changed: {sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))}"


def test_a_failed_start_without_output_dir_leaves_no_directory(inputs, tmp_path):
    """Hydra creates outputs/<date>/<time>/ before the job; a start that fails removes it again."""
    rewards = inputs / "bad_rewards.py"
    late = _rlhf(SMOKE, "reward=callable", f"reward.function={rewards}:raises", cwd=tmp_path)  # the last check of a start
    early = _rlhf(SMOKE, "ppo.mini_batch_size=3", cwd=tmp_path)  # the first check inside the job
    for done in (late, early):
        assert done.returncode == 2, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_run_only_once_started(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    (target / "notes.txt").write_text("mine")  # not a run's file: overwrite leaves it
    done = _rlhf(f"output_dir={target}", SMOKE, "overwrite=true", "steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (target / "checkpoints").exists(), "the earlier run's checkpoints are gone"
    assert [json.loads(line)["step"] for line in (target / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (target / "notes.txt").read_text() == "mine"
    assert "overwrite=true" in (target / ".hydra" / "overrides.yaml").read_text()  # Hydra's files: this run's
    assert (target / "train.log").is_file() and (target / "final" / "model.safetensors").is_file()


def test_resume_auto_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path):
    done = _rlhf(f"output_dir={tmp_path / 'new'}", SMOKE, "checkpoint.resume=auto", "steps=1", "eval_prompts=0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "checkpoint.resume=auto: no checkpoint in" in done.stdout and "starting a fresh run" in " ".join(done.stdout.split())
    assert len((tmp_path / "new" / "metrics.jsonl").read_text().splitlines()) == 1


def _without_clock(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}


def test_a_torn_last_metrics_line_is_dropped_on_resume(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    shutil.rmtree(target / "checkpoints" / "step-3")  # killed while writing step 3: resume from step 2
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # kill -9 mid-write
    done = _rlhf(f"output_dir={target}", SMOKE, "checkpoint.resume=auto", "checkpoint.every=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tornlastline" in "".join(done.stdout.split()) and "Traceback" not in done.stderr
    resumed = (target / "metrics.jsonl").read_text().splitlines()
    assert [_without_clock(line) for line in resumed] == [_without_clock(line) for line in lines]  # exact resume


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(inputs, finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(inputs / "damaged", target)  # step-3's weights overwritten
    done = _rlhf(f"output_dir={target}", SMOKE, "checkpoint.resume=auto", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = "".join(done.stdout.split())  # rich may wrap a long path anywhere
    assert "skippedadamagedcheckpoint" in out and "step-3/weights.safetensorsiscorrupt" in out
    assert f"Resumingfrom{target / 'checkpoints' / 'step-2'}" in out
    resumed = (target / "metrics.jsonl").read_text().splitlines()
    assert [_without_clock(line) for line in resumed] == [_without_clock(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]


def test_resume_auto_picks_the_newest_readable_checkpoint(inputs, tmp_path):
    from rlhf_cli.engine.checkpoint import CheckpointError, find_resume_point

    point, notices = find_resume_point("auto", inputs / "damaged", 0)
    assert point.path.name == "step-2" and point.step == 2
    assert len(notices) == 1 and "step-3/weights.safetensors is corrupt" in notices[0]
    point, notices = find_resume_point("auto", tmp_path, 0)
    assert point is None and notices == [f"checkpoint.resume=auto: no checkpoint in {tmp_path}; starting a fresh run."]
    with pytest.raises(CheckpointError, match="is corrupt"):  # an explicit path is never replaced by another
        find_resume_point(str(inputs / "damaged" / "checkpoints" / "step-3"), tmp_path, 0)
    every_one = tmp_path / "all-damaged"
    shutil.copytree(inputs / "damaged", every_one)
    (every_one / "checkpoints" / "step-2" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume_point("auto", every_one, 0)


def test_a_damaged_metrics_line_before_the_last_is_refused(finished, tmp_path):
    from rlhf_cli.engine.run_dir import RunDirectory, RunDirectoryError

    lines = (finished / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], lines[2]]) + "\n")
    with pytest.raises(RunDirectoryError, match="damaged at line 2 of 3"):
        RunDirectory(tmp_path, is_main=True).resumed_metrics(2)
    (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], lines[2][:10]]))
    kept, notice = RunDirectory(tmp_path, is_main=True).resumed_metrics(1)
    assert kept == [lines[0]] and "torn last line (line 3" in notice


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["reward=weighted_sum", "reward.components=[{type: vader}, {type: vader, wieght: 1.0}]"],
         ["Unknown config key 'reward.components.1.wieght'", "Did you mean 'reward.components.1.weight'?",
          "Valid keys of 'reward.components.1': type,"]),
        (["reward=weighted_sum", "reward.components.2.weight=1.0"],
         ["No item 2 in 'reward.components'", "there are 2 components (indices 0 to 1)"]),
        (["reward=weighted_sum", "reward.components=[{type: vader}]", "reward.components.1.weight=1.0"],
         ["No item 1 in 'reward.components'"]),
        (["reward.components.0.weight=1.0"], ["there are no components ('reward.components' is empty)"]),
    ],
)
def test_list_of_sections_messages(overrides, fragments):
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        compose_train_config(overrides)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("blank.jsonl", "\n  \n", "is empty"),
        ("empty.csv", "", "is empty"),
        ("rows.jsonl", '{"text": "a"}\n{"text": "b"}\n[1, 2]\n', "line 3 is a JSON list, not an object"),
        ("rows.json", '{"text": "a"}\n{"text": "b",\n', "line 2 is not valid JSON"),
    ],
)
def test_data_file_problems_name_the_file_and_line(tmp_path, capfd, name, content, fragment):
    from tests.integration.test_prompt_data import dataset_cfg

    from rlhf_cli.data import load_text_dataset
    from rlhf_cli.errors import DataError

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        load_text_dataset(dataset_cfg(source="files", data_files=[str(path)]))
    assert str(path) in str(caught.value) and fragment in str(caught.value)
    printed = capfd.readouterr()
    console = printed.out + printed.err
    assert "ERROR" not in console and "Failed to load" not in console  # the datasets library's own line is silenced


def test_a_json_document_keeps_the_readers_message(tmp_path):
    """A .json file that is one valid document is not JSON Lines: no line is blamed."""
    from rlhf_cli.data.sources import _first_bad_json_line

    path = tmp_path / "doc.json"
    path.write_text('{\n  "rows": [1, 2]\n}\n')
    assert _first_bad_json_line([str(path)]) is None
