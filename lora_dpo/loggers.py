"""Where metric records go besides metrics.jsonl: nowhere (default), TensorBoard, or W&B.

A record is what `metrics.jsonl` holds on one line: `{"step": optimizer step, name: value, ...}`.
Every logger receives exactly those records, so TensorBoard tags and W&B keys are the
metrics.jsonl names (`loss`, `rewards/margins`, `eval/rewards/accuracies`, ...).
Both backends are optional extras, imported only when asked for.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_dpo.errors import ConfigError

BACKENDS = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under the run directory


def _not_installed(name: str) -> ConfigError:
    return ConfigError(
        f"train.report_to includes {name}, but the {name} package is not installed: "
        f"pip install 'lora-dpo[{name}]'"
    )


class MetricLogger:
    """The interface: `log` one record (in step order), `close` once at the end."""

    def log(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullLogger(MetricLogger):
    """The default: metrics.jsonl and the console only."""

    def log(self, record: Mapping[str, Any]) -> None:
        pass


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numeric values except `step` (the x axis, not a metric)."""
    return {
        name: float(value)
        for name, value in record.items()
        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardLogger(MetricLogger):
    """Event files under `<run_dir>/tensorboard`: `tensorboard --logdir <run_dir>`."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _not_installed("tensorboard") from None
        log_dir = Path(run_dir) / TENSORBOARD_DIR
        purge_step = None
        if resume_step is None:
            # A new or replaced run starts a fresh history, like its metrics.jsonl.
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        else:
            # A resumed run keeps its curves up to the checkpoint, like metrics.jsonl:
            # TensorBoard hides the older files' events from `purge_step` on (steps that the
            # interrupted run logged past its checkpoint and this one logs again).
            purge_step = resume_step + 1
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        # Records come once per logging step: flushing each keeps a crashed run's curves.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """A W&B run named after the run directory. WANDB_PROJECT picks the project (default
    `lora-dpo`); WANDB_MODE=offline keeps everything local (`wandb sync` uploads later)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise _not_installed("wandb") from None
        run_dir = Path(run_dir)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lora-dpo"),
            name=run_dir.resolve().name,
            dir=str(run_dir),
            config=dict(config),
        )

    def log(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class FanOut(MetricLogger):
    def __init__(self, loggers: Sequence[MetricLogger]):
        self.loggers = list(loggers)

    def log(self, record: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _backends(report_to: Sequence[str]) -> list[str]:
    names = [name for name in dict.fromkeys(report_to) if name != "none"]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    return names


def check_backends(report_to: Sequence[str]) -> None:
    """ConfigError now, before any model is loaded, for a backend that is unknown or not installed."""
    for name in _backends(report_to):
        module = "torch.utils.tensorboard" if name == "tensorboard" else "wandb"
        try:
            importlib.import_module(module)
        except ImportError:
            raise _not_installed(name) from None


def open_logger(
    report_to: Sequence[str], run_dir: Path, config: Mapping[str, Any], resume_step: int | None = None
) -> MetricLogger:
    """The logger for `train.report_to`; an empty list or `none` gives the null logger.
    `resume_step`: the checkpoint a resumed run continues from (its history is kept up to it).
    Raises ConfigError for an unknown backend or one whose package is not installed."""
    names = _backends(report_to)
    loggers: list[MetricLogger] = []
    try:
        for name in names:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir, resume_step))
            else:
                loggers.append(WandbLogger(run_dir, config))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    if not loggers:
        return NullLogger()
    return loggers[0] if len(loggers) == 1 else FanOut(loggers)
