"""What `--resume` may change: the settings in `COSMETIC_KEYS` only.

A resumed run replays its data order and RNG to compute exactly what the uninterrupted run
would have; a different beta, batch or data would silently make it another run under the old
name. So the resolved config is compared with the run's config.yaml key by key: a change to
any computing key is refused, naming each; cosmetic changes are used and recorded in
resumes.json (config.yaml keeps the settings the run started with).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from lora_dpo.config import Config, config_from_dict
from lora_dpo.errors import ConfigError, LoraDpoError

# Train settings that do not change what a run computes (how often it logs, evaluates and
# checkpoints, where it reports, when it gives up): `--resume` may change these, and records
# it. Every other key, in every section, is part of the computation: a resume refuses it.
COSMETIC_KEYS = frozenset(
    f"train.{name}"
    for name in (
        "output_dir",
        "overwrite_output_dir",
        "logging_steps",
        "report_to",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "max_consecutive_skips",
        # greedy generation draws no random numbers: what training computes is unchanged
        "generate_every",
        "generate_prompts",
        "generate_max_new_tokens",
        "reward_model",
    )
)


def flatten(config: Config) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def read_run_config(path: Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a resume compares its settings with the run's")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{path}: not a run config ({exc})") from None


def check_resume(saved: Config, asked: Config, run: Path) -> dict[str, dict[str, Any]]:
    """The cosmetic changes `asked` makes to `saved` ({key: {"run": old, "resume": new}});
    a ConfigError listing every change to a computing key."""
    old, new = flatten(saved), flatten(asked)
    changed = [key for key in new if old.get(key) != new[key]]
    refused = [key for key in changed if key not in COSMETIC_KEYS]
    if refused:
        differences = "; ".join(
            f"{key}: the run used {_show(old.get(key))}, this resume asks for {_show(new[key])}"
            for key in refused
        )
        raise ConfigError(
            f"--resume {run}: a resumed run computes what the run started computing, so these "
            f"changes are refused: {differences} (start a new run for other settings)"
        )
    return {key: {"run": old.get(key), "resume": new[key]} for key in changed}


def resume_record(step: int, checkpoint: str, changed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "step": step,
        "checkpoint": checkpoint,
        "changed": changed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_resumes(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        resumes = json.loads(path.read_text())["resumes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LoraDpoError(f"{path}: not a resumes record ({exc}); delete it to resume") from None
    return list(resumes)
