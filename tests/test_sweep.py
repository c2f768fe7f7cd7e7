"""The sweep's table without a training run (tests/test_cache.py runs a real sweep)."""

from __future__ import annotations

from lora_dpo.sweep import COLUMNS, sweep_table


def test_sweep_table_has_one_line_per_beta_and_names_its_columns():
    rows = [
        {"beta": 0.05, "train_loss": 0.61234567, "eval_reward_accuracy": 0.75, "eval_reward_margin": -0.0123,
         "eval_preference_accuracy": 0.5, "eval_chosen_logratio": -3.14159, "run_dir": "runs/beta-0.05"},
        {"beta": 0.5, "train_loss": 0.1, "eval_reward_accuracy": 1.0, "eval_reward_margin": 2.0,
         "eval_preference_accuracy": 0.9, "eval_chosen_logratio": 10.0, "run_dir": "runs/beta-0.5"},
    ]
    assert sweep_table(rows) == (
        "| β | final train loss | eval reward accuracy | eval margin | eval preference accuracy "
        "| chosen log-ratio (eval) |\n"
        "|---|---|---|---|---|---|\n"
        "| 0.05 | 0.6123 | 0.7500 | -0.0123 | 0.5000 | -3.1416 |\n"
        "| 0.5 | 0.1000 | 1.0000 | 2.0000 | 0.9000 | 10.0000 |\n"
    )
    assert not any("kl" in key.lower() or "kl" in title.lower() for key, title in COLUMNS)


def test_sweep_table_adds_the_judges_columns_when_runs_were_judged():
    row = {"beta": 0.1, "train_loss": 0.5, "eval_reward_accuracy": 1.0, "eval_reward_margin": 1.0,
           "eval_preference_accuracy": 1.0, "eval_chosen_logratio": 0.5, "eval_win_rate": 0.75,
           "eval_score_gain": 1.25, "run_dir": "runs/beta-0.1"}
    lines = sweep_table([row]).splitlines()
    assert lines[0].endswith("| chosen log-ratio (eval) | win rate (eval) | score gain (eval) |")
    assert lines[2] == "| 0.1 | 0.5000 | 1.0000 | 1.0000 | 1.0000 | 0.5000 | 0.7500 | 1.2500 |"
    unjudged = {**row, "eval_win_rate": None, "eval_score_gain": None}
    assert "win rate" not in sweep_table([unjudged])

