"""Data parallelism under `torchrun`: the process group, this process's place in it, collectives.

Both stages run unchanged in one process; under `torchrun --nproc_per_node N` the CLI calls
`init_distributed()` and the stages split their work by `rank`. The backend is NCCL on GPUs
and gloo on the CPU (which the test suite uses).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lora_dpo.errors import LoraDpoError
from lora_dpo.faults import FaultHooks

log = logging.getLogger(__name__)

# A rank stuck in a collective because another died is ended by torchrun; this bounds the
# wait when a process group is used without it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
# How long ranks wait for one that does a long phase alone (rank 0 writing a checkpoint or
# judging an eval, the last shard of a precompute, the cache lock another job holds).
RANK_WAIT_TIMEOUT = timedelta(hours=24)

# The gloo group `wait_for_ranks` waits in (None in one process). Why a second process group
# rather than the default one or done-markers on disk:
# - under NCCL a barrier is a collective on the GPU, bounded by the group's timeout, after
#   which the NCCL watchdog aborts the job; a long phase on one rank must not meet it. A gloo
#   group waits on the CPU, over TCP, with its own timeout (new_group(timeout=...)), and no
#   watchdog watches it;
# - `monitored_barrier` (gloo only) takes the timeout per call, and rank 0 names the ranks
#   that never arrived instead of a bare timeout;
# - a rank that dies is seen at once: torchrun ends the job, and a peer's closed connection
#   fails the wait; done-markers on disk would need polling, a shared file system for the
#   run directory, and their own clean-up.
_wait_group: Any = None


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
    """Join the process group torchrun describes in the environment (no-op for one process),
    and make the gloo group the waits for a slow rank use."""
    global _wait_group
    if not launched_by_torchrun() or dist.is_initialized():
        return dist_info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = FaultHooks.from_env().collective_timeout or COLLECTIVE_TIMEOUT
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    _wait_group = dist.new_group(backend="gloo", timeout=RANK_WAIT_TIMEOUT)  # every rank makes it
    return dist_info()


def dist_info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # the wait group too
    _wait_group = None


def wait_for_ranks(what: str) -> None:
    """Return once every rank has reached this point (`what`: the point, for the log and the
    error), waiting up to RANK_WAIT_TIMEOUT in the gloo wait group, never in an NCCL barrier.
    A no-op for one process."""
    if not dist_info().enabled:
        return
    if _wait_group is None:
        raise LoraDpoError(f"{what}: the process group was not joined through init_distributed")
    started = time.monotonic()
    try:
        dist.monitored_barrier(group=_wait_group, timeout=RANK_WAIT_TIMEOUT, wait_all_ranks=True)
    except RuntimeError as exc:  # a rank that died or never came; torchrun ends the others
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoraDpoError(f"waiting for every rank ({what}): {first_line}") from None
    waited = time.monotonic() - started
    if waited >= 10:
        log.info("%s: waited %.0f s for the other ranks", what, waited)


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
