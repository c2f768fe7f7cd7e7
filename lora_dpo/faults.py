"""Fault injection for tests of interruption and failure, read from the environment here only.

    LORA_DPO_STEP_DELAY_S   seconds to sleep after each optimizer step: a run slow enough for a
                            test to signal or kill it between steps
    LORA_DPO_FAIL_AT_STEP   raise after this optimizer step (after its metrics record and its
                            checkpoint, when one is due): a crash at a known point
    LORA_DPO_FAIL_RANK      with LORA_DPO_FAIL_AT_STEP under torchrun: only this rank fails
                            (default: every rank)
    LORA_DPO_SHARDS_DELAY_S seconds precompute-ref sleeps before scoring a rank's shards: one
                            rank that finishes long after the others
    LORA_DPO_SLOW_RANK      with LORA_DPO_SHARDS_DELAY_S under torchrun: only this rank sleeps
                            (default: every rank)
    LORA_DPO_COLLECTIVE_TIMEOUT_S  the default process group's timeout under torchrun, in
                            seconds (default 30 minutes): short, it shows that the waits for a
                            slow rank do not depend on it

Unset, they cost nothing. The failure is an InjectedFault (a RuntimeError, not a LoraDpoError):
it stands for a crash, so the command shows a traceback as it would for one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from lora_dpo.errors import ConfigError

STEP_DELAY_S = "LORA_DPO_STEP_DELAY_S"
FAIL_AT_STEP = "LORA_DPO_FAIL_AT_STEP"
FAIL_RANK = "LORA_DPO_FAIL_RANK"
SHARDS_DELAY_S = "LORA_DPO_SHARDS_DELAY_S"
SLOW_RANK = "LORA_DPO_SLOW_RANK"
COLLECTIVE_TIMEOUT_S = "LORA_DPO_COLLECTIVE_TIMEOUT_S"


class InjectedFault(RuntimeError):
    """The failure LORA_DPO_FAIL_AT_STEP asked for."""


@dataclass(frozen=True)
class FaultHooks:
    step_delay_s: float = 0.0
    fail_at_step: int | None = None
    fail_rank: int | None = None
    shards_delay_s: float = 0.0
    slow_rank: int | None = None
    collective_timeout_s: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultHooks:
        def number(name: str, kind: type) -> float | int | None:
            text = environ.get(name, "").strip()
            if not text:
                return None
            try:
                return kind(text)
            except ValueError:
                raise ConfigError(
                    f"{name}={text!r}: expected {'a number' if kind is float else 'an integer'}"
                ) from None

        delay = number(STEP_DELAY_S, float)
        shards_delay = number(SHARDS_DELAY_S, float)
        return cls(
            float(delay or 0.0),
            number(FAIL_AT_STEP, int),  # type: ignore[arg-type]
            number(FAIL_RANK, int),  # type: ignore[arg-type]
            float(shards_delay or 0.0),
            number(SLOW_RANK, int),  # type: ignore[arg-type]
            number(COLLECTIVE_TIMEOUT_S, float),
        )

    @property
    def collective_timeout(self) -> timedelta | None:
        return None if self.collective_timeout_s is None else timedelta(seconds=self.collective_timeout_s)

    def before_shards(self, rank: int) -> None:
        """Called once by precompute-ref on each rank, before it scores its shards."""
        if self.shards_delay_s > 0 and self.slow_rank in (None, rank):
            time.sleep(self.shards_delay_s)

    def after_step(self, step: int, rank: int) -> None:
        """Called once per optimizer step, after everything the step writes."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        if self.fail_at_step == step and self.fail_rank in (None, rank):
            raise InjectedFault(f"rank {rank} failed on purpose at step {step} ({FAIL_AT_STEP})")
