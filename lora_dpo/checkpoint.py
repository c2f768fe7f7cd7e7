"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    <run>/checkpoints/step-000120/
        adapter_model.safetensors   LoRA weights (safetensors: no pickled code)
        optimizer.pt, scheduler.pt  state dicts, loaded with torch.load(weights_only=True)
        ranks.pt                    per rank: RNG states and the metric window so far
        trainer_state.json          step, number of ranks; with fp16, the loss scaler's state

A checkpoint is written into a temporary directory and renamed into place, so a checkpoint
directory that exists was complete when written. Damage done later (a truncated file, a
missing one) is found when a run resumes: the newest intact checkpoint is used, with a warning
naming each damaged one. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_dpo.errors import ConfigError
from lora_dpo.fileio import staged_directory
from lora_dpo.run.directory import checkpoint_dirs, checkpoint_name, checkpoint_step

log = logging.getLogger(__name__)

ADAPTER = "adapter_model.safetensors"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "ranks.pt")
STATE = "trainer_state.json"


class DamagedCheckpoint(Exception):
    """A checkpoint directory whose files are missing or do not load; the message says which."""


@dataclass
class Checkpoint:
    """The contents of one checkpoint, read and checked, not yet applied."""

    path: Path
    step: int
    world_size: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ranks: list[dict[str, Any]]
    scaler: dict[str, Any]  # GradScaler.state_dict(); empty for a run without loss scaling


def _torch_bytes(value: Any) -> bytes:
    # Serialised in memory and written from Python: a full disk is then an OSError with its
    # errno, where torch's own file writer only says "file write failed".
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def save_checkpoint(
    root: Path,
    step: int,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank_states: list[dict[str, Any]],
    keep: int,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Rank 0 writes `root/step-<step>`; `rank_states` holds every rank's RNG states and
    metric window. Then only the newest `keep` checkpoints are kept, none newer than this one
    (those are from an earlier attempt that resumed from an older one past a damaged newest)."""
    from peft import get_peft_model_state_dict

    target = root / checkpoint_name(step)
    # A checkpoint of the same step from an earlier attempt is replaced only once this one is whole.
    with staged_directory(target, suffix=".tmp") as tmp:
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(policy).items()}
        (tmp / ADAPTER).write_bytes(save_safetensors(adapter))
        for name, value in zip(TORCH_FILES, (optimizer.state_dict(), scheduler.state_dict(), rank_states)):
            (tmp / name).write_bytes(_torch_bytes(value))
        state: dict[str, Any] = {"step": step, "world_size": len(rank_states)}
        if scaler is not None and scaler.is_enabled():  # plain numbers: a float scale, int counters
            state["loss_scaler"] = scaler.state_dict()
        (tmp / STATE).write_text(json.dumps(state) + "\n")
    existing = checkpoint_dirs(root)
    stale = [p for p in existing if checkpoint_step(p) > step]
    current = [p for p in existing if checkpoint_step(p) <= step]
    for old in stale + current[:-keep]:
        shutil.rmtree(old)
    return target


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Every file of the checkpoint at `path`, loaded; DamagedCheckpoint names the first
    file that is missing or does not load."""

    def problem(name: str, what: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"{path / name}: {what}")

    for name in (ADAPTER, *TORCH_FILES, STATE):
        if not (path / name).is_file():
            raise problem(name, "missing")
    try:
        state = json.loads((path / STATE).read_text())
        step, world_size = int(state["step"]), int(state["world_size"])
        scaler = dict(state.get("loss_scaler", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise problem(STATE, f"not a trainer state ({exc})") from None
    if step != checkpoint_step(path):
        raise problem(STATE, f"says step {step}, the directory step {checkpoint_step(path)}")
    try:
        adapter = load_safetensors((path / ADAPTER).read_bytes())
    except Exception as exc:  # safetensors raises its own error type
        raise problem(ADAPTER, f"cannot load: {_first_line(exc)}") from None
    loaded = []
    for name in TORCH_FILES:
        try:
            loaded.append(load_state(path / name, map_location=device if name == "optimizer.pt" else "cpu"))
        except ConfigError as exc:  # already one line naming the file
            raise DamagedCheckpoint(str(exc)) from None
        except Exception as exc:  # damage torch has no specific error for
            raise problem(name, f"cannot load: {_first_line(exc)}") from None
    optimizer, scheduler, ranks = loaded
    if not isinstance(ranks, list) or len(ranks) != world_size:
        held = len(ranks) if isinstance(ranks, list) else "no"
        raise problem("ranks.pt", f"holds {held} rank states for {world_size} ranks")
    return Checkpoint(
        path,
        step,
        world_size,
        {k: v.to(device) for k, v in adapter.items()},
        optimizer,
        scheduler,
        ranks,
        scaler,
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def newest_intact_checkpoint(root: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """The newest checkpoint under `root` whose files all load; a warning names each newer
    damaged one; a ConfigError when none is intact (the one checkpoint's problem, or all)."""
    found = checkpoint_dirs(root)
    if not found:
        raise ConfigError(f"{root.parent}: no checkpoint to resume from (looked in {root})")
    damaged = []
    for path in reversed(found):
        try:
            checkpoint = read_checkpoint(path, device)
        except DamagedCheckpoint as exc:
            damaged.append(str(exc))
            log.warning("damaged checkpoint: %s; trying the next older one", exc)
            continue
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint", path.name)
        return checkpoint
    if len(damaged) == 1:
        raise ConfigError(damaged[0])
    raise ConfigError(f"{root}: no intact checkpoint to resume from: {'; '.join(damaged)}")


def apply_checkpoint(
    checkpoint: Checkpoint,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world_size: int = 1,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler, loss scaler and this rank's RNG states; returns
    this rank's metric window (for WindowMeter.load_state_dict)."""
    path = checkpoint.path
    if checkpoint.world_size != world_size:
        raise ConfigError(
            f"{path}: saved by {checkpoint.world_size} process(es), resumed with {world_size}; "
            "resume with the same number of processes"
        )
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(policy, checkpoint.adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"{path}: adapter weights do not fit this model: {unexpected[:3]}")
    optimizer.load_state_dict(checkpoint.optimizer)
    scheduler.load_state_dict(checkpoint.scheduler)
    if scaler is not None and scaler.is_enabled():
        if not checkpoint.scaler:  # the dtype is part of the run's settings: a foreign file
            raise ConfigError(f"{path / STATE}: holds no loss scaler state for this fp16 run")
        scaler.load_state_dict(checkpoint.scaler)
    mine = checkpoint.ranks[rank]
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda_rng"])
    random.setstate(mine["python_rng"])
    return mine["meter"]


def load_state(file: Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True), which refuses pickled code; a refused, damaged or missing
    file is one line naming it instead of torch's page-long message."""
    try:
        return torch.load(file, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{file}: refused by torch.load(weights_only=True), which loads only tensors and plain "
            f"data and runs no pickled code: {_unpickling_reason(exc)}"
        ) from None
    except (OSError, EOFError, RuntimeError) as exc:  # missing, truncated, not a torch file
        raise ConfigError(f"{file}: cannot load: {str(exc).strip().splitlines()[0][:200]}") from None


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    # torch's message: a paragraph of advice, the reason, a link to the docs.
    paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    reasons = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")]
    text = (reasons or paragraphs or [type(exc).__name__])[0]
    return text.splitlines()[0][:200]
