"""`rlhf label` without models: the file (append, undo, resume keys, refusals), the row a key becomes,
the left/right coin, the session loop on replayed keys, and the reward-model helpers."""

from __future__ import annotations

import io
import json
import math
import random
from collections import deque
from pathlib import Path

import pytest
from rich.console import Console

from rlhf_cli.label.command import new_pairs
from rlhf_cli.label.keys import ScriptKeys, read_script
from rlhf_cli.label.pairs import Pair, ResponseSource, ShownPair, judgement_row, left_is_a
from rlhf_cli.label.records import LabelError, LabelFile, pair_key, read_labelled
from rlhf_cli.label.selection import Agreement, uncertainty_order, wilson_interval
from rlhf_cli.label.session import LabelSession

SOURCE_A = ResponseSource("final", "/runs/a/final", 60, 0)
SOURCE_B = ResponseSource("reference", "/runs/a", 0, 1)


def make_pair(index: int) -> Pair:
    return Pair(f"prompt {index}", f"answer a{index}", f"answer b{index}", SOURCE_A, SOURCE_B)


# The file -------------------------------------------------------------------------------------------
def test_pair_key_ignores_which_response_is_a_and_tells_pairs_apart() -> None:
    assert pair_key("p", "x", "y") == pair_key("p", "y", "x")
    assert len({pair_key("p", "x", "y"), pair_key("q", "x", "y"), pair_key("p", "x", "z"), pair_key("p", "xy", "")}) == 4


def test_append_is_durable_line_by_line_and_undo_restores_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "prefs.jsonl"
    file = LabelFile(path)
    file.append({"prompt": "p", "chosen": "a", "rejected": "b"})
    first = path.read_bytes()
    file.append({"prompt": "p2", "chosen": "é", "rejected": "b"})
    assert [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()] == ["p", "p2"]
    file.remove_last()
    assert path.read_bytes() == first
    # A hand-edited file without its final newline: the row still starts on its own line, undo restores it.
    path.write_bytes(first.rstrip(b"\n"))
    again = LabelFile(path)
    again.append({"prompt": "p3", "chosen": "a", "rejected": "b"})
    assert len(read_labelled(path)) == 2
    again.remove_last()
    assert path.read_bytes() == first.rstrip(b"\n")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"prompt,chosen,rejected\n", "line 1 is not JSON"),
        (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n[1, 2]\n', "line 2 is a JSON list"),
        (b'{"prompt": "p", "chosen": "a"}\n', "line 1 has no string rejected"),
        (b'{"prompt": "p", "chosen": ["a"], "rejected": 3}\n', "line 1 has no string chosen, rejected"),
        (b"\xff\xfe\n", "not UTF-8"),
    ],
)
def test_a_foreign_file_is_refused_with_its_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    with pytest.raises(LabelError, match=message):
        read_labelled(path)
    assert path.read_bytes() == content


def test_read_labelled_accepts_rows_of_other_tools_and_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "anything": 1}\n\n', encoding="utf-8")
    assert len(read_labelled(path)) == 1
    assert read_labelled(tmp_path / "new.jsonl") == []
    with pytest.raises(LabelError, match="is not a file"):
        read_labelled(tmp_path)


def test_new_pairs_drop_labelled_repeated_and_identical_pairs() -> None:
    pairs = [make_pair(i) for i in range(4)]
    same = Pair("prompt 9", "x", "x", SOURCE_A, SOURCE_B)
    swapped = Pair("prompt 2", "answer b2", "answer a2", SOURCE_B, SOURCE_A)
    labelled = [{"prompt": "prompt 1", "chosen": "answer b1", "rejected": "answer a1"}]
    assert new_pairs(pairs + [same, swapped], labelled) == [pairs[0], pairs[2], pairs[3]]


# The row a key becomes -------------------------------------------------------------------------------
@pytest.mark.parametrize("left_a", [True, False])
@pytest.mark.parametrize("key", ["1", "2", "t"])
def test_the_row_records_what_was_on_each_side(left_a: bool, key: str) -> None:
    pair = make_pair(0)
    shown = ShownPair(pair, left_a, probability_a=0.8)
    row = judgement_row(shown, key, labeller="ana")
    expected_chosen = shown.right if key == "2" else shown.left
    assert row["chosen"] == expected_chosen and {row["chosen"], row["rejected"]} == {pair.response_a, pair.response_b}
    assert row["tie"] is (key == "t") and row["key"] == key and row["labeller"] == "ana"
    assert row["shown"] == (["rejected", "chosen"] if key == "2" else ["chosen", "rejected"])
    chosen_is_a = row["chosen"] == pair.response_a
    assert row["chosen_source"] == (SOURCE_A if chosen_is_a else SOURCE_B).as_dict()
    assert row["rejected_source"] == (SOURCE_B if chosen_is_a else SOURCE_A).as_dict()
    assert row["reward_model_probability"] == pytest.approx(0.8 if chosen_is_a else 0.2)
    assert row["pair_id"] == pair.key and row["time"].endswith("+00:00")


def test_the_left_right_coin_is_fair_and_repeatable() -> None:
    pairs = [make_pair(i) for i in range(2000)]
    lefts = [left_is_a(pair, seed=0) for pair in pairs]
    # Binomial(2000, 0.5): sd 22.4; 5 sd either side.
    assert abs(sum(lefts) - 1000) < 112
    assert lefts == [left_is_a(pair, seed=0) for pair in pairs]
    assert lefts != [left_is_a(pair, seed=1) for pair in pairs]


# The session loop ----------------------------------------------------------------------------------
def run_session(tmp_path: Path, keys: str, pairs: list[Pair], agreement: Agreement | None = None,
                probabilities: list[float] | None = None) -> tuple[LabelSession, list[dict], str]:
    script = tmp_path / "keys.txt"
    script.write_text(keys, encoding="utf-8")
    probabilities = probabilities or [None] * len(pairs)
    shown = deque(ShownPair(pair, left_is_a(pair, 0), p) for pair, p in zip(pairs, probabilities))
    session = LabelSession(shown, LabelFile(tmp_path / "prefs.jsonl"), labelled_before=0, agreement=agreement)
    out = io.StringIO()
    with ScriptKeys(script) as source:
        session.run(source, Console(file=out, width=100))
    return session, read_labelled(tmp_path / "prefs.jsonl"), out.getvalue()


def test_session_undo_takes_back_judgements_and_skips(tmp_path: Path) -> None:
    pairs = [make_pair(i) for i in range(4)]
    # 1 on pair 0; skip pair 1; undo the skip; 2 on pair 1; tie on pair 2; undo the tie; x (ignored);
    # 1 on pair 2; 1 on pair 3; then on the end screen u takes pair 3 back and q ends.
    session, rows, screen = run_session(tmp_path, "1 s u 2 t u x 1 1 u q  # comment 2 2", pairs)
    assert [row["prompt"] for row in rows] == ["prompt 0", "prompt 1", "prompt 2"]
    assert [row["key"] for row in rows] == ["1", "2", "1"]
    assert [row["tie"] for row in rows] == [False, False, False]
    assert list(session.pending) and session.pending[0].pair == pairs[3]
    assert "'x' is not a key of this screen" in screen and "Every pair of this session is answered." in screen
    assert "pair 4 of 4" in screen and "labelled 3 (3 this session)" in screen


def test_agreement_follows_judgements_and_undo(tmp_path: Path) -> None:
    pairs = [make_pair(i) for i in range(3)]
    agreement = Agreement()
    _, rows, screen = run_session(tmp_path, "1 2 u 2 t", pairs, agreement, probabilities=[0.9, 0.3, 0.6])
    expected = [row["reward_model_probability"] > 0.5 for row in rows if not row["tie"]]
    assert agreement.outcomes == expected and len(expected) == 2
    assert f"agrees with {sum(expected)} of your 2 judgements" in screen


def test_script_keys_skip_blanks_and_comments(tmp_path: Path) -> None:
    script = tmp_path / "keys"
    script.write_text("1 2\n# all of this is ignored 1 2\nt\ts  # and this\nQ\n", encoding="utf-8")
    assert read_script(script) == ["1", "2", "t", "s", "Q"]
    keys = ScriptKeys(script)
    assert [keys.read() for _ in range(6)] == ["1", "2", "t", "s", "q", "q"]


# Reward-model helpers --------------------------------------------------------------------------------
def test_uncertainty_order_puts_the_closest_to_a_half_first() -> None:
    generator = random.Random(0)
    probabilities = [round(generator.random(), 2) for _ in range(200)]  # rounded: many equal distances
    order = uncertainty_order(probabilities)
    assert sorted(order) == list(range(200))
    naive = sorted(range(200), key=lambda i: (abs(probabilities[i] - 0.5), i))  # equal distances: original order
    assert order == naive


def test_agreement_rate_and_standard_error_match_the_binomial_formula() -> None:
    agreement = Agreement()
    for probability in (0.9, 0.2, 0.7, 0.6, 0.4):
        agreement.add(probability)
    assert agreement.rate == pytest.approx(3 / 5)
    assert agreement.standard_error == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert "3 of your 5 judgements: 60% ± 22%" in agreement.summary()
    agreement.remove_last()
    assert agreement.count == 4 and agreement.rate == pytest.approx(3 / 4)


@pytest.mark.parametrize("agreed, count, low, high", [(3, 3, 0.4385, 1.0), (0, 3, 0.0, 0.5615), (10, 10, 0.7225, 1.0)])
def test_agreement_at_all_or_none_shows_a_wilson_interval_not_a_zero_error(agreed, count, low, high) -> None:
    """At 0 % or 100 % the binomial SE is 0 for any n; the Wilson score interval says how little n tells."""
    agreement = Agreement()
    for index in range(count):
        agreement.add(0.9 if index < agreed else 0.1)
    interval = wilson_interval(agreed, count)
    assert interval == pytest.approx((low, high), abs=1e-4)
    summary = agreement.summary()
    assert "± 0%" not in summary
    assert f"{100 * agreed // count}% (95% Wilson interval {100 * low:.0f}–{100 * high:.0f}%)" in summary
    # a textbook value (Newcombe 1998, method 3): 0 of 10 -> 0 to 0.2775
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
