"""train.offload_activations: what the forward keeps for backward waits in host memory.

With gradient checkpointing, the forward keeps one tensor per decoder layer on the GPU: the
layer's input [2B, T, H] (torch's non-reentrant checkpoint saves the inputs of the layer as
saved tensors; everything inside the layer is recomputed in backward). At long contexts these
inputs are what grows with depth: 32 layers x 2 x 8192 tokens x 4096 x 2 bytes = 4 GiB.

`OffloadSavedTensors` is a saved-tensors hook pair. Opened around the policy's forward, it
copies each floating-point tensor saved outside the checkpointed layers (the layer inputs; also
the final norm's input and the LM head's per-token gradients) to host memory, pinned on CUDA,
and copies it back when backward unpacks it: for a checkpointed layer, when the layer is
recomputed. Inside a checkpointed layer torch's own hooks take precedence, so nothing there is
moved. Parameters and integer tensors (indices) stay where they are. Exact: the bytes are
copied, never transformed. Without checkpointing every saved activation moves (slow, but the
GPU then holds one layer's tensors at a time during backward).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch


class OffloadSavedTensors:
    """`with OffloadSavedTensors(): out = forward(...)`, then `out.backward()` as usual."""

    def __init__(self) -> None:
        self.moved: list[tuple[torch.Size, torch.dtype]] = []  # what was copied to the host
        self.moved_bytes = 0
        # A tensor saved twice (an RMSNorm's fp32 input) is copied once: id -> (tensor, version, copy)
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> OffloadSavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._copies.clear()  # the saved graph holds the copies it needs

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, torch.nn.Parameter) or not tensor.is_floating_point():
            return tensor
        known = self._copies.get(id(tensor))
        if known is not None and known[0]() is tensor and known[1] == tensor._version:
            return tensor.device, known[2]
        # Pinned memory lets the copy overlap; the stream orders it before any reuse of the source.
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        host.copy_(tensor, non_blocking=tensor.is_cuda)
        self._copies[id(tensor)] = (weakref.ref(tensor), tensor._version, host)
        self.moved.append((tensor.shape, tensor.dtype))
        self.moved_bytes += host.nbytes
        return tensor.device, host

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)


def offload_saved_tensors(enabled: bool) -> contextlib.AbstractContextManager:
    """The hook pair when `enabled` (train.offload_activations), else nothing."""
    return OffloadSavedTensors() if enabled else contextlib.nullcontext()
