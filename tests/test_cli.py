"""The command line: user mistakes are one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "no/such.yaml"], "error: config file not found: no/such.yaml"),
        (["train", "train.bta=1"], "error: override: unknown key 'train.bta' (did you mean 'beta'?)"),
        (["precompute-ref"], "error: model.name_or_path is not set"),
        (["train", "model.name_or_path=/nonexistent/model", "data.train_path=x.jsonl"], "error: "),
    ],
)
@pytest.mark.slow
def test_user_mistakes_are_one_line(args, message):
    result = run("-m", "lora_dpo.cli", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_python_m_precompute_is_stage_one():
    result = run("-m", "precompute", "--help")
    assert result.returncode == 0
    assert "--config" in result.stdout


@pytest.mark.slow
def test_version_lists_key_packages():
    result = run("-m", "lora_dpo.cli", "--version")
    assert result.returncode == 0
    for name in ("lora-dpo", "torch", "transformers", "peft", "bitsandbytes"):
        assert name in result.stdout


@pytest.mark.slow
def test_cli_runs_both_stages(demo_workdir, tmp_path):
    """The stages as a user runs them, through the real entry point, on the demo fixture."""
    common = [
        "--config",
        "configs/demo.yaml",
        f"model.name_or_path={demo_workdir / 'model'}",
        f"data.train_path={demo_workdir / 'data' / 'train.jsonl'}",
        f"data.eval_path={demo_workdir / 'data' / 'eval.jsonl'}",
        f"precompute.cache_dir={tmp_path / 'cache'}",
        "data.max_pairs=16",
    ]
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stage1 = run("-m", "precompute", *common, cwd=root)
    assert stage1.returncode == 0, stage1.stderr
    assert (tmp_path / "cache" / "manifest.json").is_file()
    stage2 = run(
        "-m",
        "lora_dpo.cli",
        "train",
        *common,
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        cwd=root,
    )
    assert stage2.returncode == 0, stage2.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    evaluation = run(
        "-m", "lora_dpo.cli", "eval", *common, "--adapter", str(tmp_path / "run" / "adapter"), cwd=root
    )
    assert evaluation.returncode == 0, evaluation.stderr
    assert "eval/rewards/accuracies" in evaluation.stdout
