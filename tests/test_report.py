"""The run report: health checks on synthetic runs (each fires on its failure and only there),
the figure's panels, report.md's sections, and a real CLI run that ends with a report."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lora_dpo.train as train_module
from lora_dpo.arguments import HelpFormatter, build_parser
from lora_dpo.cli import main
from lora_dpo.demo import demo_config
from lora_dpo.demo.task import HELD_OUT_NAMES, KIND, NAMES, UNKIND, write_jsonl
from lora_dpo.errors import LoraDpoError
from lora_dpo.report import (
    GUIDE,
    check_chosen_falling,
    health_checks,
    plot_metrics,
    read_metrics,
    run_totals,
    write_report,
)
from lora_dpo.tables import markdown_table
from lora_dpo.train import train
from precompute import precompute_reference

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.1
REF_CHOSEN, REF_REJECTED = -60.0, -62.0  # the reference's summed log-probs (nats)


def synthetic_run(
    run_dir: Path,
    chosen_drift,
    rejected_drift,
    accuracy=lambda t: min(1.0, 0.55 + t),
    steps: int = 10,
    extra_train: dict | None = None,
) -> Path:
    """A run directory whose metrics follow the given drifts (nats vs the reference) as
    functions of t in (0, 1], recorded the way the trainer records them."""
    run_dir.mkdir(parents=True)
    config = demo_config("unused").to_dict()
    config["train"]["beta"] = BETA
    config["precompute"]["cache_dir"] = str(run_dir / "no-cache")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        {
            "step": 0,
            "eval/rewards/accuracies": 0.5,
            "eval/rewards/margins": 0.0,
            "eval/preference_accuracy": 0.55,
            "elapsed_s": 1.0,
        }
    ]
    for step in range(1, steps + 1):
        t = step / steps
        dc, dr = chosen_drift(t), rejected_drift(t)
        margin = BETA * (dc - dr)
        record = {
            "step": step * 5,
            "lr": 1e-4 * (1 - t),
            "loss": math.log1p(math.exp(-margin)),
            "rewards/chosen": BETA * dc,
            "rewards/rejected": BETA * dr,
            "rewards/accuracies": accuracy(t),
            "rewards/margins": margin,
            "logps/chosen": REF_CHOSEN + dc,
            "logps/rejected": REF_REJECTED + dr,
            "grad_norm": 0.5,
            "step_time_s": 0.2,
            "tokens_per_s": 1000.0,
            "peak_memory_mb": 500.0 + step,
            "elapsed_s": 1.0 + step,
        }
        record.update((extra_train or {}).get(step, {}))
        lines.append(record)
    lines.append(
        {
            "step": steps * 5,
            "eval/rewards/accuracies": 0.9,
            "eval/rewards/margins": 0.4,
            "eval/preference_accuracy": 0.8,
            "elapsed_s": steps + 2.0,
        }
    )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def healthy(tmp_path: Path) -> Path:
    """Chosen up, rejected down, accuracy rising: a run that learns."""
    return synthetic_run(tmp_path / "healthy", lambda t: 3 * t, lambda t: -5 * t)


def fired(result) -> set[str]:
    return {check.name for check in result.checks if check.warning}


def fired_checks(run: Path) -> set[str]:
    """The checks alone, without drawing the figure."""
    checks = health_checks(read_metrics(run / "metrics.jsonl").train, BETA)
    return {check.name for check in checks if check.warning}


def test_falling_chosen_logprobs_while_margins_rise_is_named(tmp_path, caplog):
    """The classic DPO failure: the margin grows because rejected falls faster than chosen."""
    run = synthetic_run(tmp_path / "run", lambda t: -8 * t, lambda t: -20 * t)
    with caplog.at_level("WARNING"):
        result = write_report(run)
    assert fired(result) == {"chosen log-probs vs margins"}
    assert "| chosen log-probs vs margins | WARNING |" in result.markdown.read_text()
    (warning,) = result.warnings
    assert "chosen log-probs falling while margins rise" in warning
    assert "8.00 nats less likely" in warning
    markdown = result.markdown.read_text()
    assert "**1 warning(s).**" in markdown and warning in markdown
    assert warning in caplog.text  # and on the console


def test_healthy_run_has_no_warnings(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        result = write_report(healthy(tmp_path))
    assert result.warnings == [] and fired(result) == set()
    assert "No warnings." in result.markdown.read_text()
    assert "warning" not in caplog.text.lower()
    assert all(check.detail and "not judged" not in check.detail for check in result.checks)


@pytest.mark.parametrize(
    "case, check",
    [
        # |drift| 45 nats against a reference of 61: the policy has left it far behind.
        (dict(chosen_drift=lambda t: 30 * t, rejected_drift=lambda t: -60 * t), "drift from the reference"),
        (
            dict(
                chosen_drift=lambda t: 0.01 * t,
                rejected_drift=lambda t: -0.01 * t,
                accuracy=lambda t: 0.5 + 0.04 * math.sin(7 * t),
            ),
            "reward accuracy",
        ),
        (
            dict(
                chosen_drift=lambda t: 3 * t,
                rejected_drift=lambda t: -5 * t,
                extra_train={7: {"loss": float("nan"), "grad_norm": float("inf")}},
            ),
            "finite values",
        ),
        (
            dict(
                chosen_drift=lambda t: 3 * t,
                rejected_drift=lambda t: -5 * t,
                extra_train={4: {"skipped_steps": 2}},
            ),
            "finite values",
        ),
        (dict(chosen_drift=lambda t: -4 * t, rejected_drift=lambda t: -9 * t), "chosen log-probs vs margins"),
    ],
    ids=["drift", "accuracy-at-chance", "non-finite", "skipped-steps", "chosen-falling"],
)
def test_each_check_fires_on_its_failure_alone(tmp_path, case, check):
    assert fired_checks(synthetic_run(tmp_path / "run", **case)) == {check}


@pytest.mark.parametrize(
    "case",
    [
        # chosen falls, but so does the margin: a different problem, not this pattern
        dict(chosen_drift=lambda t: -4 * t, rejected_drift=lambda t: -2 * t, accuracy=lambda t: 0.2),
        # one noisy window below zero, then it recovers
        dict(chosen_drift=lambda t: -2.0 if 0.45 < t < 0.55 else 3 * t, rejected_drift=lambda t: -5 * t),
        # chosen falls steadily, but by less than 1 nat: not material
        dict(chosen_drift=lambda t: -0.5 * t, rejected_drift=lambda t: -5 * t),
        # flat, then one bad last window: not yet sustained
        dict(chosen_drift=lambda t: -3.0 if t == 1 else 0.2, rejected_drift=lambda t: -5 * t),
    ],
    ids=["margins-fall-too", "one-blip", "under-one-nat", "last-window-only"],
)
def test_chosen_check_needs_the_whole_pattern(tmp_path, case):
    assert "chosen log-probs vs margins" not in fired_checks(synthetic_run(tmp_path / "run", **case))


def test_trend_checks_wait_for_enough_records(tmp_path):
    """Three logging steps of the failure pattern are too few to call it a trend."""
    run = synthetic_run(
        tmp_path / "run", lambda t: -8 * t, lambda t: -20 * t, accuracy=lambda t: 0.5, steps=3
    )
    result = write_report(run)
    assert fired(result) == set()
    judged = {c.name: c.detail for c in result.checks}
    assert "not judged" in judged["chosen log-probs vs margins"]
    assert "not judged" in judged["reward accuracy"]


# ---- the chosen-falling check on real runs ------------------------------------------------


def shared_opening_pairs(names: list[str], count: int, rng: random.Random) -> list[dict[str, str]]:
    """Demo-style pairs whose chosen and rejected share a long opening; the rejected one ends
    a word sooner."""
    rows = []
    for _ in range(count):
        name = rng.choice(names)
        kind, unkind = rng.sample(KIND, 2), rng.choice(UNKIND)
        opening = f"{name} is a person who is known to all of us as"
        rows.append(
            {
                "prompt": f"Describe {name} in a few words.\n",
                "chosen": f"{opening} {kind[0]} and {kind[1]}.",
                "rejected": f"{opening} {unkind}.",
            }
        )
    return rows


@pytest.fixture(scope="module")
def shared_opening_workdir(demo_workdir, tmp_path_factory):
    """The demo's tiny model and tokenizer, shared-opening pairs, and their reference cache."""
    workdir = tmp_path_factory.mktemp("shared-opening")
    rng = random.Random(0)
    write_jsonl(workdir / "train.jsonl", shared_opening_pairs(NAMES[:-HELD_OUT_NAMES], 256, rng))
    write_jsonl(workdir / "eval.jsonl", shared_opening_pairs(NAMES[-HELD_OUT_NAMES:], 32, rng))
    precompute_reference(shared_opening_config(demo_workdir, workdir, workdir / "unused", "sigmoid"))
    return demo_workdir, workdir


def shared_opening_config(demo_workdir: Path, workdir: Path, run_dir: Path, loss_type: str):
    config = demo_config(demo_workdir)
    config.data.train_path, config.data.eval_path = str(workdir / "train.jsonl"), str(workdir / "eval.jsonl")
    config.precompute.cache_dir = str(workdir / "cache")
    config.train.output_dir = str(run_dir)
    config.train.loss_type = loss_type
    config.train.learning_rate = 0.01  # five times the demo's: a fast, clear trend
    config.train.max_steps = 32  # one epoch of 256 pairs, 8 per step
    config.train.logging_steps = 1
    config.train.beta = BETA
    config.validate()
    return config


def test_chosen_falling_fires_on_a_real_ipo_run(shared_opening_workdir, tmp_path, monkeypatch):
    """IPO on pairs that share a long opening, the rejected response shorter: the per-token
    normalisation weighs the rejected copy of the shared tokens more than the chosen one, so
    pushing the rejected responses down pushes the chosen ones down too while the margin grows.
    The check fires on the summed rewards the run logs. Control: the same run's rewards taken
    per token (β·Δ/|y|, how IPO rewards were logged before every loss type logged summed ones)
    stay far from -1 nat, so the same check on them stays silent."""
    per_token, summed = [], []  # per logged step (one micro-batch each): means over its pairs
    real_loss = train_module.compute_loss

    def recording_loss(settings, batch):
        out = real_loss(settings, batch)
        chosen_tokens, rejected_tokens = batch.chosen_tokens.clamp(min=1), batch.rejected_tokens.clamp(min=1)
        per_token.append(
            (
                (out.chosen_rewards / chosen_tokens).double().mean().item(),
                (out.rejected_rewards / rejected_tokens).double().mean().item(),
            )
        )
        summed.append(out.chosen_rewards.double().mean().item())
        return out

    monkeypatch.setattr(train_module, "compute_loss", recording_loss)
    result = train(shared_opening_config(*shared_opening_workdir, tmp_path / "run", "ipo"))
    records = read_metrics(result.output_dir / "metrics.jsonl").train
    assert [r["rewards/chosen"] for r in records] == pytest.approx(summed, rel=1e-9)  # step k = call k
    assert records[-1]["rewards/chosen"] / BETA < -2  # the chosen responses really fell ...
    assert records[-1]["rewards/margins"] > 0.2  # ... while the margin grew

    checks = health_checks(records, BETA)
    assert {c.name for c in checks if c.warning} == {"chosen log-probs vs margins"}
    assert "chosen log-probs falling while margins rise" in (result.output_dir / "report.md").read_text()

    per_token_records = [
        {**r, "rewards/chosen": c, "rewards/rejected": rej, "rewards/margins": c - rej}
        for r, (c, rej) in zip(records, per_token, strict=True)
    ]
    old_way = check_chosen_falling(per_token_records, BETA)
    assert old_way.warning is None, old_way.detail
    assert per_token_records[-1]["rewards/chosen"] / BETA > -0.5  # a tenth of a nat per token


def test_chosen_falling_stays_silent_on_a_sigmoid_run_of_the_same_pairs(shared_opening_workdir, tmp_path):
    """Same pairs and settings with the sigmoid loss: the chosen responses become more likely."""
    result = train(shared_opening_config(*shared_opening_workdir, tmp_path / "run", "sigmoid"))
    records = read_metrics(result.output_dir / "metrics.jsonl").train
    assert records[-1]["rewards/chosen"] > 0 and records[-1]["rewards/margins"] > 0.1
    assert check_chosen_falling(records, BETA).warning is None


def test_every_panel_has_data_and_labelled_axes(tmp_path):
    records = read_metrics(healthy(tmp_path) / "metrics.jsonl")
    figure = plot_metrics(records, "title", max_grad_norm=1.0)
    axes = figure.axes
    assert len(axes) == 6
    titles = [ax.get_title() for ax in axes]
    assert titles[:4] == [
        "DPO loss",
        "reward accuracy",
        "implicit rewards",
        "policy log-probs (mean over each window's pairs)",
    ]
    for ax in axes:
        data = [line for line in ax.get_lines() if line.get_gid() != GUIDE]
        assert data and all(len(line.get_xdata()) >= 1 for line in data), ax.get_title()
        assert ax.get_xlabel() == "optimizer step"
        assert ax.get_ylabel(), ax.get_title()
    # train and eval in the accuracy panel; chosen and rejected together in the log-prob panel
    assert {line.get_label() for line in axes[1].get_lines()} >= {"train", "eval"}
    assert {line.get_label() for line in axes[3].get_lines()} == {"chosen", "rejected"}
    logps = {line.get_label(): list(line.get_ydata()) for line in axes[3].get_lines()}
    assert logps["chosen"] == [r["logps/chosen"] for r in records.train]


def test_report_md_has_every_section(tmp_path):
    run = healthy(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(
        json.dumps(
            {
                "format": "lora-dpo-reference-cache",
                "version": 1,
                "created": "2026-01-01T00:00:00+00:00",
                "identity": {
                    "model": {"weights_sha256": "ab" * 32, "config_sha256": "cd" * 32},
                    "tokenization": {
                        "tokenizer_sha256": "ef" * 32,
                        "max_length": 64,
                        "max_prompt_length": 32,
                    },
                },
                "reference": {"mode": "policy", "quantization": "nf4", "dtype": "float32"},
                "data": {},
                "pairs": {"train": 256, "eval": 64},
                "shards": [],
                "seconds": 61.5,
                "versions": {"torch": "2.13.0"},
            }
        )
    )
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["precompute"]["cache_dir"] = str(cache)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "data_report.json").write_text(
        json.dumps(
            {
                "source": "train.jsonl",
                "format": "explicit",
                "total": 260,
                "kept": 256,
                "dropped": {"empty_response": 4},
                "truncated": 3,
                "lengths": {"pair": {"p50": 23.0, "p90": 27.0, "p99": 30.0, "max": 31.0}},
            }
        )
    )
    result = write_report(run)
    text = result.markdown.read_text()
    for heading in (
        "## Health checks",
        "## Summary",
        "## Final metrics",
        "## Config",
        "## Reference cache",
        "## Training data",
    ):
        assert heading in text
    assert "ab" * 32 in text and "ef" * 32 in text and "train 256, eval 64" in text
    assert "| `train.beta` | 0.1 |" in text
    assert "empty_response 4" in text and "| pair | 23 | 27 | 30 | 31 |" in text
    assert "| wall time | 12.0 s" in text  # the last record's elapsed_s
    assert "| throughput | 1,000 tokens/s" in text
    assert "| peak memory | 510 MB" in text
    assert "| eval/rewards/accuracies | 0.5 | 0.9 |" in text  # first and last eval
    assert "![training curves](report.png)" in text
    png = result.png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000


def test_markdown_table_formats_and_escapes_cells():
    lines = markdown_table(
        ("metric", "value"),
        [
            ("loss", 0.123456),
            ("targets", ["q_proj", "v_proj"]),
            ("empty", []),
            ("steps", 4),
            ("path", "a|b"),
            ("text", "0.5"),
        ],
    )
    assert lines == [
        "| metric | value |",
        "|---|---|",
        "| loss | 0.1235 |",  # floats to 4 significant digits
        "| targets | q_proj, v_proj |",
        "| empty | [] |",
        "| steps | 4 |",
        "| path | a\\|b |",  # a bare | would end the cell
        "| text | 0.5 |",  # text is kept as it is: the caller's own format
    ]


def test_overall_throughput_weighs_each_window_by_its_length():
    train = [
        {"step": 8, "step_time_s": 0.5, "tokens_per_s": 100.0},  # 8 steps: 4 s, 400 tokens
        {"step": 10, "step_time_s": 1.0, "tokens_per_s": 400.0},  # 2 steps: 2 s, 800 tokens
    ]
    totals = run_totals(train)
    assert totals["tokens_per_s"] == pytest.approx(1200 / 6)
    assert totals["train_loop_s"] == pytest.approx(6.0)


def test_wall_time_adds_up_the_sessions_of_a_resumed_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    elapsed = [(0, 2.0), (5, 10.0), (10, 20.0), (10, 4.0), (15, 9.0)]  # resumed after step 10
    path.write_text("".join(json.dumps({"step": s, "loss": 0.6, "elapsed_s": e}) + "\n" for s, e in elapsed))
    records = read_metrics(path)
    assert records.wall_s == 29.0 and records.sessions == 2


def test_interrupted_last_line_is_skipped_and_noted(tmp_path):
    run = healthy(tmp_path)
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 55, "loss": 0.3')
    result = write_report(run)
    assert "metrics.jsonl line 13 is not JSON" in result.markdown.read_text()


def test_a_directory_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(LoraDpoError, match="no metrics.jsonl here"):
        write_report(tmp_path)


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_every_option_of_every_verb_shows_its_default():
    parser = build_parser()
    verbs = dict(_subparsers(parser))
    assert {"precompute-ref", "train", "eval", "demo", "report"} <= set(verbs)
    for name, sub in [("lora-dpo", parser), *verbs.items()]:
        formatter = HelpFormatter(name)
        for action in sub._actions:
            if not action.option_strings or action.required or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
        assert "(default: None)" not in sub.format_help(), name


def test_quiet_run_has_no_bars_one_line_per_step_and_ends_with_a_report(demo_workdir, tmp_path, capsys):
    """precompute-ref and train with --quiet through the command's entry point, in a fresh
    process (TQDM_DISABLE must be set before tqdm loads; one process for both keeps it cheap)."""
    common = [
        "--config",
        "configs/demo.yaml",
        "--quiet",
        f"model.name_or_path={demo_workdir / 'model'}",
        f"data.train_path={demo_workdir / 'data' / 'train.jsonl'}",
        f"data.eval_path={demo_workdir / 'data' / 'eval.jsonl'}",
        f"precompute.cache_dir={tmp_path / 'cache'}",
        "data.max_pairs=32",  # 8 pairs per step: 4 steps per epoch
        "train.epochs=1",
        "train.logging_steps=1",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    script = (
        "import sys; from lora_dpo.cli import main; args = sys.argv[1:]; "
        "sys.exit(main(['precompute-ref', *args]) or main(['train', *args]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *common], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "reference cache:" in done.stderr  # precompute ran ...
    assert "%|" not in done.stdout + done.stderr  # ... and nothing drew a tqdm bar
    step_lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == [f"step {s}/4" for s in range(1, 5)]
    assert " MB" in step_lines[0]  # peak memory on the console line

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_mb"] > 50 and r["elapsed_s"] > 0 for r in records if "loss" in r)
    text = (run / "report.md").read_text()
    assert "No warnings." in text  # a real run that learns raises no false alarm
    assert "not judged" not in text  # 4 records: every check had enough to judge
    assert (run / "report.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["identity"]["model"]["weights_sha256"] in text
    assert "| optimizer steps | 4 |" in text

    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert str(run / "report.md") in capsys.readouterr().out and (run / "report.md").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "error: " in capsys.readouterr().err
