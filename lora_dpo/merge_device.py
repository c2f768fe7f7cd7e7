"""Where `lora-dpo merge` keeps the merged model: on the GPU only when it fits there.

Two devices take part in a merge:

- the load device holds the base + adapter as trained (the 4-bit base is small), computes the
  reference logits, and dequantizes and folds one layer at a time (one layer of fp32 scratch);
- the merged device receives each merged layer at the output dtype and runs the verification
  re-load. An 8B model merged at fp32 is ~30 GiB: on a 24 GiB card it must go to the CPU.

`--device cpu` keeps everything on the CPU; `--device cuda` asks for the GPU for both (a merged
model that does not fit fails there, as asked); `--device auto` (the default) loads on the GPU
when there is one and keeps the merged layers there only when `merged_bytes + margin` fits the
GPU's free memory once the base is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_dpo.errors import ConfigError
from lora_dpo.model import default_device

DEVICES = ("auto", "cpu", "cuda")
GIB = 2**30
# Above the merged tensors themselves: one layer's fp32 scratch, the verification forward's
# activations and logits, the allocator's rounding. 1 GiB covers the scratch of an 8B model's
# largest layer (14336 x 4096 fp32 = 0.22 GiB) several times; 10% scales it for larger models.
MIN_MARGIN_BYTES = GIB
MARGIN_FRACTION = 0.1


@dataclass(frozen=True)
class MergeDevices:
    load: torch.device  # base + adapter as trained, reference logits, each layer's fold
    merged: torch.device  # the merged layers and the verification re-load
    reason: str  # why `merged` was chosen, for the log and the report


def requested_device(device: str | torch.device | None) -> str:
    """ "auto", "cpu" or "cuda"; a torch.device (the library call) stands for its type."""
    if device is None:
        return "auto"
    name = device.type if isinstance(device, torch.device) else device
    if name not in DEVICES:
        raise ConfigError(f"--device {name!r}: must be one of {', '.join(DEVICES)}")
    return name


def margin_bytes(merged_bytes: int) -> int:
    return max(MIN_MARGIN_BYTES, math.ceil(MARGIN_FRACTION * merged_bytes))


def choose_merged_device(
    requested: str, merged_bytes: int, free_bytes: int | None, cuda_available: bool
) -> tuple[str, str]:
    """("cuda" | "cpu", why): the decision itself, from numbers only.

    `free_bytes` is the GPU's free memory with the as-trained base loaded (None without CUDA).
    """
    need = merged_bytes + margin_bytes(merged_bytes)
    if requested == "cuda" and not cuda_available:
        raise _no_cuda()
    if requested == "cpu":
        return "cpu", "chosen (--device cpu)"
    if not cuda_available:
        return "cpu", "auto: no CUDA GPU"
    assert free_bytes is not None  # measured whenever CUDA is available
    sizes = f"{need / GIB:.2f} GiB needed (merged model + margin), {free_bytes / GIB:.2f} GiB free"
    if requested == "cuda":
        return "cuda", f"chosen (--device cuda); {sizes}"
    if need <= free_bytes:
        return "cuda", f"auto: fits the GPU; {sizes}"
    return "cpu", f"auto: does not fit the GPU, merged layers built on the CPU; {sizes}"


def load_device(requested: str) -> torch.device:
    """Where the as-trained base is loaded: the CPU only when asked for, or without a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise _no_cuda()
    return torch.device("cpu") if requested == "cpu" else default_device()


def _no_cuda() -> ConfigError:
    return ConfigError("--device cuda: no CUDA GPU is available; use --device cpu or auto")


def merged_model_bytes(peft_model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the plain merged model at `dtype`: every base parameter at its full shape (a
    4-bit weight counts as the matrix it dequantizes to), the adapter's own tensors not at all
    (they are folded in). Tied weights count once, as in the saved model."""
    import bitsandbytes as bnb

    elements = 0
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            continue
        if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
            elements += math.prod(param.quant_state.shape)
        else:
            elements += param.numel()
    return elements * torch.empty((), dtype=dtype).element_size()


def place_merged(
    requested: str, peft_model: torch.nn.Module, dtype: torch.dtype, load: torch.device
) -> MergeDevices:
    """The merged device for a base already loaded on `load` (its free memory is measured now)."""
    merged_bytes = merged_model_bytes(peft_model, dtype)
    cuda = load.type == "cuda"
    free = torch.cuda.mem_get_info(load)[0] if cuda else None
    where, reason = choose_merged_device(requested, merged_bytes, free, cuda)
    return MergeDevices(load, load if where == "cuda" else torch.device("cpu"), reason)
