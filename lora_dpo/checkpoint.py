"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    <run>/checkpoints/step-000120/
        adapter_model.safetensors   LoRA weights (safetensors: no pickled code)
        optimizer.pt, scheduler.pt  state dicts, loaded with torch.load(weights_only=True)
        ranks.pt                    per rank: RNG states and the metric window so far
        trainer_state.json          step, number of ranks

A checkpoint is written into a temporary directory and renamed into place, so a checkpoint
directory that exists is complete. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_dpo.errors import ConfigError
from lora_dpo.fileio import staged_directory

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(run_dir: Path) -> Path:
    found = checkpoint_dirs(run_dir)
    if not found:
        raise ConfigError(f"{run_dir}: no checkpoint to resume from (looked in {run_dir / CHECKPOINTS})")
    return found[-1]


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank_states: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Rank 0 writes; `rank_states` holds every rank's RNG states and metric window."""
    from peft import get_peft_model_state_dict

    target = run_dir / CHECKPOINTS / f"{PREFIX}{step:06d}"
    # A checkpoint of the same step from an earlier attempt is replaced only once this one is whole.
    with staged_directory(target, suffix=".tmp") as tmp:
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(policy).items()}
        save_file(adapter, str(tmp / "adapter_model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rank_states, tmp / "ranks.pt")
        state = {"step": step, "world_size": len(rank_states)}
        (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def load_checkpoint(
    path: Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG states; returns the trainer
    state with this rank's metric window under "meter"."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != world_size:
        raise ConfigError(
            f"{path}: saved by {state['world_size']} process(es), resumed with {world_size}; "
            "resume with the same number of processes"
        )
    from peft import set_peft_model_state_dict

    device = next(p for p in policy.parameters() if p.requires_grad).device
    result = set_peft_model_state_dict(policy, load_file(str(path / "adapter_model.safetensors"), device=str(device)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"{path}: adapter weights do not fit this model: {unexpected[:3]}")
    optimizer.load_state_dict(load_state(path / "optimizer.pt", map_location=device))
    scheduler.load_state_dict(load_state(path / "scheduler.pt"))
    mine = load_state(path / "ranks.pt")[rank]
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda_rng"])
    random.setstate(mine["python_rng"])
    return {**state, "meter": mine["meter"]}


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
