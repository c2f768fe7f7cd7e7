"""Fault injection for tests of interruption and failure, read from the environment here only.

    LORA_DPO_STEP_DELAY_S   seconds to sleep after each optimizer step: a run slow enough for a
                            test to signal or kill it between steps
    LORA_DPO_FAIL_AT_STEP   raise after this optimizer step (after its metrics record and its
                            checkpoint, when one is due): a crash at a known point
    LORA_DPO_FAIL_RANK      with LORA_DPO_FAIL_AT_STEP under torchrun: only this rank fails
                            (default: every rank)

Unset, they cost nothing. The failure is an InjectedFault (a RuntimeError, not a LoraDpoError):
it stands for a crash, so the command shows a traceback as it would for one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from lora_dpo.errors import ConfigError

STEP_DELAY_S = "LORA_DPO_STEP_DELAY_S"
FAIL_AT_STEP = "LORA_DPO_FAIL_AT_STEP"
FAIL_RANK = "LORA_DPO_FAIL_RANK"


class InjectedFault(RuntimeError):
    """The failure LORA_DPO_FAIL_AT_STEP asked for."""


@dataclass(frozen=True)
class FaultHooks:
    step_delay_s: float = 0.0
    fail_at_step: int | None = None
    fail_rank: int | None = None

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
        return cls(float(delay or 0.0), number(FAIL_AT_STEP, int), number(FAIL_RANK, int))  # type: ignore[arg-type]

    def after_step(self, step: int, rank: int) -> None:
        """Called once per optimizer step, after everything the step writes."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        if self.fail_at_step == step and self.fail_rank in (None, rank):
            raise InjectedFault(f"rank {rank} failed on purpose at step {step} ({FAIL_AT_STEP})")
