"""The sweep: its table, the grid's parsing (the config's own parser), and a real grid of loss
types x betas on one cache (tests/test_cache.py runs a real β sweep)."""

from __future__ import annotations

import json

import pytest

from lora_dpo.cli import main
from lora_dpo.demo import demo_config
from lora_dpo.errors import ConfigError
from lora_dpo.sweep import (
    COLUMNS,
    SweepAxis,
    grid_points,
    run_dir_name,
    split_values,
    sweep_axes,
    sweep_table,
)
from precompute import precompute_reference


def test_sweep_table_has_one_line_per_beta_and_names_its_columns():
    rows = [
        {
            "beta": 0.05,
            "train_loss": 0.61234567,
            "eval_reward_accuracy": 0.75,
            "eval_reward_margin": -0.0123,
            "eval_preference_accuracy": 0.5,
            "eval_chosen_logratio": -3.14159,
            "run_dir": "runs/beta-0.05",
        },
        {
            "beta": 0.5,
            "train_loss": 0.1,
            "eval_reward_accuracy": 1.0,
            "eval_reward_margin": 2.0,
            "eval_preference_accuracy": 0.9,
            "eval_chosen_logratio": 10.0,
            "run_dir": "runs/beta-0.5",
        },
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
    row = {
        "beta": 0.1,
        "train_loss": 0.5,
        "eval_reward_accuracy": 1.0,
        "eval_reward_margin": 1.0,
        "eval_preference_accuracy": 1.0,
        "eval_chosen_logratio": 0.5,
        "eval_win_rate": 0.75,
        "eval_score_gain": 1.25,
        "run_dir": "runs/beta-0.1",
    }
    lines = sweep_table([row]).splitlines()
    assert lines[0].endswith("| chosen log-ratio (eval) | win rate (eval) | score gain (eval) |")
    assert lines[2] == "| 0.1 | 0.5000 | 1.0000 | 1.0000 | 1.0000 | 0.5000 | 0.7500 | 1.2500 |"
    unjudged = {**row, "eval_win_rate": None, "eval_score_gain": None}
    assert "win rate" not in sweep_table([unjudged])


def test_sweep_table_has_a_column_per_varied_key():
    rows = [
        {
            "loss_type": "simpo",
            "loss_weights": None,
            "beta": 2.5,
            "train_loss": 0.9,
            "eval_reward_accuracy": 0.95,
            "eval_reward_margin": 0.3,
            "eval_preference_accuracy": 0.9,
            "eval_chosen_logratio": None,
        },
        {
            "loss_type": "sigmoid+sft",
            "loss_weights": [0.5, 1.0],
            "beta": 0.1,
            "train_loss": 6.0,
            "eval_reward_accuracy": 0.85,
            "eval_reward_margin": 0.1,
            "eval_preference_accuracy": 0.8,
            "eval_chosen_logratio": 1.5,
        },
    ]
    lines = sweep_table(rows, ["loss_type", "loss_weights", "beta"]).splitlines()
    assert lines[0].startswith("| loss_type | loss_weights | β | final train loss |")
    assert lines[2] == "| simpo | none | 2.5 | 0.9000 | 0.9500 | 0.3000 | 0.9000 | n/a |"
    assert lines[3] == "| sigmoid+sft | 0.5+1 | 0.1 | 6.0000 | 0.8500 | 0.1000 | 0.8000 | 1.5000 |"


def test_values_split_at_top_level_commas_only():
    assert split_values("sigmoid,ipo") == ["sigmoid", "ipo"]
    assert split_values("[0.8,0.2,1.0], [1,1,1],none") == ["[0.8,0.2,1.0]", "[1,1,1]", "none"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_axes_from_the_command_line():
    axes = sweep_axes(["train.loss_type=sigmoid,ipo"], "0.05,0.1")
    assert axes == [SweepAxis("loss_type", ("sigmoid", "ipo")), SweepAxis("beta", ("0.05", "0.1"))]
    assert run_dir_name({"loss_type": "ipo", "beta": 0.05}) == "loss_type-ipo_beta-0.05"
    assert run_dir_name({"beta": 0.1}) == "beta-0.1"
    assert (
        run_dir_name({"loss_weights": [0.8, 0.2, 1.0], "use_weighting": True})
        == "loss_weights-0.8+0.2+1_use_weighting-true"
    )


@pytest.mark.parametrize(
    "sets, betas, message",
    [
        (["train.beta"], None, r"--set 'train.beta': expected train.KEY=V1,V2"),
        (["lora.r=4,8"], None, r"--set lora.r: a sweep varies train.\* settings"),
        (["train.output_dir=a,b"], None, r"--set train.output_dir: the sweep sets this itself"),
        (["train.beta=0.1,,0.2"], None, r"an empty value"),
        (["train.beta=0.1,0.1"], None, r"a value is listed twice"),
        (["train.beta=0.1,0.2"], "0.3", r"train.beta is varied twice"),
        ([], None, r"nothing to vary"),
    ],
)
def test_bad_axes_are_one_line_errors(sets, betas, message):
    with pytest.raises(ConfigError, match=message):
        sweep_axes(sets, betas)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.beta=0.1,abc"], r"sweep point train.beta=abc: train.beta: expected float, got str 'abc'"),
        (["train.beta=0.1,-1"], r"sweep point train.beta=-1: train.beta=-1.0: must be > 0"),
        (["train.bta=0.1,0.2"], r"unknown key 'train.bta' \(did you mean 'beta'\?\)"),
        (
            ["train.loss_type=sigmoid,ipo", "train.label_smoothing=0,0.1"],
            r"sweep point train.loss_type=ipo, train.label_smoothing=0.1: train.label_smoothing=0.1 has no effect",
        ),
        (["train.beta=0.1,1e-1"], r"two grid points are the same run \(beta-0.1\)"),
    ],
)
def test_every_grid_point_is_parsed_and_checked_by_the_config(demo_workdir, sets, message):
    with pytest.raises(ConfigError, match=message):
        grid_points(demo_config(demo_workdir), sweep_axes(sets))


def test_a_bad_value_is_one_error_line_from_the_cli(demo_workdir, capsys):
    code = main(
        [
            "sweep",
            "--set",
            "train.loss_type=sigmoid,dpo",
            f"model.name_or_path={demo_workdir / 'model'}",
            f"data.eval_path={demo_workdir / 'data' / 'eval.jsonl'}",
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(
        "error: sweep point train.loss_type=dpo: train.loss_type='dpo': must be one of sigmoid, ipo"
    ), lines


# ---- a real grid ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_workdir(demo_workdir):
    config = demo_config(demo_workdir)
    config.data.max_pairs = 32
    config.precompute.cache_dir = str(demo_workdir / "cache-sweep")
    config.train.ld_alpha = 0.5  # the cache also holds LD-DPO's statistic; other losses skip it
    precompute_reference(config)
    return demo_workdir


def sweep_config(workdir, tmp_path):
    config = demo_config(workdir)
    config.data.max_pairs = 32
    config.precompute.cache_dir = str(workdir / "cache-sweep")
    config.train.output_dir = str(tmp_path / "sweep")
    config.train.max_steps = 2
    return config


def count_model_work(monkeypatch):
    """The documented seams: every model load goes through transformers' from_pretrained, every
    reference run through lora_dpo.cache.build.score_pairs."""
    from transformers import AutoModelForCausalLM

    import lora_dpo.cache.build as build

    reference_runs, model_loads = [], []
    real_score = build.score_pairs
    monkeypatch.setattr(build, "score_pairs", lambda *a, **k: reference_runs.append(1) or real_score(*a, **k))
    real_load = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: model_loads.append(1) or real_load(cls, *a, **k)),
    )
    return reference_runs, model_loads


def test_grid_of_loss_types_and_betas_on_one_cache(sweep_workdir, tmp_path, monkeypatch):
    import lora_dpo.sweep as sweep

    reference_runs, model_loads = count_model_work(monkeypatch)
    cache = sweep_workdir / "cache-sweep"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    config = sweep_config(sweep_workdir, tmp_path)
    result = sweep.run_sweep(config, sweep_axes(["train.loss_type=sigmoid,ipo", "train.beta=0.05,0.1"]))

    assert reference_runs == []
    assert len(model_loads) == 1  # the 4-bit base, once for all four runs
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
    assert [(row["loss_type"], row["beta"]) for row in result.rows] == [
        ("sigmoid", 0.05),
        ("sigmoid", 0.1),
        ("ipo", 0.05),
        ("ipo", 0.1),
    ]
    names = [
        "loss_type-sigmoid_beta-0.05",
        "loss_type-sigmoid_beta-0.1",
        "loss_type-ipo_beta-0.05",
        "loss_type-ipo_beta-0.1",
    ]
    assert [row["run_dir"] for row in result.rows] == [str(tmp_path / "sweep" / name) for name in names]
    lines = result.table_md.read_text().splitlines()
    assert len(lines) == 2 + 4
    assert lines[0] == (
        "| loss_type | β | final train loss | eval reward accuracy | eval margin "
        "| eval preference accuracy | chosen log-ratio (eval) |"
    )
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| sigmoid", "0.05"],
        ["| sigmoid", "0.1"],
        ["| ipo", "0.05"],
        ["| ipo", "0.1"],
    ]
    saved = json.loads(result.table_json.read_text())
    assert saved["varied"] == ["loss_type", "beta"] and len(saved["runs"]) == 4
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each run is the configured one: the step-1 loss at z = 0 is ln 2 for sigmoid, 1/(4β²) for IPO.
    for row, expected in zip(result.rows, (0.6931472, 0.6931472, 1 / (4 * 0.05**2), 1 / (4 * 0.1**2))):
        first = json.loads(
            (
                tmp_path
                / "sweep"
                / run_dir_name({"loss_type": row["loss_type"], "beta": row["beta"]})
                / "metrics.jsonl"
            )
            .read_text()
            .splitlines()[1]
        )
        assert first["loss"] == pytest.approx(expected, abs=1e-5), row


def test_a_reference_free_grid_needs_no_cache(sweep_workdir, tmp_path, monkeypatch):
    import lora_dpo.sweep as sweep

    reference_runs, model_loads = count_model_work(monkeypatch)
    config = sweep_config(sweep_workdir, tmp_path)
    config.precompute.cache_dir = str(tmp_path / "no-cache")
    config.train.loss_type = "simpo"
    result = sweep.run_sweep(config, sweep_axes(["train.simpo_gamma=0.5,1"], "2.5"))
    assert reference_runs == [] and len(model_loads) == 1
    assert not (tmp_path / "no-cache").exists()
    assert [row["simpo_gamma"] for row in result.rows] == [0.5, 1.0]
    assert all(row["eval_chosen_logratio"] is None for row in result.rows)
    assert result.table_md.read_text().splitlines()[2].endswith("| n/a |")


def test_an_ld_alpha_axis_reads_the_shared_prefix_from_the_same_cache(sweep_workdir, tmp_path, monkeypatch):
    import lora_dpo.sweep as sweep

    reference_runs, model_loads = count_model_work(monkeypatch)
    result = sweep.run_sweep(sweep_config(sweep_workdir, tmp_path), sweep_axes(["train.ld_alpha=1,0.5,0"]))
    assert reference_runs == [] and len(model_loads) == 1
    assert [row["ld_alpha"] for row in result.rows] == [1.0, 0.5, 0.0]
    for name in ("ld_alpha-1", "ld_alpha-0.5", "ld_alpha-0"):  # z = 0 at step 1 under every weighting
        first = json.loads((tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines()[1])
        assert first["loss"] == pytest.approx(0.6931472, abs=1e-5), name
