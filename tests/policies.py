"""Shared by the tests that drive pieces of training by hand: a LoRA policy moved off its
init, and the loop's state around it, so `TrainLoop.step` / `TrainLoop.logps` run alone."""

from __future__ import annotations

from typing import Any

import torch

from lora_dpo.config import Config
from lora_dpo.data import TokenizedPair
from lora_dpo.distributed import DistInfo
from lora_dpo.inputs import RunInputs
from lora_dpo.metrics import WindowMeter
from lora_dpo.run.metrics_file import NullMetricsFile
from lora_dpo.train import TrainLoop, TrainState

CPU = torch.device("cpu")


def move_lora_b_off_zero(policy: torch.nn.Module, std: float = 0.05) -> None:
    """LoRA B drawn from N(0, std²) (the RNG as it stands): the policy is no longer its base."""
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def loop_alone(
    config: Config,
    pairs: list[TokenizedPair],
    policy: torch.nn.Module,
    pad_id: int,
    layout: str,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    reference: Any = None,  # ReferenceValues aligned with `pairs`, or None
) -> TrainLoop:
    """A TrainLoop over `pairs` with no run directory, signals or metrics file: the inputs the
    loop's step reads are the pairs and their reference values."""
    inputs = RunInputs(None, pairs, [], None, None, reference, None, None, CPU)
    state = TrainState(
        config,
        inputs,
        policy,
        optimizer,
        scheduler,
        WindowMeter(CPU),
        [],
        NullMetricsFile(),
        DistInfo(),
        pad_id,
        layout,
    )
    return TrainLoop(state, run=None, stop=None)
