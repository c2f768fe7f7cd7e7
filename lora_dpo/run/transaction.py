"""One training run's writes into its run directory, as a transaction.

    open()     lock RUN (rank 0), decide what this run does with what is there; writes nothing
    begin()    after every check passed and the inputs are loaded: the first writes
    ...        metrics records and checkpoints, as training goes
    publish()  the adapter (staged, renamed into place whole), the report, and for an overwrite
               the new run in place of the old one
    close      the lock is released; a failed overwrite leaves the old run as it was

Rules (see `directory` for the states):
- nothing of an existing run is removed or rewritten before `begin()`;
- an interrupted run is continued with `--resume` or replaced with overwrite_output_dir,
  never silently restarted; a finished run is replaced only with overwrite_output_dir, and only
  once its replacement is complete (it trains in RUN's hidden `.RUN.overwrite` sibling);
- every file goes through `lora_dpo.fileio`; a full disk is a one-line DiskFullError;
- under torchrun every rank makes the same decisions (they read the same files), only rank 0
  locks and writes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_dpo.adapter_start import save_adapter
from lora_dpo.checkpoint import Checkpoint, newest_intact_checkpoint, save_checkpoint
from lora_dpo.config import Config, dump_config
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import publish_directory, staged_directory, write_json, write_text
from lora_dpo.loggers import MetricLogger
from lora_dpo.run.directory import ADAPTER, RunDirectory, RunState
from lora_dpo.run.disk import disk_full_is_an_error
from lora_dpo.run.lock import RunLock
from lora_dpo.run.metrics_file import MetricsFile, NullMetricsFile
from lora_dpo.run.resume import check_resume, read_resumes, read_run_config, resume_record
from lora_dpo.samples import Sample, read_samples, write_samples

log = logging.getLogger(__name__)


class RunTransaction:
    def __init__(self, target: RunDirectory, work: RunDirectory, is_main: bool):
        self.target = target  # the run directory the user named
        self.work = work  # where this run writes: target, or its staged overwrite
        self.is_main = is_main  # rank 0: the one process that locks and writes
        self.resume_from: Checkpoint | None = None
        self.resume_changes: dict[str, dict[str, Any]] = {}
        self.metrics: MetricsFile | NullMetricsFile = NullMetricsFile()
        self._locks: list[RunLock] = []

    @property
    def staged(self) -> bool:
        """Whether this run trains beside an existing one and replaces it when complete."""
        return self.work.path != self.target.path

    # ------------------------------------------------------------------ open: checks only

    @classmethod
    def open(
        cls, config: Config, *, resume: bool, is_main: bool, device: torch.device | str = "cpu"
    ) -> RunTransaction:
        """Lock the run directory and check what is in it against what this run asks; with
        `resume`, also pick the checkpoint (the newest intact one, read onto `device`)."""
        target = RunDirectory(config.train.output_dir)
        tx = cls(target, target, is_main)
        try:
            if is_main:
                tx._lock(target)
            if resume:
                tx._plan_resume(config, device)
            else:
                tx._plan_new(config)
        except BaseException:
            tx._release()
            raise
        return tx

    def _lock(self, run: RunDirectory) -> None:
        with disk_full_is_an_error(run.lock_path):
            self._locks.append(RunLock(run.lock_path, self.target.path).acquire())

    def _plan_resume(self, config: Config, device: torch.device | str) -> None:
        target = self.target
        source = target.resume_source()
        if source is target and target.state() is RunState.FINISHED:
            raise ConfigError(
                f"train.output_dir={str(target.path)!r} holds a finished run ({ADAPTER}/ is complete): "
                "there is nothing to resume"
            )
        if not source.checkpoints():
            raise ConfigError(
                f"{target.path}: no checkpoint to resume from (looked in {source.checkpoints_dir})"
            )
        self.resume_changes = check_resume(read_run_config(source.config_path), config, target.path)
        self.resume_from = newest_intact_checkpoint(source.checkpoints_dir, device)
        self.work = source
        if self.staged and self.is_main:
            self._lock(source)

    def _plan_new(self, config: Config) -> None:
        target, staged = self.target, self.target.staged_overwrite()
        state = target.state()
        name = str(target.path)
        if state is RunState.FOREIGN:
            raise ConfigError(
                f"train.output_dir={name!r} holds files that are not a training run's "
                f"({', '.join(target.foreign_entries()[:5])}); choose another directory"
            )
        pending = staged.checkpoints()  # an overwrite that was interrupted
        if not config.train.overwrite_output_dir:
            if pending or state is RunState.INTERRUPTED:
                where = (
                    f"checkpoint {pending[-1].name} of an unfinished overwrite, in {staged.path.name}"
                    if pending
                    else f"checkpoint {target.checkpoints()[-1].name}"
                )
                raise ConfigError(
                    f"train.output_dir={name} holds an interrupted run ({where}); continue with: "
                    f"lora-dpo train --resume {name} (or set train.overwrite_output_dir=true to start over)"
                )
            if state is RunState.FINISHED:
                raise ConfigError(
                    f"train.output_dir={name!r} already holds a trained run; choose another "
                    "directory or set train.overwrite_output_dir=true"
                )
        elif state in (RunState.INTERRUPTED, RunState.FINISHED):
            foreign = target.foreign_entries()
            if foreign:
                raise ConfigError(
                    f"train.output_dir={name!r}: overwriting replaces the whole directory, and it holds "
                    f"files that are not the run's ({', '.join(foreign[:5])}); move them first"
                )
            self.work = staged

    # ------------------------------------------------------------------ begin: first writes

    def begin(self, config: Config, data_report: dict[str, Any]) -> None:
        """Every check passed and the inputs are loaded: from here this run's files replace
        what a new run replaces (a resumed run only records itself)."""
        if not self.is_main:
            return
        with disk_full_is_an_error(self.work.path):
            if self.resume_from is not None:
                record = resume_record(self.resume_from.step, self.resume_from.path.name, self.resume_changes)
                write_json(
                    self.work.resumes_path, {"resumes": [*read_resumes(self.work.resumes_path), record]}
                )
                if self.resume_changes:
                    log.info(
                        "resume changes %s (recorded in %s)",
                        ", ".join(self.resume_changes),
                        self.work.resumes_path,
                    )
                return
            stale = self.target.staged_overwrite().path
            if stale.exists():  # an earlier overwrite this new run starts over from
                shutil.rmtree(stale)
            if self.staged:
                self.work.path.mkdir(parents=True)
                self._lock(self.work)
            else:  # in place: what is here never reached a checkpoint (RunState.STARTED) or is empty
                self._clear_started_run()
            write_text(self.work.config_path, dump_config(config))
            write_json(self.work.data_report_path, data_report)

    def _clear_started_run(self) -> None:
        work = self.work
        for path in (work.report_png, work.report_md, work.resumes_path, work.samples_jsonl, work.samples_md):
            path.unlink(missing_ok=True)
        if work.adapter_dir.is_dir():  # a damaged one: a complete adapter means FINISHED
            shutil.rmtree(work.adapter_dir)

    # ------------------------------------------------------------------ during training

    def open_metrics(
        self, logger: Callable[[Path], MetricLogger], started: float
    ) -> MetricsFile | NullMetricsFile:
        """metrics.jsonl (kept up to the checkpoint's step on resume); `logger(run_path)` opens
        the logging backends in the directory this run writes."""
        if self.is_main:
            keep = self.resume_from.step if self.resume_from is not None else None
            self.metrics = MetricsFile(
                self.work.metrics_path, logger(self.work.path), started, keep_until_step=keep
            )
        return self.metrics

    def save_checkpoint(
        self,
        step: int,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        rank_states: list[dict[str, Any]],
        keep: int,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Path | None:
        if not self.is_main:
            return None
        with disk_full_is_an_error(self.work.checkpoints_dir):
            return save_checkpoint(
                self.work.checkpoints_dir, step, policy, optimizer, scheduler, rank_states, keep, scaler
            )

    def kept_samples(self) -> list[Sample]:
        """The samples a resumed run keeps: those up to its checkpoint's step (a new run has none)."""
        if self.resume_from is None or not self.work.samples_jsonl.is_file():
            return []
        step = self.resume_from.step
        return [s for s in read_samples(self.work.samples_jsonl) if s.step is not None and s.step <= step]

    def write_samples(self, samples: list[Sample]) -> None:
        """samples.jsonl and samples.md, replaced whole with every sample so far (rank 0)."""
        if self.is_main:
            with disk_full_is_an_error(self.work.samples_jsonl):
                write_samples(self.work.path, samples)

    # ------------------------------------------------------------------ publish

    def publish(self, policy: Any, tokenizer: Any) -> None:
        """The adapter of the peft model `policy` (with its tokenizer) as `adapter/`, whole or
        not at all; the report; for an overwrite, the new run in place of the old one."""
        if not self.is_main:
            return
        from lora_dpo.report import write_report

        with disk_full_is_an_error(self.work.adapter_dir):
            with staged_directory(self.work.adapter_dir) as tmp:
                save_adapter(policy, tmp)  # with the start record of a policy started from an adapter
                tokenizer.save_pretrained(str(tmp))
        log.info("adapter saved to %s", self.target.adapter_dir)
        self.metrics.close()
        with disk_full_is_an_error(self.work.path):
            write_report(self.work.path)  # report.png + report.md; health warnings go to the console too
            if self.staged:
                publish_directory(self.work.path, self.target.path)
                log.info("the new run replaced the previous one in %s", self.target.path)

    # ------------------------------------------------------------------ close

    def __enter__(self) -> RunTransaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self.metrics.close()
                self._drop_unresumable_overwrite()
        finally:
            self._release()

    def _drop_unresumable_overwrite(self) -> None:
        """A failed overwrite that never reached a checkpoint has nothing to resume: it goes,
        and the old run stays the only one."""
        if self.is_main and self.staged and self.resume_from is None and self.work.path.exists():
            if not self.work.checkpoints():
                shutil.rmtree(self.work.path, ignore_errors=True)

    def _release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks.clear()
