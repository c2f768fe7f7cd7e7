"""What only a GPU can confirm of the CUDA paths that were fixed by reading the libraries'
sources (README "GPU status"); `gpu_check.py` records these beside its memory figures.

- `device_facts`: the compute dtype `model.dtype: auto` picks on this card and why (native bf16
  or fp16 with loss scaling), whether `torch.mm(..., out_dtype=torch.float32)` runs for bf16
  (the fp32 logits of the fused LM head) or the rounded fallback is taken, and where
  `merge --device auto` would build an 8B model merged at fp32 given this card's free memory.
- `HostSyncs`: the synchronizing CUDA calls of a training run, counted by torch's own sync
  debug mode (`torch.cuda.set_sync_debug_mode("warn")`); the design is about one per optimizer
  step (the finiteness decision) plus the logging steps' reads, none per micro-batch. On the
  CPU nothing waits for a device: the count is None there (tests/test_host_sync.py counts
  the would-be syncing ops on the CPU instead).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

LLAMA_8B_PARAMETERS = 8_030_261_248  # Llama-3.1-8B, for the merge placement


def device_facts(device: torch.device) -> dict[str, Any]:
    from lora_dpo.logps import has_fp32_output_mm
    from lora_dpo.merge_device import choose_merged_device
    from lora_dpo.model import dtype_choice

    choice = dtype_choice("auto", device)
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    merged_on, why = choose_merged_device("auto", 4 * LLAMA_8B_PARAMETERS, free, cuda)
    return {
        "auto_dtype": str(choice.dtype).removeprefix("torch."),
        "auto_dtype_reason": choice.reason,
        "fp32_logits_kernel": has_fp32_output_mm(device.type, torch.bfloat16),
        "merge_8b_fp32_on": merged_on,
        "merge_8b_fp32_reason": why,
    }


class HostSyncs:
    """`with HostSyncs(device) as syncs:` ... `syncs.count`: the synchronizing CUDA calls torch
    reported inside the block (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.count: int | None = None
        self._caught: Any = None

    def __enter__(self) -> HostSyncs:
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self.count = sum("synchroniz" in str(record.message) for record in self._records)
        self._caught.__exit__(*exc)
