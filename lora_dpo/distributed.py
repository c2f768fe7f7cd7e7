"""Data parallelism under `torchrun`: the process group, this process's place in it, collectives.

Both stages run unchanged in one process; under `torchrun --nproc_per_node N` the CLI calls
`init_distributed()` and the stages split their work by `rank`. The backend is NCCL on GPUs
and gloo on the CPU (which the test suite uses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# A rank stuck in a collective because another died is ended by torchrun; this bounds the
# wait when a process group is used without it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group(
            "nccl", timeout=COLLECTIVE_TIMEOUT, device_id=torch.device("cuda", local_rank)
        )
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist_info()


def dist_info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks ("sum", "min" or "max"); the identity for one process."""
    if dist_info().enabled:
        dist.all_reduce(
            tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        )
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small, picklable objects only)."""
    info = dist_info()
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
