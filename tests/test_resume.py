"""Interruption and resume, and numerical faults: a killed or stopped run continues with exactly
the losses of an uninterrupted one; a non-finite step is skipped, reported, and bounded."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.config import dump_config
from lora_dpo.errors import ConfigError, LoraDpoError
from lora_dpo.inputs import RunInputs, load_run_inputs
from lora_dpo.train import train
from runs import interrupt, losses, prepare_workdir, run_config, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    return prepare_workdir(demo_workdir, tmp_path_factory.mktemp("resume-tests"))


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(run_config(workdir, run_dir))
    return run_dir


def start_slow_training(config, tmp_path: Path) -> subprocess.Popen:
    """`lora-dpo train` slow enough for the test to act between steps (the fault hook)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    return subprocess.Popen(
        [sys.executable, "-m", "lora_dpo.cli", "train", "--config", str(config_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LORA_DPO_STEP_DELAY_S": "0.5"},
    )


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {what}: {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def resume_cli(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_dpo.cli", "train", "--resume", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume(workdir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    process = start_slow_training(run_config(workdir, run_dir), tmp_path)
    wait_for(lambda: (run_dir / "checkpoints" / "step-000004").is_dir(), process, "the step-4 checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "adapter").exists()

    resumed = resume_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert losses(run_dir) == losses(uninterrupted)
    assert [step for step, _ in losses(run_dir)] == list(range(1, 13))
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_and_exits_cleanly(workdir, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    process = start_slow_training(run_config(workdir, run_dir), tmp_path)
    wait_for(
        lambda: len(losses(run_dir)) >= 6 if (run_dir / "metrics.jsonl").is_file() else False,
        process,
        "step 6",
    )
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=400)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM at step" in stderr and "lora-dpo train --resume" in stderr
    assert "Traceback" not in stderr
    stopped_at = int(stderr.split("SIGTERM at step ")[1].split("/")[0])
    assert 6 <= stopped_at < 12
    assert (run_dir / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    # save_total_limit=2: only the two newest checkpoints remain
    assert len(list((run_dir / "checkpoints").iterdir())) == 2

    resumed = resume_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(run_dir) == losses(uninterrupted)


def test_a_cut_short_metrics_line_is_dropped_on_resume(workdir, uninterrupted, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 10, monkeypatch)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 11, "lr": 0.001, "lo')  # what a SIGKILL mid-append leaves
    with caplog.at_level("WARNING"):
        train(run_config(workdir, run_dir), resume=True)
    assert "metrics.jsonl line 11 is cut short (an interrupted write); dropped" in caplog.text
    assert losses(run_dir) == losses(uninterrupted)


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:-100]),
        lambda c: (c / "trainer_state.json").write_text('{"step": '),
        lambda c: (c / "adapter_model.safetensors").unlink(),
    ],
    ids=["truncated-optimizer", "torn-trainer-state", "missing-adapter"],
)
def test_a_damaged_newest_checkpoint_resumes_from_the_older(
    workdir, uninterrupted, tmp_path, monkeypatch, caplog, damage
):
    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 10, monkeypatch)
    (run_dir / "checkpoints" / "notes").mkdir()  # a stray directory is no checkpoint
    damage(run_dir / "checkpoints" / "step-000008")
    with caplog.at_level("INFO"):
        train(run_config(workdir, run_dir), resume=True)
    assert f"damaged checkpoint: {run_dir / 'checkpoints' / 'step-000008'}/" in caplog.text
    assert "from step-000004 (step 4 of 12)" in caplog.text
    assert losses(run_dir) == losses(uninterrupted)
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_resume_that_changes_the_computation_is_refused_naming_each(workdir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 6, monkeypatch)
    before = snapshot(run_dir)
    config = run_config(workdir, run_dir)
    config.train.beta = 0.05
    config.data.max_pairs = 40
    config.train.gradient_accumulation_steps = 1
    with pytest.raises(ConfigError) as refused:
        train(config, resume=True)
    message = str(refused.value)
    assert "train.beta: the run used 0.1, this resume asks for 0.05" in message
    assert "data.max_pairs: the run used 48, this resume asks for 40" in message
    assert "train.gradient_accumulation_steps: the run used 2, this resume asks for 1" in message
    assert "\n" not in message
    assert snapshot(run_dir) == before


def test_a_cosmetic_resume_override_is_used_and_recorded(workdir, uninterrupted, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 6, monkeypatch)
    config_yaml = (run_dir / "config.yaml").read_bytes()
    config = run_config(workdir, run_dir)
    config.train.save_steps = 5
    train(config, resume=True)
    assert losses(run_dir) == losses(uninterrupted)
    assert (run_dir / "config.yaml").read_bytes() == config_yaml  # the settings the run started with
    # saved every 5 steps from the resume on (step 4's checkpoint, the older one, is pruned)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    (resumed,) = json.loads((run_dir / "resumes.json").read_text())["resumes"]
    assert resumed["step"] == 4 and resumed["checkpoint"] == "step-000004"
    assert resumed["changed"] == {"train.save_steps": {"run": 4, "resume": 5}}


def test_cli_resume_refuses_a_changed_beta(workdir, tmp_path, monkeypatch, capsys):
    from lora_dpo.cli import main

    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 6, monkeypatch)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "train.beta=0.05", "train.logging_steps=3"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --resume")
        and err.count("\n") == 1
        and "train.beta: the run used 0.1, this resume asks for 0.05" in err
    )
    assert "logging_steps" not in err


def poisoned_inputs(config, rows) -> RunInputs:
    """The run's inputs with a NaN chosen reference value for the given source rows (in memory:
    a cache holding one is refused when it is opened)."""
    inputs = load_run_inputs(config)
    sources = torch.tensor([pair.source_index for pair in inputs.pairs])
    hit = (
        torch.ones_like(sources, dtype=torch.bool)
        if rows == "all"
        else torch.isin(sources, torch.tensor(rows))
    )
    inputs.reference.chosen_logps[hit] = math.nan
    return inputs


def test_non_finite_step_is_skipped_and_reported(workdir, tmp_path, caplog):
    config = run_config(workdir, tmp_path / "run")
    config.train.epochs = 1
    with caplog.at_level("WARNING"):
        result = train(config, poisoned_inputs(config, [7]))
    records = [r for r in result.history]
    skipped = [r["step"] for r in records if r["skipped_steps"]]
    assert len(skipped) == 1
    assert "non-finite" in caplog.text and "7" in caplog.text.split("source rows")[-1]
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped_steps"])
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_consecutive_non_finite_steps_stop_the_run(workdir, tmp_path):
    config = run_config(workdir, tmp_path / "run")
    config.train.max_consecutive_skips = 3
    with pytest.raises(LoraDpoError, match=r"stopping: 3 optimizer steps in a row had a non-finite loss"):
        train(config, poisoned_inputs(config, "all"))
    assert not (tmp_path / "run" / "adapter").exists()
