"""The files of a training run and the state they add up to: the one place that knows their names.

    RUN/
        .lock               who is writing the run (see `lock`); readers never need it
        config.yaml         the resolved config the run computes with (written once)
        data_report.json    what the data loader kept and dropped
        metrics.jsonl       one JSON record per logging step and eval
        resumes.json        each `--resume`: the step, and the settings it changed
        checkpoints/step-000120/   the newest `train.save_total_limit` checkpoints
        adapter/            the trained LoRA adapter and tokenizer (PEFT format), published whole
        samples.jsonl, samples.md  held-out completions, policy beside reference (train.generate_every)
        report.png, report.md
        tensorboard/, wandb/       optional logging backends

A run directory is in one of these states:
    absent       no directory, or nothing in it but hidden files (the lock, temp files);
    started      run files, but neither a checkpoint nor an adapter: nothing to resume or keep;
    interrupted  checkpoints and no complete adapter: `lora-dpo train --resume RUN` continues it;
    finished     a complete adapter;
    foreign      files, none of them a run's.

`train.overwrite_output_dir=true` over an interrupted or finished run trains in the hidden
sibling `.RUN.overwrite/` and replaces RUN with it only once the new run is complete, so a new
run that fails leaves the old one whole. An interrupted overwrite is continued by
`lora-dpo train --resume RUN` like any interrupted run (it finds the sibling).
"""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path

from lora_dpo.errors import ConfigError
from lora_dpo.loggers import TENSORBOARD_DIR

LOCK = ".lock"
CONFIG = "config.yaml"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
RESUMES = "resumes.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
REPORT_PNG = "report.png"
REPORT_MD = "report.md"
SAMPLES_JSONL = "samples.jsonl"
SAMPLES_MD = "samples.md"
WANDB_DIR = "wandb"
RUN_ENTRIES = frozenset(
    {
        CONFIG,
        DATA_REPORT,
        METRICS,
        RESUMES,
        CHECKPOINTS,
        ADAPTER,
        REPORT_PNG,
        REPORT_MD,
        SAMPLES_JSONL,
        SAMPLES_MD,
        TENSORBOARD_DIR,
        WANDB_DIR,
    }
)
OVERWRITE_SUFFIX = ".overwrite"
STEP_DIR = re.compile(r"step-(\d+)")


class RunState(enum.Enum):
    ABSENT = "absent"
    STARTED = "started"
    INTERRUPTED = "interrupted"
    FINISHED = "finished"
    FOREIGN = "foreign"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """The `step-<digits>` directories under `root`, oldest first; anything else there (a
    stray directory, a partial checkpoint's hidden temp directory) is not a checkpoint."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    match = STEP_DIR.fullmatch(path.name)
    assert match, path
    return int(match.group(1))


class RunDirectory:
    """Paths and state of one run directory; reading only (a RunTransaction writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def data_report_path(self) -> Path:
        return self.path / DATA_REPORT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def resumes_path(self) -> Path:
        return self.path / RESUMES

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def report_png(self) -> Path:
        return self.path / REPORT_PNG

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def samples_jsonl(self) -> Path:
        return self.path / SAMPLES_JSONL

    @property
    def samples_md(self) -> Path:
        return self.path / SAMPLES_MD

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def checkpoints(self) -> list[Path]:
        return checkpoint_dirs(self.checkpoints_dir)

    def staged_overwrite(self) -> RunDirectory:
        """Where an overwrite of this run trains until it is complete: a hidden sibling, on
        the same file system, so replacing the run is one rename."""
        path = self.path.absolute()
        return RunDirectory(path.parent / f".{path.name}{OVERWRITE_SUFFIX}")

    def resume_source(self) -> RunDirectory:
        """The run `--resume` continues: an interrupted overwrite (the newest intent) if there
        is one, else this run."""
        staged = self.staged_overwrite()
        return staged if staged.checkpoints() else self

    def entries(self) -> list[str]:
        """Names in the directory, without the lock and this project's temp files."""
        if not self.path.is_dir():
            return []
        return sorted(name.name for name in self.path.iterdir() if not _is_own_hidden(name.name))

    def foreign_entries(self) -> list[str]:
        """Entries that are not a run's, hidden ones too: replacing the directory would lose them."""
        return [name for name in self.entries() if name not in RUN_ENTRIES]

    def state(self) -> RunState:
        if self.adapter_problem() is None:
            return RunState.FINISHED
        if self.checkpoints():
            return RunState.INTERRUPTED
        visible = [name for name in self.entries() if not name.startswith(".")]  # a .gitkeep is no content
        if any(name in RUN_ENTRIES for name in visible):
            return RunState.STARTED
        return RunState.FOREIGN if visible else RunState.ABSENT

    def adapter_problem(self) -> str | None:
        """None when adapter/ is complete; else what is missing or damaged. The adapter is
        published whole, so this only finds damage done after (or by an older version)."""
        if not self.adapter_dir.is_dir():
            return "not saved"
        from lora_dpo.adapters import read_adapter  # torch and safetensors: only when there is one

        try:
            read_adapter(self.adapter_dir)  # adapter_config.json, the weights (headers, extent)
        except ConfigError as exc:
            return str(exc)
        for path in sorted(self.adapter_dir.glob("*.json")):  # the tokenizer's files among them
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                return f"{path}: not valid JSON ({exc}); the file is damaged"
        return None


def _is_own_hidden(name: str) -> bool:
    """The lock, and temp files of atomic writes of run entries (`.metrics.jsonl.x1y2.tmp`)."""
    return name == LOCK or any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)
