"""The memory figures of each metric record: the process's peak RSS on the CPU; on CUDA the
tensors' peak, the caching allocator's peak and the whole device's use."""

from __future__ import annotations

import pytest
import torch

from lora_dpo.metrics import memory_metrics, peak_memory_mb


def test_on_the_cpu_the_record_holds_the_peak_rss_only():
    cpu = torch.device("cpu")
    metrics = memory_metrics(cpu)
    assert set(metrics) == {"peak_memory_mb"}
    assert metrics["peak_memory_mb"] == pytest.approx(peak_memory_mb(cpu), rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_record_holds_allocated_reserved_and_device_use():
    device = torch.device("cuda", torch.cuda.current_device())
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB
    metrics = memory_metrics(device)
    assert set(metrics) == {"peak_memory_mb", "peak_reserved_mb", "device_used_mb"}
    assert 64 <= metrics["peak_memory_mb"] <= metrics["peak_reserved_mb"]
    # the device's use counts the CUDA context beside the allocator's blocks
    assert metrics["device_used_mb"] > torch.cuda.memory_reserved(device) / 2**20
    del held
