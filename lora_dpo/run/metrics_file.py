"""metrics.jsonl: one JSON record per line, appended as training goes, kept up to the checkpoint
when a run resumes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lora_dpo.errors import LoraDpoError
from lora_dpo.fileio import write_text
from lora_dpo.loggers import MetricLogger, NullLogger
from lora_dpo.run.disk import disk_full_is_an_error

log = logging.getLogger(__name__)


class MetricsFile:
    """Appends one JSON object per record to `metrics.jsonl`, stamped with `elapsed_s` (wall
    seconds since `started`), and passes the same record to `logger` (TensorBoard, W&B)."""

    def __init__(
        self,
        path: Path,
        logger: MetricLogger | None = None,
        started: float | None = None,
        keep_until_step: int | None = None,
    ):
        """A new file, or with `keep_until_step` (a resumed run) the records up to that step."""
        self.path = path
        self.logger = logger or NullLogger()
        self.started = time.perf_counter() if started is None else started
        kept = records_until(path, keep_until_step) if keep_until_step is not None and path.is_file() else []
        with disk_full_is_an_error(path):
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "elapsed_s": time.perf_counter() - self.started}
        # An append, not an atomic rewrite: a kill mid-write leaves at most a cut-short last
        # line, which a resume drops (records_until).
        with disk_full_is_an_error(self.path), self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.logger.log(record)

    def close(self) -> None:
        """Close the logging backends (once: a failed run closes what a finished one did)."""
        logger, self.logger = self.logger, NullLogger()
        logger.close()


class NullMetricsFile:
    """What ranks other than 0 write to under torchrun: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def records_until(path: Path, step: int) -> list[str]:
    """The lines of `path` whose record has `step` <= `step`. A last line that does not parse
    is what a kill in the middle of an append leaves: dropped, with a notice. Any other line
    that does not parse is damage a resume must not paper over: an error naming the line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last:
                log.warning("%s line %d is cut short (an interrupted write); dropped", path, number)
                continue
            raise LoraDpoError(
                f"{path} line {number} is not a JSON record ({exc.msg}); only a cut-short last "
                "line is dropped on resume: repair or delete that line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise LoraDpoError(f"{path} line {number} is not a metrics record (no integer step)")
        if record["step"] <= step:
            kept.append(line)
    return kept
