"""Training: a 4-bit LoRA policy against cached reference log-probs. No reference model.

`train()` reads setup -> loop -> save:
- `setup`: the run directory checked and locked (a RunTransaction, see `lora_dpo.run`), the
  inputs loaded, then the policy, optimizer, schedule, metric window and data order built and,
  on resume, the checkpoint applied: one TrainState;
- `TrainLoop(state, run, stop).run()`: optimizer steps, metric records, evals, checkpoints;
- `save`: the adapter and the report published through the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import COLLATE, pad_id_of, to_device
from lora_dpo.cache import (
    ReferenceValues,
    Step0Tolerance,
    check_step0_agreement,
    step0_tolerance_for,
)
from lora_dpo.checkpoint import Checkpoint, apply_checkpoint
from lora_dpo.config import Config, TrainConfig
from lora_dpo.data import labels_of
from lora_dpo.ddp import ddp_module
from lora_dpo.distributed import DistInfo, all_gather_objects, all_reduce_, dist_info, wait_for_ranks
from lora_dpo.errors import LoraDpoError, TrainingInterrupted
from lora_dpo.evaluate import EvalMetrics, evaluate
from lora_dpo.faults import FaultHooks
from lora_dpo.generate import HeldOut
from lora_dpo.inputs import RunInputs, load_run_inputs
from lora_dpo.judge import WinRateJudge, load_reward_model
from lora_dpo.loggers import check_backends, open_logger
from lora_dpo.logps import SequenceLogps, sequence_logps
from lora_dpo.losses import LossSettings, PairLogps, compute_loss
from lora_dpo.metrics import WindowMeter, console_line
from lora_dpo.model import build_policy, default_device, dtype_choice
from lora_dpo.offload import offload_saved_tensors
from lora_dpo.optim import (
    StepPlan,
    build_optimizer,
    build_scheduler,
    loss_scaler,
    optimizer_steps,
    release_optimizer,
    step_if_finite,
)
from lora_dpo.packing import choose_layout
from lora_dpo.run.metrics_file import MetricsFile, NullMetricsFile
from lora_dpo.run.stop import StopOnSignal
from lora_dpo.run.transaction import RunTransaction
from lora_dpo.samples import Sample

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    history: list[dict[str, float]]  # the logging-step records written to metrics.jsonl
    policy: torch.nn.Module  # the trained peft model, for callers that go on using it
    eval_before: EvalMetrics | None
    eval_after: EvalMetrics | None


@dataclass
class TrainState:
    """Everything the loop reads and advances; `setup` builds it, the loop moves it on."""

    config: Config
    inputs: RunInputs
    policy: torch.nn.Module  # the peft model: frozen base + trainable LoRA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    meter: WindowMeter  # the metrics since the last logging step, on the device
    plan: list[StepPlan]  # this rank's micro-batches of every optimizer step: the data order
    metrics: MetricsFile | NullMetricsFile  # metrics.jsonl (and the logging backends) on rank 0
    dist: DistInfo
    pad_id: int
    layout: str  # the batch layout choose_layout prepared the policy for (lora_dpo.packing)
    # fp16 loss scaling; for any other compute dtype a disabled scaler (the identity)
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    step: int = 0  # optimizer steps done (a resumed run starts at its checkpoint's)
    step0_tolerance: Step0Tolerance | None = None  # the step-0 check, while the policy is the reference
    history: list[dict[str, float]] = field(default_factory=list)  # the logging-step records
    eval_before: EvalMetrics | None = None
    eval_after: EvalMetrics | None = None
    # rank 0, with train.generate_every or train.reward_model: completions of held-out prompts
    held_out: HeldOut | None = None
    judge: WinRateJudge | None = None
    samples: list[Sample] = field(default_factory=list)  # samples.jsonl so far

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train

    @property
    def total_steps(self) -> int:
        return len(self.plan)

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def loss(self) -> LossSettings:
        return LossSettings.of(self.cfg)

    def references(self) -> tuple[ReferenceValues | None, ReferenceValues | None]:
        """(train, eval) reference values this run's objective reads: none for a reference-free
        one, even where the inputs hold some (a sweep of several objectives)."""
        if self.loss.reference_free:
            return None, None
        return self.inputs.reference, self.inputs.eval_reference


def train(config: Config, inputs: RunInputs | None = None, *, resume: bool = False) -> TrainResult:
    """Setup, train, save into `train.output_dir` (its rules: `lora_dpo.run.directory`).

    With `resume`, continues from the newest intact checkpoint there: same data order, same
    RNG, so the losses equal those of an uninterrupted run.
    """
    info = dist_info()  # under torchrun: this process's rank; only rank 0 writes files
    device = inputs.device if inputs else default_device()
    with RunTransaction.open(config, resume=resume, is_main=info.is_main, device=device) as run:
        state = setup(config, inputs, run, info)
        try:
            with StopOnSignal() as stop:
                TrainLoop(state, run, stop).run()
            return save(state, run)
        finally:  # the process may train again (a sweep): nothing of this run's optimizer stays
            release_optimizer(state.optimizer)


def setup(config: Config, inputs: RunInputs | None, run: RunTransaction, info: DistInfo) -> TrainState:
    """Load the inputs, make the run directory's first writes, build what training advances."""
    cfg = config.train
    wait_for_ranks("the run directory checked")  # by every rank, before rank 0 writes to it
    seed_everything(cfg.seed)
    started = time.perf_counter()  # wall time in metrics.jsonl counts from here
    check_backends(cfg.report_to)  # a missing tensorboard/wandb costs seconds, not a model load
    generates = info.is_main and bool(cfg.generate_every and config.data.eval_path or cfg.reward_model)
    if info.is_main and cfg.generate_every and not config.data.eval_path:
        log.warning(
            "train.generate_every=%d: no eval split (data.eval_path), so no samples", cfg.generate_every
        )
    device = inputs.device if inputs else default_device()
    compute = dtype_choice(config.model.dtype, device)
    log.info("compute dtype: %s (%s)", str(compute.dtype).removeprefix("torch."), compute.reason)
    # before the inputs: a bad reward model path costs seconds, not a model load
    reward = load_reward_model(cfg.reward_model, device) if generates and cfg.reward_model else None
    inputs = inputs or load_run_inputs(config)
    run.begin(config, inputs.data_report.to_dict())

    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    policy = build_policy(inputs.base, config, gradient_checkpointing=cfg.gradient_checkpointing)
    layout = choose_layout(cfg.layout, policy, inputs.device)  # a refusal comes now, not at the first batch
    log.info("%s", layout.describe(cfg.max_tokens_per_batch, cfg.per_device_batch_size))
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg, inputs.device)
    plan = list(optimizer_steps(inputs.pairs, cfg, info.rank, info.world_size, layout.name))
    state = TrainState(
        config,
        inputs,
        policy,
        optimizer,
        build_scheduler(optimizer, cfg, len(plan)),
        WindowMeter(inputs.device),
        plan,
        NullMetricsFile(),
        info,
        pad_id_of(inputs.tokenizer),
        layout.name,
        scaler=loss_scaler(compute.dtype, inputs.device),
    )
    if run.resume_from is not None:
        resume_from(state, run.resume_from)
    elif not cfg.accept_cache_mismatch and state.references()[0] is not None:
        assert inputs.cache is not None  # reference values come from it
        state.step0_tolerance = step0_tolerance_for(inputs.cache.manifest)
    if generates:
        conversational = inputs.data_report.conversational
        state.held_out = HeldOut.from_config(
            config, inputs.tokenizer, inputs.eval_pairs, conversational, inputs.device
        )
        state.judge = WinRateJudge(reward, state.held_out) if reward is not None else None
        state.samples = run.kept_samples()
    resume_step = run.resume_from.step if run.resume_from is not None else None
    state.metrics = run.open_metrics(
        lambda path: open_logger(cfg.report_to, path, config.to_dict(), resume_step), started
    )
    wait_for_ranks("setup")  # rank 0 alone loaded the reward model and opened the loggers
    return state


def resume_from(state: TrainState, checkpoint: Checkpoint) -> None:
    """Weights, optimizer, schedule, RNG and metric window as they were at the checkpoint."""
    chosen = all_gather_objects(checkpoint.path.name)
    if len(set(chosen)) > 1:  # a checkpoint damaged for one rank only (a file system hiccup)
        raise LoraDpoError(
            f"{checkpoint.path.parent}: the ranks found different newest intact checkpoints: {chosen}"
        )
    dist = state.dist
    window = apply_checkpoint(
        checkpoint, state.policy, state.optimizer, state.scheduler, dist.rank, dist.world_size, state.scaler
    )
    state.meter.load_state_dict(window)
    state.step = checkpoint.step  # the policy has trained: no step-0 check
    log.info(
        "resuming %s from %s (step %d of %d)",
        state.cfg.output_dir,
        checkpoint.path.name,
        state.step,
        state.total_steps,
    )


def save(state: TrainState, run: RunTransaction) -> TrainResult:
    """Publish the adapter and the report (rank 0; the others wait)."""
    if not all(torch.isfinite(p).all() for p in state.policy.parameters() if p.requires_grad):
        raise LoraDpoError(
            "the trained adapter holds non-finite values; it was not saved"
        )  # skipped steps: cannot happen
    run.publish(state.policy, state.inputs.tokenizer)
    wait_for_ranks("the adapter published")
    return TrainResult(
        run.target.path,
        run.target.adapter_dir,
        state.history,
        state.policy,
        state.eval_before,
        state.eval_after,
    )


class TrainLoop:
    """The optimizer steps of a TrainState's plan from `state.step + 1` to the end, with the
    metric records, evals and checkpoints they are due."""

    def __init__(
        self, state: TrainState, run: RunTransaction, stop: StopOnSignal, faults: FaultHooks | None = None
    ):
        self.state = state
        self.run_dir = run  # checkpoints are saved through it
        self.stop = stop
        self.faults = faults or FaultHooks.from_env()
        self.consecutive_skips = 0
        # Under torchrun the log-prob function runs through DDP, which all-reduces the LoRA
        # gradients (the frozen base is not synchronised: every rank loaded the same weights).
        self.ddp = (
            ddp_module(state.policy, state.cfg.logits_chunk_size, state.loss.statistics, state.device)
            if state.dist.enabled
            else None
        )

    def run(self) -> None:
        s, cfg = self.state, self.state.cfg
        total = s.total_steps
        if s.step == 0:
            s.eval_before = self.run_eval(0)
        s.policy.train()
        quiet = {} if s.dist.is_main else {"disable": True}  # one bar per job, not per rank
        progress = tqdm(total=total, initial=s.step, desc="train", unit="step", **quiet)
        for step in range(s.step + 1, total + 1):
            micro_batches, pairs_in_step = s.plan[step - 1]
            lr = float(s.scheduler.get_last_lr()[0])  # the rate this step's update uses
            self.step(micro_batches, pairs_in_step, s.step0_tolerance if step == 1 else None)
            s.step = step
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total:
                self.log_window(lr, progress)
            if step == total or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0):
                s.eval_after = self.run_eval(step)
            if cfg.generate_every and (step % cfg.generate_every == 0 or step == total):
                self.write_samples()
            stopping = self.agree_to_stop()
            if stopping or (cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total):
                path = self.checkpoint()
                if stopping:
                    progress.close()
                    raise TrainingInterrupted(
                        f"{self.stop.signal_name} at step {step}/{total}: checkpoint saved to {path}; "
                        f"continue with: lora-dpo train --resume {self.run_dir.target.path}",
                        self.stop.signal_name or "SIGTERM",
                    )
            self.faults.after_step(step, s.dist.rank)
        progress.close()

    def step(
        self, micro_batches: list[list[int]], pairs_in_step: int, step0_tolerance: Step0Tolerance | None
    ) -> None:
        """One optimizer step over this rank's micro-batches; not made if its loss or gradient
        is not finite (the learning-rate schedule moves on either way)."""
        s, cfg = self.state, self.state.cfg
        s.meter.begin_step()
        loss, reference = s.loss, s.references()[0]
        finite = torch.ones((), dtype=torch.bool, device=s.device)
        rows: list[int] = []
        for number, indices in enumerate(micro_batches):
            rows_in_batch = [s.inputs.pairs[i] for i in indices]
            batch = COLLATE[s.layout](rows_in_batch, s.pad_id)
            tokens = batch.sequence_tokens  # counted on the CPU: no device sync
            rows += batch.source_indices
            batch = batch.to(s.device)
            ref_chosen = ref_rejected = ref_shared = None
            if reference is not None:
                ref_chosen, ref_rejected = (to_device(t, s.device) for t in reference.logps(indices))
                if loss.needs_shared_prefix:
                    shared_chosen, shared_rejected = reference.shared_logps(indices)
                    ref_shared = (to_device(shared_chosen, s.device), to_device(shared_rejected, s.device))
            # Under DDP, gradients are all-reduced once per step: on its last micro-batch.
            last = number == len(micro_batches) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with offload_saved_tensors(cfg.offload_activations):  # layer inputs wait on the host
                    policy_logps = self.logps(batch)  # chosen and rejected in one forward
                if step0_tolerance is not None and number == 0:
                    assert ref_chosen is not None and ref_rejected is not None  # set only with a reference
                    named = (batch.source_indices, batch.pair_hashes)  # the error names the worst pair
                    check_step0_agreement(policy_logps, ref_chosen, ref_rejected, step0_tolerance, *named)
                # the policy's token counts are the cache's: the same pair, the same tokens
                labels = labels_of(rows_in_batch)  # KTO's rows: which are desirable; None for pairs
                labels = to_device(labels, s.device) if labels is not None else None
                out = compute_loss(
                    loss, PairLogps.of(policy_logps, ref_chosen, ref_rejected, ref_shared, labels)
                )
                # Sum over pairs / pairs in the global step: accumulation gives the mean of one
                # big batch. DDP averages gradients over ranks, so each share is scaled back up.
                s.scaler.scale(out.losses.sum() * (s.dist.world_size / pairs_in_step)).backward()
            finite = finite & s.meter.add_pairs(out, policy_logps, tokens)
        params = [p for group in s.optimizer.param_groups for p in group["params"]]
        s.scaler.unscale_(s.optimizer)  # fp16: the true gradients, for clipping and the step
        # None: no clipping; an infinite bound only measures the norm, for the log.
        max_norm = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
        # The accumulated (and, under DDP, all-reduced) gradients' norm, one fused reduction,
        # is finite exactly when every gradient is: the finiteness check costs nothing more.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = finite & torch.isfinite(grad_norm)
        # The loss is this rank's own: every rank must take or skip the step alike.
        finite = all_reduce_(finite.to(torch.int32), "min").bool()
        step_if_finite(s.optimizer, s.scheduler, s.scaler, finite)
        s.optimizer.zero_grad(set_to_none=True)
        s.meter.end_step(grad_norm, finite, rows)

    def logps(self, batch: Any) -> SequenceLogps:
        if self.ddp is None:
            s = self.state
            return sequence_logps(s.policy, batch, s.cfg.logits_chunk_size, **s.loss.statistics)
        return SequenceLogps(*self.ddp(batch))

    def log_window(self, lr: float, progress: Any) -> None:
        """The metric record of the window ending at this step (the window's one host sync)."""
        s = self.state
        metrics, window = s.meter.flush()
        record = {"step": s.step, "lr": lr, **metrics}
        if s.scaler.is_enabled():  # fp16: the loss scale the next step starts from
            record["loss_scale"] = s.scaler.get_scale()
        s.metrics.write(record)
        s.history.append(record)
        if s.dist.is_main:
            progress.write(console_line(s.step, s.total_steps, record))
        self.consecutive_skips = self.report_skips(window, self.consecutive_skips, s.step)

    def run_eval(self, step: int) -> EvalMetrics | None:
        """On every rank, each scoring a share of the pairs; the judge on rank 0 (the others wait)."""
        s = self.state
        metrics = None
        if s.inputs.eval_pairs:
            metrics = evaluate(
                s.policy,
                s.inputs.eval_pairs,
                s.references()[1],
                s.loss,
                s.pad_id,
                s.config.precompute.batch_size,
                s.device,
                s.layout,
                s.config.precompute.max_tokens_per_batch,
            )
            if s.judge is not None:  # rank 0 only
                metrics = metrics.judged(s.judge(s.policy))
            s.metrics.write({"step": step, **metrics.to_dict()})  # rank 0 only
        wait_for_ranks("eval")
        return metrics

    def write_samples(self) -> None:
        """The policy's completions of the held-out prompts at this step, beside the
        reference's, added to samples.jsonl and samples.md (rank 0; the others wait)."""
        s = self.state
        if s.held_out is not None:
            s.samples += s.held_out.samples(s.policy, s.step)
            self.run_dir.write_samples(s.samples)
        wait_for_ranks("samples")

    def checkpoint(self) -> Path | None:
        """Every rank's RNG states and metric window, gathered; rank 0 writes the checkpoint."""
        s = self.state
        rank_states = all_gather_objects(rank_state(s.meter))
        path = self.run_dir.save_checkpoint(
            s.step, s.policy, s.optimizer, s.scheduler, rank_states, s.cfg.save_total_limit, s.scaler
        )
        wait_for_ranks("checkpoint")
        return path

    def agree_to_stop(self) -> bool:
        """Whether any rank was signalled; under torchrun all ranks must stop at the same step
        (this costs one tiny collective per optimizer step there, none in one process)."""
        signalled = self.stop.signal_name is not None
        if not self.state.dist.enabled:
            return signalled
        flag = torch.tensor([int(signalled)], device=self.state.device)
        return bool(all_reduce_(flag, "max").item())

    def report_skips(self, window: list[tuple[bool, list[int]]], consecutive: int, step: int) -> int:
        """Log the window's skipped steps with their pairs; stop once max_consecutive_skips
        steps in a row were skipped. Returns the run of skips the window ends with."""
        skipped_rows: list[list[int]] = []
        for finite, rows in window:
            consecutive = 0 if finite else consecutive + 1
            if not finite:
                skipped_rows.append(rows)
            if consecutive >= self.state.cfg.max_consecutive_skips:
                raise LoraDpoError(
                    f"stopping: {consecutive} optimizer steps in a row had a non-finite loss or "
                    f"gradient (train.max_consecutive_skips={self.state.cfg.max_consecutive_skips}); pairs "
                    f"of the skipped steps (source rows): {skipped_rows}. Check these rows and the "
                    "reference cache (lora-dpo cache verify)"
                )
        if skipped_rows:
            log.warning(
                "up to step %d: skipped %d update(s) with a non-finite loss or gradient; "
                "their pairs (source rows): %s",
                step,
                len(skipped_rows),
                skipped_rows,
            )
        return consecutive


def rank_state(meter: WindowMeter) -> dict[str, Any]:
    """What a checkpoint keeps per rank: the metric window and the RNG states (dropout)."""
    state = {"meter": meter.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
