"""Shared by the whole-run tests of resume and the run directory: a small 12-step config on the
demo's tiny model, and ways to look at and to interrupt a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_dpo.demo import demo_config
from lora_dpo.faults import FAIL_AT_STEP, InjectedFault
from lora_dpo.train import train
from precompute import precompute_reference


def prepare_workdir(demo_workdir: Path, root: Path) -> Path:
    """The demo's model and data under `root`, with a reference cache for `run_config`."""
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    precompute_reference(run_config(root, root / "unused"))
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


def interrupt(config, at_step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `config` until it crashes after optimizer step `at_step` (the fault hook)."""
    monkeypatch.setenv(FAIL_AT_STEP, str(at_step))
    with pytest.raises(InjectedFault, match=f"failed on purpose at step {at_step}"):
        train(config)
    monkeypatch.delenv(FAIL_AT_STEP)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path (the lock names its last holder: left out)."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }
