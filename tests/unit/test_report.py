"""The run report's statistics (means ± standard errors, paired change) and its smoothed curves."""

from __future__ import annotations

import math

import pytest

from rlhf_cli.engine.report import Comparison, curves_figure, report_markdown, smoothed, smoothing_window, standard_error


def comparison(before: list[float], after: list[float]) -> Comparison:
    count = len(before)
    return Comparison(prompts=[f"p{i}" for i in range(count)], before=["b"] * count, before_rewards=before,
                      after=["a"] * count, after_rewards=after)


def test_standard_error_is_sample_std_over_root_n():
    # values 1, 2, 3, 4: mean 2.5, sample variance 5/3, SE sqrt(5/3 / 4)
    assert standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 12))
    assert standard_error([0.7]) == 0.0 and standard_error([]) == 0.0


def test_change_uses_paired_differences():
    """Prompt-to-prompt spread cancels in the paired change: each prompt gains exactly 0.5."""
    result = comparison([-0.9, 0.0, 0.9, 0.3], [-0.4, 0.5, 1.4, 0.8])
    assert result.mean_change == pytest.approx(0.5)
    assert result.se_change == pytest.approx(0.0, abs=1e-12)
    assert result.se_before == pytest.approx(standard_error([-0.9, 0.0, 0.9, 0.3])) and result.se_before > 0.3


def test_report_states_means_standard_errors_and_counts():
    result = comparison([0.0, 0.2, 0.4], [0.5, 0.6, 1.0])
    text = report_markdown(result, title="run", reward_means=[0.1, 0.2, 0.3, 0.4])
    assert "over 3 held-out prompts, one sample per prompt and model" in text
    assert f"before: **+0.2000 ± {result.se_before:.4f}**" in text
    assert f"after: **+0.7000 ± {result.se_after:.4f}**" in text
    assert f"change (paired, prompt by prompt): **+0.5000 ± {result.se_change:.4f}**" in text
    assert "3 prompts, one sample each" in result.summary()


def test_smoothing_is_a_centred_moving_average():
    assert smoothed([0.0, 3.0, 6.0, 9.0, 0.0], 3) == pytest.approx([1.5, 3.0, 6.0, 5.0, 4.5])
    assert smoothing_window(5) == 1 and smoothing_window(40) == 5 and smoothing_window(100) % 2 == 1


def test_curves_draw_raw_points_a_smoothed_line_and_the_reward_spread():
    rows = [{"step": s, "env/reward_mean": 0.01 * s, "env/reward_std": 0.3, "objective/kl": 0.1 * s,
             "objective/kl_coef": 0.2} for s in range(1, 41)]
    figure = curves_figure(rows)
    reward, kl, beta = figure.axes
    for axis in (reward, kl, beta):
        raw, line = axis.get_lines()
        assert raw.get_linestyle() == "None" and raw.get_marker() == "."  # points per step
        assert line.get_linestyle() == "-" and len(line.get_xdata()) == 40  # the moving average
    assert len(reward.collections) == 1  # the ± std band of the step's samples
    band = reward.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.01 - 0.3) and band[:, 1].max() == pytest.approx(0.4 + 0.3)
    assert "β" in beta.get_title()


def test_curves_show_the_kl_loss_term_where_the_kl_is_in_the_loss():
    """GRPO's placement (kl_in_reward=false, a KL loss): β is 0 throughout, so the third panel shows
    the KL loss term instead; with both a reward penalty and a KL loss, both are drawn."""
    base = [{"step": s, "env/reward_mean": 0.0, "objective/kl": 0.1 * s, "ppo/loss/kl": 0.01 * s} for s in range(1, 21)]
    in_loss = curves_figure([dict(row, **{"objective/kl_coef": 0.0}) for row in base])
    assert [axis.get_title() for axis in in_loss.axes][2] == "KL loss term (mean per token)"
    assert len(in_loss.axes) == 3
    both = curves_figure([dict(row, **{"objective/kl_coef": 0.1}) for row in base])
    assert ["β" in axis.get_title() for axis in both.axes] == [False, False, True, False]


def test_the_stats_line_shows_the_kl_loss_instead_of_a_zero_beta(capsys):
    from rlhf_cli.reporting import Reporter

    reporter = Reporter(total_steps=1, enabled=True, progress=False)
    reporter.stats_line(1, {"env/reward_mean": 0.5, "objective/kl": 2.0, "objective/kl_coef": 0.0, "ppo/loss/kl": 0.25,
                            "ppo/loss/total": -0.1, "ppo/policy/clipfrac": 0.1, "time/step": 1.0})
    line = capsys.readouterr().out
    assert "kl-loss 0.25" in line and "β" not in line
    reporter.stats_line(2, {"env/reward_mean": 0.5, "objective/kl": 2.0, "objective/kl_coef": 0.2})
    assert "β 0.200" in capsys.readouterr().out
