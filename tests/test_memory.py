"""plan against measurement: the live-tensor-bytes tracker is exact on known allocations and sees
kernel temporaries; on small models built in code (1 and 2 layers, nf4 + LoRA, real training
steps) every part plan estimates is within benchmarks/memory_check.py's tolerance of what the
tracker measures. The same code measures the recipes' real widths (benchmarks/memory.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import memory_check  # noqa: E402
from live_bytes import CPU_BLAS_OPS, LiveBytes, persistent_bytes  # noqa: E402

from lora_dpo.demo.models import tiny_config  # noqa: E402


def test_tracker_is_exact_on_known_allocations():
    with LiveBytes() as live:
        a = torch.empty(1_000_003, dtype=torch.uint8)
        b = torch.empty(250_000, dtype=torch.float32)  # 1,000,000 bytes
        del a
        c = torch.empty(10, dtype=torch.float64)
        del b, c
    assert live.peak == 2_000_003 and live.end == 0
    assert sorted(alloc.size for alloc in live.at_peak) == [1_000_000, 1_000_003]


def test_cpu_matmul_workspace_is_set_apart():
    """A bf16 matmul on the CPU may pack its operands into workspace it frees before returning
    (oneDNN); excluded, the peak is the product alone, and the two add up to the whole."""
    a, w = torch.randn(32, 16384, dtype=torch.bfloat16), torch.randn(16384, 64, dtype=torch.bfloat16)
    with LiveBytes() as whole:
        a @ w
    with LiveBytes(exclude_workspace_of=CPU_BLAS_OPS) as split:
        a @ w
    assert split.peak == 32 * 64 * 2
    assert whole.peak == split.peak + split.workspace_peak


def test_tracker_sees_temporaries_inside_kernels():
    """bitsandbytes' 4-bit matmul dequantizes the weight inside one op: the tracker counts that
    [out, in] bf16 buffer though it is never an op's output."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(512, 256, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4"
    )
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # quantizes the weight
    with LiveBytes() as live:
        layer(x)
    dequantized = 512 * 256 * 2
    assert dequantized <= live.peak < dequantized + 64 * 1024
    assert any("dequantize_4bit" in " ".join(a.ops) and a.size == dequantized for a in live.at_peak)
    # packed codes, 8-bit block scales, their offset and fp32 scales, and the two lookup tables
    state = layer.weight.quant_state
    assert (
        persistent_bytes(layer)
        == 512 * 256 // 2 + 512 * 256 // 64 + 4 + (512 * 256 // 64 // 256) * 4 + 256 * 4 + 16 * 4
    )
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.code.numel() == 256


@pytest.mark.parametrize("hidden, vocab, length", [(128, 512, 96), (64, 16384, 48)])
def test_plan_agrees_with_measurement(tmp_path, hidden: int, vocab: int, length: int):
    """(128, 512): the peak is the backward of a layer; (64, 16384): the LM head's logits chunk."""
    steps = {}
    for layers in (1, 2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            tiny_config("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers)
        )
        model.save_pretrained(str(tmp_path / f"m{layers}"))
        (step,) = memory_check.measure(tmp_path / f"m{layers}", [length], response_fraction=0.5)
        assert step.loss == pytest.approx(0.693147, abs=1e-5) and step.step_end == 0
        steps[layers] = step
    parts = memory_check.compare(tmp_path / "m1" / "config.json", steps[1], steps[2])
    assert set(parts) == {
        f"{p}, {w}" for p in ("fixed", "per layer") for w in ("persistent", "activations", "total")
    }
    for name, values in parts.items():
        assert values["measured"] > 0, name
        assert abs(values["ratio"] - 1) <= memory_check.TOLERANCE, (name, values)
    head_at_peak = memory_check.planned(tmp_path / "m1" / "config.json", 1, steps[1]).items[-1].counted
    assert head_at_peak == (vocab > hidden * 100)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run: the GPU check's code path on the CPU with tiny shapes."""
    import json
    import math
    import subprocess

    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-dry-run-*.json")
    results = json.loads(path.read_text())
    assert results["dry_run"] and results["environment"]["device"] == "cpu"
    facts = results["cuda_paths"]  # what the CUDA-path facts say off CUDA
    assert facts["auto_dtype"] == "float32" and facts["merge_8b_fp32_on"] == "cpu"
    assert facts["fp32_logits_kernel"] is False  # torch's out_dtype mm is CUDA-only
    run = results["llama3.1-8b"]
    assert run["precompute"]["pairs"] == 15 and run["precompute"]["pairs_per_s"] > 0
    assert [runs["auto"]["recipe"] for runs in run["lengths"].values()] == [
        "llama3.1-8b.yaml",
        "llama3.1-8b-4k.yaml",
        "llama3.1-8b-8k.yaml",
    ]
    for recipe_length, runs in run["lengths"].items():
        assert set(runs) == {"padded", "auto"}  # plan's layout, and the default
        for entry in runs.values():
            assert "error" not in entry, entry
            assert entry["step1_loss"] == pytest.approx(
                math.log(2), abs=1e-4
            )  # the untrained policy is the reference
            assert (
                entry["tokens_per_s"] > 0 and entry["max_memory_allocated"] is None
            )  # no CUDA statistics on the CPU
            plan = entry["plan"]
            assert plan["rows"] == {"1024": 4, "4096": 4, "8192": 2}[recipe_length]
            assert (
                0.9 * results["lengths"][recipe_length] < plan["length"] <= results["lengths"][recipe_length]
            )
            assert 0 < plan["allocated"] <= plan["tensors"] <= plan["card"]
    assert "| llama3.1-8b-8k.yaml | padded | 2 x " in done.stdout
