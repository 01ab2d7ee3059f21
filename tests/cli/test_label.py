"""`rlhf label` end to end on a finished `+recipe=smoke` run: real subprocesses, keys from a script or
typed into a pseudo-terminal, the file read back; then the file trains `rlhf reward`, and that reward
model orders and judges the pairs of a further session.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from rlhf_cli.label.pairs import Pair, left_is_a
from tests.cli.test_train_runs import assert_one_paragraph_error, cli_env, rlhf_train

HELDOUT = 4  # the smoke recipe's dataset.eval_size: held-out prompts, one pair each
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def rlhf_label(*args: str, cwd: Path, keys: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`rlhf label ARGS` with stdin not a terminal; ``keys``: replayed with --script."""
    extra: list[str] = []
    if keys is not None:
        script = cwd / f"keys-{time.monotonic_ns()}.txt"
        script.write_text(keys, encoding="utf-8")
        extra = ["--script", str(script)]
    return subprocess.run([sys.executable, "-m", "rlhf_cli", "label", *args, *extra], cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("label-cwd")
    done = rlhf_train("+recipe=smoke", "output_dir=run", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


# Scripted sessions ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_scripted_sessions_write_the_judgements_and_resume_without_repeats(run_dir: Path, tmp_path: Path, one_thread) -> None:
    from rlhf_cli.engine.sample import sample_run

    out = tmp_path / "prefs.jsonl"
    # Session 1: 1 on pair 1, 2 on pair 2, a tie on pair 3 taken back, a stray key, pair 3 skipped, quit.
    first = rlhf_label(str(run_dir), "--out", str(out), "--labeller", "ana", cwd=tmp_path, keys="1 2 t u ? s q")
    assert first.returncode == 0, first.stderr
    assert "'?' is not a key of this screen" in first.stdout and f"pair 1 of {HELDOUT}" in first.stdout
    # The pairs: two samples of the run's final policy on its held-out prompts, seeds 0 and 1, exactly
    # what `rlhf sample` draws with those seeds.
    samples_a, samples_b = (sample_run(run_dir, seed=seed) for seed in (0, 1))
    assert samples_a.num_prompts == HELDOUT
    pairs = list(zip(samples_a.prompts, samples_a.responses, samples_b.responses))
    after_first = out.read_bytes()
    rows = read_rows(out)
    assert [row["key"] for row in rows] == ["1", "2"] and [row["tie"] for row in rows] == [False, False]
    # Session 2 continues: pair 3 (skipped before) and pair 4 only, never pairs 1 and 2.
    second = rlhf_label(str(run_dir), "--out", str(out), cwd=tmp_path, keys="t 1")
    assert second.returncode == 0, second.stderr
    assert "pair 1 of 2" in second.stdout and "pair 3 of" not in second.stdout
    assert out.read_bytes().startswith(after_first)  # appended, never rewritten
    rows = read_rows(out)
    assert [row["key"] for row in rows] == ["1", "2", "t", "1"]
    assert len({row["pair_id"] for row in rows}) == 4
    for row, (prompt, response_a, response_b) in zip(rows, pairs):
        pair = Pair(prompt, response_a, response_b, None, None)  # type: ignore[arg-type]
        left, right = (response_a, response_b) if left_is_a(pair, 0) else (response_b, response_a)
        assert row["prompt"] == prompt
        assert (row["chosen"], row["rejected"]) == ((right, left) if row["key"] == "2" else (left, right))
        assert row["shown"] == (["rejected", "chosen"] if row["key"] == "2" else ["chosen", "rejected"])
        seeds = (row["chosen_source"]["seed"], row["rejected_source"]["seed"])
        assert seeds == ((0, 1) if row["chosen"] == response_a else (1, 0))
        assert row["chosen_source"]["model"] == "final" and row["chosen_source"]["step"] == 3
    assert rows[0]["labeller"] == "ana" and rows[2]["labeller"] is None
    # Session 3: nothing left, nothing written.
    third = rlhf_label(str(run_dir), "--out", str(out), cwd=tmp_path, keys="1 1")
    assert third.returncode == 0 and "No pairs left to label" in third.stdout
    assert len(read_rows(out)) == 4


# The interactive screen -------------------------------------------------------------------------------
class Terminal:
    """`rlhf label` on a pseudo-terminal: keys are written to it, the screen is read back."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = cli_env(OMP_NUM_THREADS="1", TERM="xterm")
        env.pop("COLUMNS")
        self.process = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "label", *args], cwd=cwd, env=env,
                                        stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.master, self.screen, self.seen = master, "", 0

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """Read the terminal until ``pattern`` (a regex) appears after what was matched before."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.screen[self.seen:])
            if found:
                self.seen += found.end()
                return found.group(0)
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern!r} never appeared; the terminal showed:\n{self.screen[-3000:]}"
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the process ended and closed its side
                    chunk = b""
                assert chunk, f"{pattern!r}: the process ended; the terminal showed:\n{self.screen[-3000:]}"
                self.screen += _ANSI.sub("", chunk.decode("utf-8", errors="replace"))

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


@pytest.mark.slow
def test_interactive_screen_under_a_pseudo_terminal(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    prompt = "the acting was"
    terminal = Terminal([str(run_dir), prompt, "a long film", "--out", str(out)], tmp_path)
    terminal.expect(r"pair 1 of 2\s+·\s+labelled 0 \(0 this session\)")
    terminal.expect(re.escape(prompt))  # the prompt panel
    terminal.expect(r"1\s+\(left\)\s+2\s+\(right\)")  # the two responses side by side
    terminal.press("1")
    terminal.expect(r"pair 2 of 2\s+·\s+labelled 1 \(1 this session\)")
    terminal.expect(r"recorded: left is better")
    assert len(read_rows(out)) == 1  # on disk as soon as the screen moved on
    terminal.press("z")
    terminal.expect(r"'z' is not a key of this screen")
    terminal.press("u")
    terminal.expect(r"pair 1 of 2\s+·\s+labelled 0")
    terminal.expect(r"undone")
    assert out.read_text(encoding="utf-8") == ""
    terminal.press("2")
    terminal.expect(r"labelled 1 \(1 this session\)")
    terminal.press("q")
    terminal.expect(r"1 judgements written this session")
    assert terminal.close() == 0
    rows = read_rows(out)
    assert [(row["prompt"], row["key"], row["shown"]) for row in rows] == [(prompt, "2", ["rejected", "chosen"])]


@pytest.mark.slow
def test_sigkill_between_judgements_keeps_every_judgement(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    terminal = Terminal([str(run_dir), "--out", str(out)], tmp_path)
    terminal.expect(r"pair 1 of")
    for count, key in enumerate("1t2", start=1):
        terminal.press(key)
        terminal.expect(rf"labelled {count} \({count} this session\)")
    terminal.process.send_signal(signal.SIGKILL)
    assert terminal.close() == -signal.SIGKILL
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert [row["key"] for row in rows] == ["1", "t", "2"]


# Other sources and the reward model ----------------------------------------------------------------------
@pytest.mark.slow
def test_prompts_file_against_two_models(run_dir: Path, tmp_path: Path) -> None:
    from rlhf_cli.assets import __file__ as assets_init

    review_gpt2 = Path(assets_init).parent / "review_gpt2"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the film\n\nmy favourite scene\n", encoding="utf-8")
    out = tmp_path / "ab.jsonl"
    done = rlhf_label(str(prompts), "--models", str(run_dir / "final"), str(review_gpt2), "--seed", "5", "--out", str(out),
                      cwd=tmp_path, keys="1 1")
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert [row["prompt"] for row in rows] == ["the film", "my favourite scene"]
    for row in rows:
        models = {row["chosen_source"]["model"], row["rejected_source"]["model"]}
        assert models == {"final", "review_gpt2"}
        assert row["chosen_source"]["seed"] == row["rejected_source"]["seed"] == 5


@pytest.mark.slow
def test_labels_train_a_reward_model_that_then_orders_and_judges_pairs(run_dir: Path, tmp_path: Path, one_thread) -> None:
    from rlhf_cli.rewards.learned import load_learned_reward

    prompts = ["the movie", "this film", "i think", "the plot", "the actors", "it was", "my wife", "the end",
               "what a", "never", "the best", "a bad", "in the", "so much", "one of", "the story"]
    own = rlhf_label(str(run_dir), *prompts, "--out", "mine.jsonl", cwd=tmp_path, keys="1 2 1 1 2 2 1 2 t 1 2 1 2 2 1 1")
    # Three smoke steps barely move the policy: with common random numbers most of its responses equal
    # the reference's (those pairs are left out, and counted), so longer responses are asked for.
    versus = rlhf_label(str(run_dir), *prompts, "--against", "reference", "--max-new-tokens", "24", "--out",
                        "vs-reference.jsonl", cwd=tmp_path, keys="2 1 2 1 2 1 2 1 2 1 2 1 2 1 2 1")
    assert own.returncode == 0 and versus.returncode == 0, own.stderr + versus.stderr
    against = read_rows(tmp_path / "vs-reference.jsonl")
    identical = re.search(r"left out (\d+) of 16 pairs whose two responses are identical", versus.stdout)
    assert against and len(against) + int(identical.group(1) if identical else 0) == 16
    for row in against:
        assert {row["chosen_source"]["model"], row["rejected_source"]["model"]} == {"final", "reference"}
        assert row["chosen_source"]["seed"] == row["rejected_source"]["seed"]
    # Both files, as written, in one `rlhf reward` run.
    reward = subprocess.run([sys.executable, "-m", "rlhf_cli", "reward", "+recipe=rm_smoke", "data=files",
                             "data.data_files=[mine.jsonl,vs-reference.jsonl]", "data.eval_size=4", "output_dir=rm"],
                            cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert reward.returncode == 0, reward.stderr
    assert (tmp_path / "rm" / "final" / "reward_model.json").is_file()
    assert "held-out pair accuracy" in reward.stdout
    # A fresh file, the held-out pairs shown most-uncertain first, agreement after each judgement.
    done = rlhf_label(str(run_dir), "--out", "uncertain.jsonl", "--reward-model", "rm", "--select", "uncertain",
                      cwd=tmp_path, keys="1 2 t 1")
    assert done.returncode == 0, done.stderr
    rows = read_rows(tmp_path / "uncertain.jsonl")
    assert len(rows) == HELDOUT
    model = load_learned_reward(tmp_path / "rm")
    for row in rows:  # the model's own P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)), scored one by one
        chosen, rejected = model([row["prompt"]], [row["chosen"]])[0], model([row["prompt"]], [row["rejected"]])[0]
        assert row["reward_model_probability"] == pytest.approx(1 / (1 + math.exp(rejected - chosen)), abs=1e-5)
    distances = [abs(row["reward_model_probability"] - 0.5) for row in rows]
    assert distances == sorted(distances)
    agreed = sum(row["reward_model_probability"] > 0.5 for row in rows if not row["tie"])
    assert f"reward model agrees with {agreed} of your 3 judgements" in done.stdout


# Refusals ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_input_is_one_paragraph_and_leaves_the_file_untouched(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    no_terminal = assert_one_paragraph_error(rlhf_label(str(run_dir), "--out", str(out), cwd=tmp_path))
    assert "stdin is not a terminal" in no_terminal and "--script FILE" in no_terminal
    assert not out.exists()
    foreign = b"prompt,chosen,rejected\nhi,a,b\n"
    out.write_bytes(foreign)
    message = assert_one_paragraph_error(rlhf_label(str(run_dir), "--out", str(out), cwd=tmp_path, keys="1"))
    assert "line 1 is not JSON" in message and "--out" in message
    assert out.read_bytes() == foreign
    good = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    out.write_bytes(good)
    (tmp_path / "not-a-run").mkdir()
    not_run = assert_one_paragraph_error(rlhf_label(str(tmp_path / "not-a-run"), "--out", str(out), cwd=tmp_path, keys="1"))
    assert "is not a run directory" in not_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "final" / "model.safetensors").write_bytes(b"\0" * 100)
    no_load = assert_one_paragraph_error(rlhf_label(str(broken), "--out", str(out), cwd=tmp_path, keys="1"))
    assert "cannot be loaded" in no_load and "broken" in no_load
    no_rm = assert_one_paragraph_error(rlhf_label(str(run_dir), "--out", str(out), "--reward-model", str(run_dir),
                                                  cwd=tmp_path, keys="1"))
    assert "holds no reward model" in no_rm
    uncertain = assert_one_paragraph_error(rlhf_label(str(run_dir), "--out", str(out), "--select", "uncertain",
                                                      cwd=tmp_path, keys="1"))
    assert "--reward-model" in uncertain
    reward_run = tmp_path / "rm"  # an `rlhf reward` run given where a policy belongs: its config has no dataset
    (reward_run / "final").mkdir(parents=True)
    (reward_run / "config.yaml").write_text("model: {source: tiny_gpt2}\ndata: {source: files}\noptim: {batch_size: 8}\n")
    (reward_run / "final" / "config.json").write_text("{}")
    wrong = assert_one_paragraph_error(rlhf_label(str(reward_run), "--out", str(out), cwd=tmp_path, keys="1"))
    assert "is a run of `rlhf reward`" in wrong and f"--reward-model {reward_run}" in wrong
    assert out.read_bytes() == good


def test_help_lists_label_and_its_keys(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "rlhf_cli", "--help"], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert re.search(r"^\s+label\s+show two responses", done.stdout, re.MULTILINE), done.stdout
    usage = subprocess.run([sys.executable, "-m", "rlhf_cli", "label", "--help"], cwd=tmp_path, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0
    for option in ("--out", "--against", "--models", "--reward-model", "--select", "--script", "--labeller"):
        assert option in usage.stdout
