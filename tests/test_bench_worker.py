"""benchmarks/bench_worker.py's lora-dpo side on the demo task, as bench_trl.py starts it (a
subprocess per measurement): its hooks into training still find what they wrap, so the
benchmark reports real step times, decoder token counts and first-step FLOPs. TRL is a
benchmark-only extra and not installed for the tests; its side runs in the benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_dpo.demo import demo_config

WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_worker.py"

pytestmark = pytest.mark.slow


def worker(mode: str, out: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_lora_worker_measures_a_real_run(demo_workdir, tmp_path):
    config = demo_config(demo_workdir)
    settings = {
        "model": {"name_or_path": config.model.name_or_path},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "data": {"train_path": config.data.train_path, "max_length": 64, "max_prompt_length": 32},
        "precompute": {"cache_dir": str(tmp_path / "cache"), "batch_size": 32},
        "train": {"output_dir": str(tmp_path / "run"), "per_device_batch_size": 8, "max_steps": 3},
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(settings))
    precompute = worker("lora-precompute", tmp_path / "precompute.json", str(path))
    assert precompute["pairs"] > 0 and precompute["precompute_s"] > 0
    train = worker("lora-train", tmp_path / "train.json", str(path), "train.logging_steps=1")
    assert len(train["step_times"]) == 3 and all(t > 0 for t in train["step_times"])
    assert math.isclose(train["losses"][0], math.log(2), abs_tol=1e-6)
    assert train["rss_peaks"]["train"] > 0  # the hook around build_policy marked training
    steps = train["decoder_tokens"]  # counted by the hook on the decoder, one entry per step
    assert len(steps) == 3 and all(s["computed"] == s["real"] > 0 for s in steps)  # packed: no padding
    assert train["first_step_flops"] > 0 and train["first_step_computed_tokens"] == steps[0]["computed"]
