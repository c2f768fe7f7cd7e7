"""Interruption and resume, and numerical faults: a killed or stopped run continues with exactly
the losses of an uninterrupted one; a non-finite step is skipped, reported, and bounded."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_edit import edited_cache_copy
from lora_dpo.config import dump_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import LoraDpoError
from lora_dpo.train import train
from precompute import precompute_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-tests")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    config = run_config(root, root / "unused")
    config.data.eval_path = ""
    precompute_reference(config)
    return root


def run_config(root: Path, output_dir: Path):
    config = demo_config(root)
    config.data.max_pairs = 48
    config.data.eval_path = ""
    config.precompute.cache_dir = str(root / "cache")
    config.train.output_dir = str(output_dir)
    config.train.overwrite_output_dir = False
    config.train.per_device_batch_size = 4
    config.train.gradient_accumulation_steps = 2
    config.train.epochs = 2  # 12 steps: the resume crosses an epoch boundary
    config.train.logging_steps = 1
    config.train.save_steps = 4
    config.lora.dropout = 0.1  # dropout draws from the RNG: its state must be restored too
    return config


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


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
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
        cwd=ROOT, capture_output=True, text=True, timeout=600,
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
    wait_for(lambda: len(losses(run_dir)) >= 6 if (run_dir / "metrics.jsonl").is_file() else False,
             process, "step 6")
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


def poisoned_cache(workdir: Path, tmp_path: Path, rows) -> Path:
    """A copy of the cache whose chosen reference value is NaN for the given source rows."""

    def poison(tensors):
        if rows == "all":
            hit = torch.ones_like(tensors["source_index"], dtype=torch.bool)
        else:
            hit = torch.isin(tensors["source_index"], torch.tensor(rows))
        tensors["chosen_logps"][hit] = math.nan

    return edited_cache_copy(workdir / "cache", tmp_path / "cache", poison)


def test_non_finite_step_is_skipped_and_reported(workdir, tmp_path, caplog):
    config = run_config(workdir, tmp_path / "run")
    config.precompute.cache_dir = str(poisoned_cache(workdir, tmp_path, [7]))
    config.train.epochs = 1
    with caplog.at_level("WARNING"):
        result = train(config)
    records = [r for r in result.history]
    skipped = [r["step"] for r in records if r["skipped_steps"]]
    assert len(skipped) == 1
    assert "non-finite" in caplog.text and "7" in caplog.text.split("source rows")[-1]
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped_steps"])
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_consecutive_non_finite_steps_stop_the_run(workdir, tmp_path):
    config = run_config(workdir, tmp_path / "run")
    config.precompute.cache_dir = str(poisoned_cache(workdir, tmp_path, "all"))
    config.train.max_consecutive_skips = 3
    with pytest.raises(LoraDpoError, match=r"stopping: 3 optimizer steps in a row had a non-finite loss"):
        train(config)
    assert not (tmp_path / "run" / "adapter").exists()
