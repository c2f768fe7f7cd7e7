"""Both stages under real `torchrun` (gloo on the CPU): the same cache, training and eval as one
process, a rank far behind the others waited for, and a failing rank stops the whole job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.cache import ReferenceCache
from lora_dpo.config import dump_config
from lora_dpo.demo import demo_config

pytestmark = pytest.mark.slow  # every test here starts torchrun

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def config_for(workdir: Path, tmp_path: Path, **train):
    config = demo_config(workdir)
    config.data.max_pairs = 40
    config.precompute.cache_dir = str(tmp_path / "cache")
    config.precompute.shard_size = 8
    config.lora.dropout = 0.0  # dropout masks are per process: equal runs need none
    config.train.logging_steps = 1
    config.train.max_steps = 4
    config.train.per_device_batch_size = 4
    config.train.save_steps = 0
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def run(args: list[str], config, tmp_path: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(dump_config(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(
        [*args, "--config", str(config_file)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    return root


def test_precompute_under_torchrun_equals_one_process(workdir, tmp_path):
    one = config_for(workdir, tmp_path / "one")
    two = config_for(workdir, tmp_path / "two")
    run([sys.executable, "-m", "lora_dpo.cli", "precompute-ref"], one, tmp_path, "one")
    run([*TORCHRUN, "-m", "lora_dpo.cli", "precompute-ref"], two, tmp_path, "two")
    a, b = ReferenceCache(one.precompute.cache_dir), ReferenceCache(two.precompute.cache_dir)
    assert len(a) == len(b) == 80
    rows = [b.row_of[h] for h in a.pair_hashes]
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps[rows], rtol=0, atol=1e-6)
    assert torch.equal(a.chosen_tokens, b.chosen_tokens[rows])
    assert a.manifest.identity == b.manifest.identity
    assert a.manifest.shards == b.manifest.shards  # the same files, byte for byte (sha256)


def test_a_rank_far_behind_is_waited_for_past_the_collective_timeout(workdir, tmp_path):
    """Rank 1 starts its shards 25 s late while the default process group times out after 8 s:
    rank 0 waits in the long-timeout gloo group (a default-group barrier fails here), and the
    cache is the one-process cache."""
    one = config_for(workdir, tmp_path / "one")
    two = config_for(workdir, tmp_path / "two")
    run([sys.executable, "-m", "lora_dpo.cli", "precompute-ref"], one, tmp_path, "one")
    slow = {"LORA_DPO_COLLECTIVE_TIMEOUT_S": "8", "LORA_DPO_SHARDS_DELAY_S": "25", "LORA_DPO_SLOW_RANK": "1"}
    started = time.monotonic()
    run([*TORCHRUN, "-m", "lora_dpo.cli", "precompute-ref"], two, tmp_path, "two", **slow)
    assert time.monotonic() - started > 25  # the delay happened
    a, b = ReferenceCache(one.precompute.cache_dir), ReferenceCache(two.precompute.cache_dir)
    assert len(b) == 80
    assert a.manifest.shards == b.manifest.shards


def test_training_on_two_ranks_equals_one_at_the_same_global_batch(workdir, tmp_path):
    run(
        [sys.executable, "-m", "lora_dpo.cli", "precompute-ref"],
        config_for(workdir, tmp_path),
        tmp_path,
        "cache",
    )
    one = config_for(workdir, tmp_path, gradient_accumulation_steps=2, output_dir=str(tmp_path / "one"))
    two = config_for(workdir, tmp_path, gradient_accumulation_steps=1, output_dir=str(tmp_path / "two"))
    run([sys.executable, "-m", "lora_dpo.cli", "train"], one, tmp_path, "one")
    result = run([*TORCHRUN, "-m", "lora_dpo.cli", "train"], two, tmp_path, "two")
    assert result.stdout.count("step 4/4") <= 1  # only rank 0 logs

    def losses(run_dir: str) -> list[float]:
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    a, b = losses(one.train.output_dir), losses(two.train.output_dir)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert a[-1] < a[0]  # it trained
    # eval runs on both ranks, each scoring a share of the batches: before any step the policy
    # is the same, so the metrics are exactly one process's
    evals_a, evals_b = eval_records(one.train.output_dir), eval_records(two.train.output_dir)
    assert [r["step"] for r in evals_a] == [r["step"] for r in evals_b] == [0, 4]
    assert evals_a[0] == evals_b[0]
    assert evals_a[1].keys() == evals_b[1].keys()
    assert max(abs(evals_a[1][k] - evals_b[1][k]) for k in evals_a[1]) < 1e-5
    wa = load_file(str(Path(one.train.output_dir) / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(Path(two.train.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_eval_under_torchrun_prints_the_one_process_metrics_once(workdir, tmp_path):
    config = config_for(workdir, tmp_path, output_dir=str(tmp_path / "run"))
    run([sys.executable, "-m", "lora_dpo.cli", "precompute-ref"], config, tmp_path, "cache")
    run([sys.executable, "-m", "lora_dpo.cli", "train"], config, tmp_path, "train")
    evaluate = ["-m", "lora_dpo.cli", "eval", "--adapter", config.train.output_dir]
    one = run([sys.executable, *evaluate], config, tmp_path, "one")
    two = run([*TORCHRUN, *evaluate], config, tmp_path, "two")

    def printed(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("eval/")]

    assert len(printed(one.stdout)) > 5
    assert printed(two.stdout) == printed(one.stdout)  # once: rank 0 reports


def eval_records(run_dir: str) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records if "eval/loss" in r]


SLOW_RANKS = """
import os, sys
from lora_dpo.cli import main

(open(os.environ["PID_DIR"] + f"/rank{os.environ['RANK']}", "w")).write(str(os.getpid()))
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def start_ranks(workdir: Path, tmp_path: Path, **env) -> subprocess.Popen:
    """A slow two-rank training job (the fault hook's step delay); each rank records its pid."""
    config = config_for(workdir, tmp_path, max_steps=200, output_dir=str(tmp_path / "run"))
    config.data.max_pairs = 0
    run([sys.executable, "-m", "lora_dpo.cli", "precompute-ref"], config, tmp_path, "cache")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(dump_config(config))
    script = tmp_path / "slow_ranks.py"
    script.write_text(textwrap.dedent(SLOW_RANKS))
    return subprocess.Popen(
        [*TORCHRUN, str(script), str(config_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PID_DIR": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "LORA_DPO_STEP_DELAY_S": "0.5",
            **env,
        },
    )


def trained_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text()


def test_a_killed_rank_stops_the_job(workdir, tmp_path):
    job = start_ranks(workdir, tmp_path)
    deadline = time.monotonic() + 300
    while not ((tmp_path / "rank1").is_file() and trained_a_step(tmp_path / "run")):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.3)
    os.kill(int((tmp_path / "rank1").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 90
    assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]


def test_a_failing_rank_stops_the_job_with_its_message(workdir, tmp_path):
    job = start_ranks(workdir, tmp_path, LORA_DPO_FAIL_AT_STEP="1", LORA_DPO_FAIL_RANK="1")
    started = time.monotonic()
    output, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert time.monotonic() - started < 240
    assert "rank 1 failed on purpose" in output, output[-3000:]
