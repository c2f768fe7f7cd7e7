"""Live tensor bytes on the CPU, exactly: the high-water mark of allocations, and what is live then.

`torch.profiler` with `profile_memory=True` receives every allocation and free of the CPU
allocator, each with the running total of live bytes since profiling began, counted under
the allocator's lock. Its maximum is the exact high-water mark of everything allocated inside
the window: op outputs, tensors saved for backward, and the temporaries inside kernels (a
dequantized 4-bit weight inside bitsandbytes' matmul, say), which a dispatch-mode tracker of
op outputs does not see. CUDA's `max_memory_allocated` counts the same kind of thing.

Only what is allocated inside the window is counted, so a measurement starts from a quiet
state: weights, adapters and optimizer state already exist (`persistent_bytes` counts them
from their storages) and nothing that existed before is freed inside the window.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# CPU matrix multiplies (oneDNN / MKL under these ops) may allocate packed copies of their
# operands through the allocator and free them before returning: workspace of the CPU's BLAS,
# which cuBLAS keeps in a fixed preallocated workspace instead.
CPU_BLAS_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


@dataclass
class Allocation:
    size: int  # bytes
    ops: tuple[str, ...]  # the op that allocated it, then its callers (innermost first)


@dataclass
class LiveBytes:
    """A window of allocations: `with LiveBytes() as live: ...`, then `live.peak`.

    With `exclude_workspace_of` (op names), an allocation made directly by one of those ops
    and freed before the op returned is workspace: left out of `peak`, its own high-water mark
    in `workspace_peak`.
    """

    exclude_workspace_of: tuple[str, ...] = ()
    peak: int = 0  # high-water mark of bytes allocated inside the window and not yet freed
    end: int = 0  # still live when the window closed
    workspace_peak: int = 0
    at_peak: list[Allocation] = field(default_factory=list)  # what was live at the high-water mark
    _profiler: Any = None

    def __enter__(self) -> LiveBytes:
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profiler.__exit__(*exc)
        if exc[0] is None:
            self._read(self._profiler.profiler.kineto_results)

    def _read(self, results: Any) -> None:
        events = sorted(
            (e for e in _walk(results.experimental_event_tree()) if _is_allocation(e)),
            key=lambda e: (e.start_time_ns, e.extra_fields.total_allocated),
        )
        workspace = self._workspace(events)
        live: dict[int, tuple[Allocation, bool]] = {}  # ptr -> (allocation, is workspace)
        excluded = 0
        for event in events:
            fields = event.extra_fields
            is_workspace = id(event) in workspace
            if fields.alloc_size > 0:
                live[fields.ptr] = (Allocation(fields.alloc_size, _callers(event)), is_workspace)
            else:
                live.pop(fields.ptr, None)
            if is_workspace:
                excluded += fields.alloc_size
                self.workspace_peak = max(self.workspace_peak, excluded)
            # total_allocated: the allocator's own running total, kept under its lock
            if fields.total_allocated - excluded > self.peak:
                self.peak = fields.total_allocated - excluded
                self.at_peak = [allocation for allocation, skip in live.values() if not skip]
        self.end = events[-1].extra_fields.total_allocated if events else 0

    def _workspace(self, events: list[Any]) -> set[int]:
        """ids of the allocation and free events of workspace allocations."""
        found: set[int] = set()
        if not self.exclude_workspace_of:
            return found
        pending: dict[int, Any] = {}  # ptr -> its allocation event
        for event in events:
            fields = event.extra_fields
            if fields.alloc_size > 0:
                pending[fields.ptr] = event
                continue
            allocated = pending.pop(fields.ptr, None)
            op = allocated.parent if allocated is not None else None
            if (
                op is not None
                and op.name in self.exclude_workspace_of
                and event.start_time_ns <= op.end_time_ns
            ):
                found |= {id(allocated), id(event)}
        return found

    def breakdown(self, depth: int = 2, top: int = 12) -> list[tuple[str, int]]:
        """Bytes live at the peak, grouped by allocating op and `depth - 1` callers, largest first."""
        groups: collections.Counter[str] = collections.Counter()
        for allocation in self.at_peak:
            groups[" < ".join(allocation.ops[:depth])] += allocation.size
        return groups.most_common(top)


def _walk(events: list[Any]) -> Iterator[Any]:
    for event in events:
        yield event
        yield from _walk(event.children)


def _is_allocation(event: Any) -> bool:
    return (
        type(event.extra_fields).__name__ == "_ExtraFields_Allocation"
        and event.extra_fields.device.type == "cpu"
    )


def _callers(event: Any) -> tuple[str, ...]:
    names = []
    parent = event.parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.parent
    return tuple(names)


def persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers (with the 4-bit
    layers' quantization state) and an optimizer's state: what lives across steps."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:  # nested (double) quantization keeps a second state
            tensors += [
                t
                for t in (state.absmax, state.code, getattr(state, "offset", None))
                if isinstance(t, torch.Tensor)
            ]
            state = getattr(state, "state2", None)
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
