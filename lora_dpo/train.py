"""The training loop: a 4-bit LoRA policy against cached reference log-probs. No reference model."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from lora_dpo.batching import collate, collate_packed, length_grouped_batches, pad_id_of
from lora_dpo.cache import (
    ReferenceCache,
    ReferenceValues,
    check_step0_agreement,
    open_checked_cache,
    policy_precision,
    step0_tolerance_for,
)
from lora_dpo.checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from lora_dpo.config import Config, TrainConfig, dump_config
from lora_dpo.data import DataReport, TokenizedPair, load_preference_data
from lora_dpo.distributed import DistInfo, all_gather_objects, all_reduce_, barrier, dist_info
from lora_dpo.errors import ConfigError, LoraDpoError, TrainingInterrupted
from lora_dpo.evaluate import EvalMetrics, evaluate
from lora_dpo.fileio import write_json, write_text
from lora_dpo.loggers import check_backends, open_logger
from lora_dpo.logps import SequenceLogps, check_prefix_sharing_support, sequence_logps
from lora_dpo.losses import LossSettings, PairLogps, compute_loss
from lora_dpo.metrics import MetricsFile, NullMetricsFile, WindowMeter, console_line
from lora_dpo.model import (
    attach_lora,
    default_device,
    load_base_model,
    load_tokenizer,
    resolve_model_dir,
)
from lora_dpo.report import write_report

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
class RunInputs:
    """What a training run reads besides its `train` settings; a sweep loads it once."""

    tokenizer: Any
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    data_report: DataReport
    # None for a reference-free objective (simpo, orpo, cpo): no cache is read
    cache: ReferenceCache | None
    reference: ReferenceValues | None  # aligned with `pairs`
    eval_reference: ReferenceValues | None  # aligned with `eval_pairs`
    base: torch.nn.Module  # the frozen (4-bit) base, without adapters
    device: torch.device


def load_run_inputs(config: Config, with_reference: bool | None = None) -> RunInputs:
    """Data, the checked reference cache, then the base model. The cache is skipped when the
    objective needs no reference (`with_reference` decides for a sweep of several)."""
    if with_reference is None:
        with_reference = not LossSettings.of(config.train).reference_free
    if not with_reference:
        log.info(
            "train.loss_type=%s is reference-free: no reference cache is read (precompute.cache_dir is ignored)",
            config.train.loss_type,
        )
    device = default_device()
    optimizer_name(config.train, device)  # an impossible optimizer costs nothing to find out
    precision = policy_precision(config, device)
    # Data and reference values first: a cache problem should cost seconds, not a model load.
    tokenizer = load_tokenizer(config.model)
    pairs, report = load_preference_data(config.data, tokenizer, "train")
    log.info("train data: %s", report.summary())
    eval_pairs = load_preference_data(config.data, tokenizer, "eval")[0] if config.data.eval_path else []
    def load_base() -> torch.nn.Module:
        return load_base_model(
            config.model, quantize=precision.quantization == "nf4", dtype=precision.dtype, device=device
        )

    # A hub model not downloaded yet has no weights to fingerprint before it is loaded.
    base = None if resolve_model_dir(config.model) else load_base()
    cache = reference = eval_reference = None
    if with_reference:
        cache = open_checked_cache(config, tokenizer, precision, accept_mismatch=config.train.accept_cache_mismatch)
        reference, eval_reference = cache.aligned(pairs, "train"), cache.aligned(eval_pairs, "eval")
    base = base or load_base()
    return RunInputs(tokenizer, pairs, eval_pairs, report, cache, reference, eval_reference, base, device)


def train(config: Config, inputs: RunInputs | None = None, *, resume: bool = False) -> TrainResult:
    """Setup, train, save. Writes config.yaml, metrics.jsonl and adapter/ under output_dir.

    With `resume`, continues from the latest checkpoint in output_dir: same data order, same
    RNG, so the losses equal those of an uninterrupted run.
    """
    cfg = config.train
    output_dir = Path(cfg.output_dir)
    if (output_dir / "adapter").exists() and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"train.output_dir={str(output_dir)!r} already holds a trained run; choose another "
            "directory or set train.overwrite_output_dir=true"
        )
    info = dist_info()  # under torchrun: this process's rank; only rank 0 writes files
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if info.is_main:
        if not resume:
            for stale in checkpoint_dirs(output_dir):  # an overwritten run's checkpoints
                shutil.rmtree(stale)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "config.yaml", dump_config(config))
    seed_everything(cfg.seed)
    started = time.perf_counter()  # wall time in metrics.jsonl counts from here
    check_backends(cfg.report_to)  # a missing tensorboard/wandb costs seconds, not a model load
    inputs = inputs or load_run_inputs(config)
    if info.is_main:
        write_json(output_dir / "data_report.json", inputs.data_report.to_dict())
    device, cache = inputs.device, inputs.cache

    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    policy = attach_lora(inputs.base, config.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.prefix_sharing:
        check_prefix_sharing_support(policy)  # refused now, not at the first batch
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg, device)
    total_steps = count_optimizer_steps(len(inputs.pairs), cfg, info.world_size)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps
    )
    pad_id = pad_id_of(inputs.tokenizer)
    loss = LossSettings.of(cfg)
    reference, eval_reference = (None, None) if loss.reference_free else (inputs.reference, inputs.eval_reference)
    step0_tolerance = None
    if reference is not None and cache is not None and not config.train.accept_cache_mismatch:
        step0_tolerance = step0_tolerance_for(cache.manifest)

    def run_eval() -> EvalMetrics | None:
        """On rank 0 (the others wait): evaluation is a small fraction of a run."""
        metrics = None
        if inputs.eval_pairs and info.is_main:
            metrics = evaluate(
                policy, inputs.eval_pairs, eval_reference, loss, pad_id,
                cfg.per_device_batch_size, device,
            )
        barrier()
        return metrics

    meter = WindowMeter(device)
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, policy, optimizer, scheduler, info.rank, info.world_size)
        start_step = state["step"]
        meter.load_state_dict(state["meter"])
        step0_tolerance = None  # the policy has trained: it is not the reference any more
        log.info("resuming %s from %s (step %d of %d)", output_dir, checkpoint.name, start_step, total_steps)
    metrics_file = (
        MetricsFile(
            output_dir / "metrics.jsonl",
            open_logger(cfg.report_to, output_dir, config.to_dict()),
            started,
            keep_until_step=start_step if checkpoint is not None else None,
        )
        if info.is_main
        else NullMetricsFile()
    )
    eval_before = None
    if checkpoint is None:
        eval_before = run_eval()
        if eval_before:
            metrics_file.write({"step": 0, **eval_before.to_dict()})
    loop = TrainLoop(policy, optimizer, scheduler, inputs.pairs, reference, cfg, pad_id, device, info)
    with StopOnSignal() as stop:
        history, eval_after = loop.run(
            total_steps, start_step, meter, metrics_file, run_eval, step0_tolerance, stop,
            save=lambda step, meter_state: save_checkpoint(
                output_dir, step, policy, optimizer, scheduler, meter_state, cfg.save_total_limit
            ),
        )

    if not all(torch.isfinite(p).all() for p in trainable):  # cannot happen: skipped steps
        raise LoraDpoError("the trained adapter holds non-finite values; it was not saved")
    adapter_dir = output_dir / "adapter"
    if info.is_main:
        policy.save_pretrained(str(adapter_dir))
        inputs.tokenizer.save_pretrained(str(adapter_dir))
        log.info("adapter saved to %s", adapter_dir)
        metrics_file.close()
        write_report(output_dir)  # report.png + report.md; health warnings go to the console too
    barrier()
    return TrainResult(output_dir, adapter_dir, history, policy, eval_before, eval_after)


class PairLogpsModule(torch.nn.Module):
    """The policy with the log-prob function as its forward: the module DDP wraps."""

    def __init__(self, policy: torch.nn.Module, chunk_size: int, statistics: dict[str, bool]):
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size
        self.statistics = statistics  # sequence_logps's optional statistics the loss reads

    def forward(self, batch: Any) -> tuple[torch.Tensor | None, ...]:
        out = sequence_logps(self.policy, batch, self.chunk_size, **self.statistics)
        return out.logps, out.tokens, out.shared_logps, out.log_sum_sq_probs


def rank_state(meter: WindowMeter) -> dict[str, Any]:
    """What a checkpoint keeps per rank: the metric window and the RNG states (dropout)."""
    state = {"meter": meter.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step, so the run
    stops at a step boundary with a checkpoint instead of dying mid-update."""

    def __enter__(self) -> "StopOnSignal":
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainLoop:
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pairs: Sequence[TokenizedPair]
    reference: ReferenceValues | None  # aligned with `pairs`; None for a reference-free objective
    cfg: TrainConfig
    pad_id: int
    device: torch.device
    dist: DistInfo = DistInfo()

    def __post_init__(self) -> None:
        self.loss = LossSettings.of(self.cfg)
        self.statistics = {"shared_prefix": self.loss.needs_shared_prefix, "log_sum_sq_probs": self.loss.use_weighting}
        # Under torchrun the log-prob function runs through DDP, which all-reduces the LoRA
        # gradients (the frozen base is not synchronised: every rank loaded the same weights).
        self.ddp = None
        if self.dist.enabled:
            module = PairLogpsModule(self.policy, self.cfg.logits_chunk_size, self.statistics)
            frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in module.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
            self.ddp = DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def run(
        self,
        total_steps: int,
        start_step: int,
        meter: WindowMeter,
        metrics_file: MetricsFile,
        run_eval: Callable[[], EvalMetrics | None],
        step0_tolerance: float | None,
        stop: StopOnSignal,
        save: Callable[[int, dict[str, Any]], Path],
    ) -> tuple[list[dict[str, float]], EvalMetrics | None]:
        """Optimizer steps start_step+1 .. total_steps; returns the logged records and the
        final eval (run at the last step)."""
        cfg = self.cfg
        self.policy.train()
        history: list[dict[str, float]] = []
        last_eval = None
        consecutive_skips = 0
        quiet = {} if self.dist.is_main else {"disable": True}  # one bar per job, not per rank
        progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", **quiet)
        steps = optimizer_steps(self.pairs, cfg, self.dist.rank, self.dist.world_size)
        for step, (micro_batches, pairs_in_step) in enumerate(steps, start=1):
            if step <= start_step:
                continue  # a resumed run: these batches were trained before the checkpoint
            check = step0_tolerance if step == start_step + 1 == 1 else None
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            grad_norm, finite = self.step(micro_batches, pairs_in_step, meter, check)
            progress.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                metrics, window = meter.flush()  # the only host sync of the window
                record = {"step": step, "lr": lr, **metrics}
                metrics_file.write(record)
                history.append(record)
                if self.dist.is_main:
                    progress.write(console_line(step, total_steps, record))
                consecutive_skips = self.report_skips(window, consecutive_skips, step)
            if step == total_steps or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0):
                last_eval = run_eval()
                if last_eval:
                    metrics_file.write({"step": step, **last_eval.to_dict()})
            stopping = self.agree_to_stop(stop)
            if stopping or (cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps):
                rank_states = all_gather_objects(rank_state(meter))
                path = save(step, rank_states) if self.dist.is_main else None
                barrier()
                if stopping:
                    progress.close()
                    raise TrainingInterrupted(
                        f"{stop.signal_name} at step {step}/{total_steps}: checkpoint saved to {path}; "
                        f"continue with: lora-dpo train --resume {Path(cfg.output_dir)}",
                        stop.signal_name or "SIGTERM",
                    )
        progress.close()
        return history, last_eval

    def step(
        self,
        micro_batches: list[list[int]],
        pairs_in_step: int,
        meter: WindowMeter,
        step0_tolerance: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches; skipped on the device if not finite."""
        cfg = self.cfg
        meter.begin_step()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        rows: list[int] = []
        for number, indices in enumerate(micro_batches):
            pack = collate_packed if cfg.prefix_sharing else collate  # prompt once per pair, or twice
            batch = pack([self.pairs[i] for i in indices], self.pad_id)
            tokens = batch.sequence_tokens  # counted on the CPU: no device sync
            rows += batch.source_indices
            batch = batch.to(self.device)
            ref_chosen = ref_rejected = None
            if self.reference is not None:
                ref_chosen, ref_rejected = (t.to(self.device) for t in self.reference.logps(indices))
            # Under DDP, gradients are all-reduced once per step: on its last micro-batch.
            last = number == len(micro_batches) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                policy_logps = self.logps(batch)  # chosen and rejected in one forward
                if step0_tolerance is not None and number == 0:
                    assert ref_chosen is not None and ref_rejected is not None  # set only with a reference
                    check_step0_agreement(policy_logps, ref_chosen, ref_rejected, step0_tolerance)
                # the policy's token counts are the cache's: the same pair, the same tokens
                out = compute_loss(self.loss, PairLogps.of(policy_logps, ref_chosen, ref_rejected))
                # Sum over pairs / pairs in the global step: accumulation gives the mean of one
                # big batch. DDP averages gradients over ranks, so each share is scaled back up.
                (out.losses.sum() * (self.dist.world_size / pairs_in_step)).backward()
            finite = finite & meter.add_pairs(out, policy_logps, tokens)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # None: no clipping; an infinite bound only measures the norm, for the log.
        max_norm = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = finite & torch.isfinite(grad_norm)
        finite = all_reduce_(finite.to(torch.int32), "min").bool()  # every rank skips alike
        finite_step(self.optimizer, params, finite)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        meter.end_step(grad_norm, finite, rows)
        return grad_norm, finite

    def logps(self, batch: Any) -> SequenceLogps:
        if self.ddp is None:
            return sequence_logps(self.policy, batch, self.cfg.logits_chunk_size, **self.statistics)
        return SequenceLogps(*self.ddp(batch))

    def agree_to_stop(self, stop: "StopOnSignal") -> bool:
        """Whether any rank was signalled; under torchrun all ranks must stop at the same step
        (this costs one tiny collective per optimizer step there, none in one process)."""
        if not self.dist.enabled:
            return stop.signal_name is not None
        flag = torch.tensor([int(stop.signal_name is not None)], device=self.device)
        return bool(all_reduce_(flag, "max").item())

    def report_skips(self, window: list[tuple[bool, list[int]]], consecutive: int, step: int) -> int:
        """Log the window's skipped steps with their pairs; stop once max_consecutive_skips
        steps in a row were skipped. Returns the run of skips the window ends with."""
        skipped_rows: list[list[int]] = []
        for finite, rows in window:
            consecutive = 0 if finite else consecutive + 1
            if not finite:
                skipped_rows.append(rows)
            if consecutive >= self.cfg.max_consecutive_skips:
                raise LoraDpoError(
                    f"stopping: {consecutive} optimizer steps in a row had a non-finite loss or "
                    f"gradient (train.max_consecutive_skips={self.cfg.max_consecutive_skips}); pairs "
                    f"of the skipped steps (source rows): {skipped_rows}. Check these rows and the "
                    "reference cache (lora-dpo cache verify)"
                )
        if skipped_rows:
            log.warning(
                "up to step %d: skipped %d update(s) with a non-finite loss or gradient; "
                "their pairs (source rows): %s", step, len(skipped_rows), skipped_rows,
            )
        return consecutive


def finite_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], finite: torch.Tensor) -> None:
    """optimizer.step(), undone on the device when `finite` is False: no host sync per step.

    Costs one copy of the trainable weights and their optimizer state (the adapters only).
    """
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.grad = torch.where(finite, param.grad, torch.zeros_like(param.grad))
        tensors = list(params) + [
            value
            for param in params
            for value in optimizer.state.get(param, {}).values()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
        ]
        before = [t.clone() for t in tensors]
        optimizer.step()
        for tensor, old in zip(tensors, before):
            tensor.copy_(torch.where(finite, tensor, old))


def optimizer_steps(
    pairs: Sequence[TokenizedPair], cfg: TrainConfig, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[list[list[int]], int]]:
    """(this rank's micro-batches as lists of pair indices, pairs in the global step) for each
    optimizer step, across epochs.

    The pairs of a step are a global batch of per_device_batch_size x world_size x
    gradient_accumulation_steps similar-length pairs, split evenly over the ranks and then into
    micro-batches: the order depends on the global batch only, so one process with
    accumulation sees the same steps as several without. Each epoch reshuffles with its own
    seed; the step count is global, so the learning-rate schedule runs once over the whole run
    instead of restarting every epoch. A last global batch with fewer pairs than ranks is left
    out of its epoch (every rank needs a pair).
    """
    global_batch = cfg.per_device_batch_size * world_size * cfg.gradient_accumulation_steps
    step = 0
    for epoch in range(cfg.epochs):
        for step_pairs in length_grouped_batches(pairs, global_batch, seed=cfg.seed + epoch):
            if len(step_pairs) < world_size:
                continue
            if step == cfg.max_steps:
                return
            step += 1
            share = even_split(step_pairs, world_size)[rank]
            micro_batches = math.ceil(len(share) / cfg.per_device_batch_size)
            yield even_split(share, micro_batches), len(step_pairs)


def even_split(items: list[int], parts: int) -> list[list[int]]:
    """`parts` consecutive slices whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def count_optimizer_steps(num_pairs: int, cfg: TrainConfig, world_size: int = 1) -> int:
    global_batch = cfg.per_device_batch_size * world_size * cfg.gradient_accumulation_steps
    per_epoch = num_pairs // global_batch + (num_pairs % global_batch >= world_size)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def optimizer_name(cfg: TrainConfig, device: torch.device) -> str:
    """The optimizer `train.optimizer` means on this device; an impossible choice is an error."""
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(
            "train.optimizer=paged_adamw_8bit needs CUDA (on the CPU bitsandbytes silently "
            "falls back to non-paged); use adamw_8bit or adamw_torch"
        )
    return name


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    name = optimizer_name(cfg, device)
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, **kwargs)
    return bnb.optim.PagedAdamW8bit(params, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
