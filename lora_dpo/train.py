"""The training loop: a 4-bit LoRA policy against cached reference log-probs. No reference model."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lora_dpo.batching import collate, length_grouped_batches, pad_id_of
from lora_dpo.cache import ReferenceCache
from lora_dpo.config import Config, TrainConfig, dump_config
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.errors import ConfigError
from lora_dpo.evaluate import EvalMetrics, evaluate
from lora_dpo.identity import open_checked_cache, policy_precision
from lora_dpo.logps import sequence_logps
from lora_dpo.loss import dpo_loss
from lora_dpo.metrics import MetricsFile, WindowMeter, console_line
from lora_dpo.model import attach_lora, default_device, load_base_model, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    history: list[dict[str, float]]  # the logging-step records written to metrics.jsonl
    policy: torch.nn.Module  # the trained peft model, for callers that go on using it
    eval_before: EvalMetrics | None
    eval_after: EvalMetrics | None


def train(config: Config) -> TrainResult:
    """Setup, train, save. Writes config.yaml, metrics.jsonl and adapter/ under output_dir."""
    cfg = config.train
    output_dir = Path(cfg.output_dir)
    if (output_dir / "adapter").exists() and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"train.output_dir={str(output_dir)!r} already holds a trained run; choose another "
            "directory or set train.overwrite_output_dir=true"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(config))
    seed_everything(cfg.seed)
    device = default_device()
    precision = policy_precision(config, device)

    # Data and reference values first: a cache problem should cost seconds, not a model load.
    tokenizer = load_tokenizer(config.model)
    pairs, report = load_preference_data(config.data, tokenizer, "train")
    eval_pairs = load_preference_data(config.data, tokenizer, "eval")[0] if config.data.eval_path else []
    (output_dir / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log.info("train data: %s", report.summary())
    cache = open_checked_cache(config, tokenizer, precision)
    cache.check_covers([p.pair_hash for p in pairs], [p.source_index for p in pairs], "train")
    cache.check_covers([p.pair_hash for p in eval_pairs], [p.source_index for p in eval_pairs], "eval")

    base = load_base_model(
        config.model, quantize=precision.quantization == "nf4", dtype=precision.dtype, device=device
    )
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    policy = attach_lora(base, config.lora, gradient_checkpointing=cfg.gradient_checkpointing)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg, device)
    total_steps = count_optimizer_steps(len(pairs), cfg)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps
    )
    pad_id = pad_id_of(tokenizer)

    def run_eval() -> EvalMetrics | None:
        if not eval_pairs:
            return None
        return evaluate(policy, eval_pairs, cache, cfg.beta, pad_id, cfg.per_device_batch_size, device)

    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    eval_before = run_eval()
    if eval_before:
        metrics_file.write({"step": 0, **eval_before.to_dict()})
    history = train_loop(policy, optimizer, scheduler, pairs, cache, cfg, total_steps, pad_id, device, metrics_file)
    eval_after = run_eval()
    if eval_after:
        metrics_file.write({"step": total_steps, **eval_after.to_dict()})

    adapter_dir = output_dir / "adapter"
    policy.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    log.info("adapter saved to %s", adapter_dir)
    return TrainResult(output_dir, adapter_dir, history, policy, eval_before, eval_after)


def train_loop(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    pairs: Sequence[TokenizedPair],
    cache: ReferenceCache,
    cfg: TrainConfig,
    total_steps: int,
    pad_id: int,
    device: torch.device,
    metrics_file: MetricsFile,
) -> list[dict[str, float]]:
    policy.train()
    meter = WindowMeter(device)
    history = []
    progress = tqdm(total=total_steps, desc="train", unit="step")
    for step, micro_batches in enumerate(optimizer_steps(pairs, cfg), start=1):
        pairs_in_step = sum(len(indices) for indices in micro_batches)
        for indices in micro_batches:
            batch = collate([pairs[i] for i in indices], pad_id)
            tokens = int(batch.attention_mask.sum())  # counted on the CPU: no device sync
            batch = batch.to(device)
            ref_chosen, ref_rejected = (t.to(device) for t in cache.lookup(batch.pair_hashes))
            policy_logps = sequence_logps(policy, batch)  # chosen and rejected in one forward
            out = dpo_loss(policy_logps.chosen, policy_logps.rejected, ref_chosen, ref_rejected, cfg.beta)
            # Sum over pairs / pairs in the step: accumulation gives the mean of one big batch.
            (out.losses.sum() / pairs_in_step).backward()
            meter.add_pairs(out, policy_logps, tokens)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add_step(grad_norm)
        progress.update(1)
        if step % cfg.logging_steps == 0 or step == total_steps:
            record = {"step": step, "lr": lr, **meter.flush()}  # the only sync of the window
            metrics_file.write(record)
            history.append(record)
            progress.write(console_line(step, total_steps, record))
    progress.close()
    return history


def optimizer_steps(pairs: Sequence[TokenizedPair], cfg: TrainConfig) -> Iterator[list[list[int]]]:
    """Micro-batches (lists of pair indices) grouped per optimizer step, across epochs.

    Each epoch reshuffles with its own seed; the step count is global, so the learning-rate
    schedule runs once over the whole run instead of restarting every epoch.
    """
    step = 0
    for epoch in range(cfg.epochs):
        batches = length_grouped_batches(pairs, cfg.per_device_batch_size, seed=cfg.seed + epoch)
        for start in range(0, len(batches), cfg.gradient_accumulation_steps):
            if step == cfg.max_steps:
                return
            step += 1
            yield batches[start : start + cfg.gradient_accumulation_steps]


def count_optimizer_steps(num_pairs: int, cfg: TrainConfig) -> int:
    batches = math.ceil(num_pairs / cfg.per_device_batch_size)
    per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(
            "train.optimizer=paged_adamw_8bit needs CUDA (on the CPU bitsandbytes silently "
            "falls back to non-paged); use adamw_8bit or adamw_torch"
        )
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
