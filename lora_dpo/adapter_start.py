"""DPO started from an SFT LoRA adapter (`model.adapter_path`, `model.adapter_mode`).

The reference is base + that adapter in both modes; its weights' sha256 is part of the cache
identity, so a cache scored without it (or with another) is refused.

- `continue`: the policy is that adapter (peft's "default"), trainable: DPO goes on from it.
- `stack`: the adapter is loaded frozen as "sft" and a fresh `lora.*` adapter ("default", B = 0)
  trains on top. Both are active (peft's `LoraModel.set_adapter([...])`): every LoRA layer
  adds the base's output, then each adapter's B·A·scaling in turn. Only "default" trains.

The start adapter runs without its dropout (as TRL's `DPOConfig.disable_dropout` does for the
whole model): dropout on a non-zero adapter would make the step-0 policy differ from the
reference, which is scored without it, and the step-0 loss would not be ln 2.

A run's exported adapter records its start in `adapter/adapter_start.json`; a stacked one
carries a byte copy of the start adapter in `adapter/sft/`, so `eval`, `generate` and `merge`
rebuild base + SFT + DPO from the run's adapter alone (`model.load_adapter` stacks it).
"""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from lora_dpo.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    check_against_files,
    check_fits,
    check_plain_lora,
    read_adapter,
    shapes_of,
)
from lora_dpo.config import ModelConfig
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import sha256_file, write_json

SFT_NAME = "sft"  # the frozen adapter's peft name, and its directory in a stacked export
START_RECORD = "adapter_start.json"
POLICY_NAME = "default"  # peft's name for the adapter a run trains and saves
REFERENCE_NAME = "start"  # a continued policy's start adapter, loaded frozen to act as its reference

# The start of each policy `start_policy` built, for `save_adapter` to record.
_STARTS: weakref.WeakKeyDictionary[torch.nn.Module, AdapterStart] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class AdapterStart:
    """Where a policy started: the mode and the start adapter (as given, and its weights' sha256)."""

    mode: str  # "continue" | "stack"
    adapter_path: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def adapter_sha256(adapter: Adapter) -> str:
    """The start adapter's identity: sha256 of its adapter_model.safetensors."""
    return sha256_file(adapter.directory / ADAPTER_WEIGHTS)


def read_start_adapter(cfg: ModelConfig) -> Adapter | None:
    """`model.adapter_path`, checked before any model is loaded: a LoRA adapter directory, plain
    LoRA (no DoRA, ...), and, where the base's safetensors headers tell, the base's shapes."""
    if not cfg.adapter_path:
        return None
    adapter = read_adapter(cfg.adapter_path, label=f"model.adapter_path={cfg.adapter_path!r}")
    try:
        check_plain_lora(adapter, "start DPO")
        from lora_dpo.model import resolve_model_dir  # model.py builds on this module

        check_against_files(adapter, resolve_model_dir(cfg), cfg.name_or_path)
    except ConfigError as exc:
        raise ConfigError(f"model.adapter_path: {exc}") from None
    return adapter


@lru_cache(maxsize=8)
def adapter_shape(path: str) -> tuple[int, tuple[str, ...], int]:
    """(rank, adapted linear names, LoRA weights) of the adapter at `path`, for `plan`."""
    adapter = read_adapter(path, label=f"model.adapter_path={path!r}")
    names = tuple(sorted({name.rsplit(".", 1)[-1] for name in adapter.factors}))
    weights = sum(f.a[0] * f.a[1] + f.b[0] * f.b[1] for f in adapter.factors.values())
    return int(adapter.config["r"]), names, weights


def start_of(cfg: ModelConfig, adapter: Adapter) -> AdapterStart:
    return AdapterStart(cfg.adapter_mode, cfg.adapter_path, adapter_sha256(adapter))


def load_start(model: torch.nn.Module, adapter: Adapter, *, trainable: bool):
    """`model` (a plain base) wrapped with the start adapter as "default", without dropout;
    its factors are checked against the loaded modules first (a module the base lacks, a
    shape that differs: one line naming it)."""
    from peft import PeftModel

    _check_loaded_fits(adapter, model)
    model = PeftModel.from_pretrained(model, str(adapter.directory), is_trainable=trainable)
    _drop_dropout(model, POLICY_NAME)
    return model


def stack_frozen(policy: Any, adapter: Adapter) -> None:  # a peft PeftModel
    """Load `adapter` into the peft model `policy` as the frozen "sft" adapter, beneath
    "default": both active, "sft" first; only "default" keeps its gradients."""
    _check_loaded_fits(adapter, policy.get_base_model())
    policy.load_adapter(str(adapter.directory), adapter_name=SFT_NAME, is_trainable=False)
    _drop_dropout(policy, SFT_NAME)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    policy.base_model.set_adapter([SFT_NAME, POLICY_NAME])  # sets requires_grad on both
    for name, param in policy.named_parameters():
        param.requires_grad_(name in trainable)  # the frozen adapter stays frozen


def remember_start(policy: Any, start: AdapterStart) -> None:
    _STARTS[policy] = start


@contextmanager
def as_reference(policy: Any) -> Iterator[None]:  # a peft PeftModel
    """`policy` computes as its reference inside the block: the base with every adapter off,
    or, for a policy that started from an adapter, base + that adapter (stacked: only "sft"
    active; continued: the start adapter, loaded frozen from its recorded path on first use,
    since "default" has moved away from it). Active adapters and gradient flags are restored."""
    start = _STARTS.get(policy)
    if start is None:
        with policy.disable_adapter():
            yield
        return
    if start.mode == "stack":
        name = SFT_NAME
    else:
        name = REFERENCE_NAME
        if name not in policy.peft_config:
            adapter = read_adapter(start.adapter_path, label=f"the start adapter {start.adapter_path!r}")
            if adapter_sha256(adapter) != start.sha256:
                raise ConfigError(
                    f"{adapter.directory / ADAPTER_WEIGHTS}: not the start adapter this policy "
                    "continued from (sha256 differs), so it cannot stand for the reference"
                )
            policy.load_adapter(str(adapter.directory), adapter_name=name, is_trainable=False)
            _drop_dropout(policy, name)
    active = list(policy.base_model.active_adapters)
    trainable = {key for key, p in policy.named_parameters() if p.requires_grad}
    policy.base_model.set_adapter([name])
    try:
        yield
    finally:
        policy.base_model.set_adapter(active)
        for key, param in policy.named_parameters():
            param.requires_grad_(key in trainable)


def save_adapter(policy: Any, directory: Path) -> None:
    """The trained adapter of `policy` into `directory`; for a policy that started from an
    adapter, also the start record, and for a stacked one a byte copy of the start adapter."""
    start = _STARTS.get(policy)
    policy.save_pretrained(str(directory), selected_adapters=[POLICY_NAME])
    if start is None:
        return
    if start.mode == "stack":
        source = read_adapter(start.adapter_path)
        (directory / SFT_NAME).mkdir()
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(source.directory / name, directory / SFT_NAME / name)
        if sha256_file(directory / SFT_NAME / ADAPTER_WEIGHTS) != start.sha256:
            raise ConfigError(
                f"model.adapter_path={start.adapter_path!r}: its weights changed during training"
            )
    write_json(directory / START_RECORD, start.to_dict())


def read_start_record(directory: Path) -> AdapterStart | None:
    """The start record of an exported adapter (None: it started from nothing)."""
    path = directory / START_RECORD
    if not path.is_file():
        return None
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
        start = AdapterStart(str(raw["mode"]), str(raw["adapter_path"]), str(raw["sha256"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a start record ({exc}); the file is damaged") from None
    if start.mode not in ("continue", "stack"):
        raise ConfigError(f"{path}: mode {start.mode!r}, expected continue or stack")
    return start


def stacked_under(adapter: Adapter, start: AdapterStart | None) -> Adapter | None:
    """The frozen SFT adapter a stacked export carries (checked against `start`, its record as
    `read_start_record` gives it), else None."""
    if start is None or start.mode != "stack":
        return None
    copy = read_adapter(adapter.directory / SFT_NAME)
    if adapter_sha256(copy) != start.sha256:
        raise ConfigError(
            f"{copy.directory / ADAPTER_WEIGHTS}: not the start adapter {adapter.directory / START_RECORD} "
            "records (sha256 differs); the file is damaged"
        )
    return copy


def _check_loaded_fits(adapter: Adapter, model: torch.nn.Module) -> None:
    try:
        check_fits(adapter, shapes_of(model), str(getattr(model, "name_or_path", "")))
    except ConfigError as exc:
        raise ConfigError(f"model.adapter_path: {exc}") from None


def _drop_dropout(model: Any, adapter_name: str) -> None:
    """The named adapter's LoRA dropout becomes the identity, in its layers and its config."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_dropout:
            module.lora_dropout[adapter_name] = torch.nn.Identity()
    model.peft_config[adapter_name].lora_dropout = 0.0
