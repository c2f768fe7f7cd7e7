"""One measured run, in its own process; `bench_trl.py` starts these and reads their JSON.

    python benchmarks/bench_worker.py lora-precompute RESULT.json CONFIG.yaml [key=value ...]
    python benchmarks/bench_worker.py lora-train      RESULT.json CONFIG.yaml [key=value ...]
    python benchmarks/bench_worker.py trl             RESULT.json SPEC.json
    python benchmarks/bench_worker.py gemm-peak       RESULT.json

lora-dpo runs go through its command line entry point (`lora_dpo.cli.main`), exactly as
`lora-dpo precompute-ref` / `lora-dpo train` would. The TRL run is a plain DPOTrainer script
with the same nf4 base, LoRA, batch, steps and max_length. A thread samples this process's
resident memory every 20 ms, per phase ("setup", "precompute", "train"); the parent also
records the kernel's peak (ru_maxrss) for the whole process.

Both training runs also count, per optimizer step, the token positions their decoder runs
(`DecoderTokens`: all of them, and the ones that are not padding), and the matmul FLOPs of
their first step (torch's FlopCounterMode; only that warm-up step is counted, so the timed
steps run without it): FLOPs per computed token, from which the achieved FLOP/s follow.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size per phase, sampled from /proc/self/statm (Linux)."""

    def __init__(self, period_s: float = 0.02):
        self.period_s = period_s
        self.current = "setup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period_s)

    def sample(self) -> None:
        rss = self._rss()
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss)

    def phase(self, name: str) -> None:
        self.sample()
        self.current = name
        self.sample()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return dict(self.peaks)


class DecoderTokens:
    """Counts what the decoder runs in the training phase, per optimizer step: token positions
    (`computed`) and those that are not padding (`real`). A forward pre-hook on the decoder
    module, so both trainers are measured the same way."""

    def __init__(self, sampler: RssSampler):
        self.sampler = sampler
        self.steps: list[dict[str, int]] = []

    def begin_step(self) -> None:
        self.steps.append({"computed": 0, "real": 0})

    def hook(self, module, args, kwargs) -> None:
        if self.sampler.current != "train" or not self.steps:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        computed = input_ids.numel()
        mask, pair_masks = kwargs.get("attention_mask"), kwargs.get("pair_masks")
        if pair_masks is not None:  # lora-dpo's packed rows: the pairs' spans are the real tokens
            real = sum(end - start for _, start, end in pair_masks.spans)
        elif mask is not None and getattr(mask, "ndim", 0) == 2:
            real = int(mask.sum())
        else:  # no padding mask: packed rows with position ids, nothing padded
            real = computed
        self.steps[-1]["computed"] += computed
        self.steps[-1]["real"] += real

    def attach(self, decoder) -> None:
        decoder.register_forward_pre_hook(self.hook, with_kwargs=True)


def counted_first_step(run_step, tokens: DecoderTokens, flops: dict):
    """Runs an optimizer step, the first under FlopCounterMode (matmul FLOPs, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens.begin_step()
    if flops:
        return run_step()
    with FlopCounterMode(display=False) as counter:
        out = run_step()
    flops["first_step_flops"] = counter.get_total_flops()
    flops["first_step_computed_tokens"] = tokens.steps[-1]["computed"]
    return out


def gemm_peak() -> dict:
    """This machine's fp32 GEMM rate, best of several timed 2048 x 2048 matmuls (FLOP/s)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - started))
    return {"exit_code": 0, "fp32_gemm_flops": best, "threads": torch.get_num_threads()}


def lora_precompute(config_path: str, overrides: list[str]) -> dict:
    import lora_dpo
    from lora_dpo import cli
    from lora_dpo.cache import Manifest
    from lora_dpo.config import load_config

    sampler = RssSampler()
    sampler.phase("precompute")
    code = cli.main(["precompute-ref", "--config", config_path, *overrides])
    peaks = sampler.stop()
    config = load_config(config_path, overrides)
    manifest = Manifest.read(Path(config.precompute.cache_dir))
    pairs = sum(manifest.pairs.values())
    seconds = sum(change.seconds for change in manifest.history)  # a fresh cache: one build
    return {
        "exit_code": code,
        "pairs": pairs,
        "precompute_s": seconds,
        "rss_peaks": peaks,
        "package": lora_dpo.__file__,  # which checkout ran
    }


def lora_train(config_path: str, overrides: list[str]) -> dict:
    import lora_dpo
    import lora_dpo.train as train_module
    from lora_dpo import cli
    from lora_dpo.config import load_config
    from lora_dpo.logps import causal_lm_parts

    sampler = RssSampler()
    tokens, flops = DecoderTokens(sampler), {}
    build = train_module.build_policy
    step = train_module.TrainLoop.step

    def build_and_mark(*args, **kwargs):  # data and the 4-bit base are loaded: training starts
        sampler.phase("train")
        policy = build(*args, **kwargs)
        tokens.attach(causal_lm_parts(policy)[0])
        return policy

    def counted_step(self, *args, **kwargs):
        return counted_first_step(lambda: step(self, *args, **kwargs), tokens, flops)

    train_module.build_policy = build_and_mark
    train_module.TrainLoop.step = counted_step
    code = cli.main(["train", "--config", config_path, *overrides])
    peaks = sampler.stop()
    config = load_config(config_path, overrides)
    records = [
        json.loads(line)
        for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss" in r]
    return {
        "exit_code": code,
        "step_times": [r["step_time_s"] for r in steps],
        "losses": [r["loss"] for r in steps],
        "rss_peaks": peaks,
        "decoder_tokens": tokens.steps,
        **flops,
        "package": lora_dpo.__file__,
    }


def trl_run(spec_path: str) -> dict:
    spec = json.loads(Path(spec_path).read_text())
    sampler = RssSampler()
    import bitsandbytes as bnb
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"],
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    # The bitsandbytes CPU repack trap: a Linear4bit's first eval-mode no-grad forward (TRL's
    # precompute) repacks its weight for good, after which backward drops the gradient through
    # the base. Off, as lora-dpo does, so both sides train correctly.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    dataset = load_dataset("json", data_files=spec["data"], split="train")

    timings: dict[str, float] = {}
    step_times: list[float] = []
    losses: list[float] = []
    tokens, flops = DecoderTokens(sampler), {}
    tokens.attach(model.get_decoder())

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            sampler.phase("precompute")
            started = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings[f"precompute_{name}_s"] = time.perf_counter() - started
            sampler.phase("setup")
            return out

        def training_step(self, *args, **kwargs):  # one micro-batch; accumulation is 1
            return counted_first_step(
                lambda: super(TimedDPOTrainer, self).training_step(*args, **kwargs), tokens, flops
            )

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sampler.phase("train")

        # A step is timed from one step's end to the next, so it includes the logging that
        # follows each step, as lora-dpo's step_time_s (time between metrics flushes) does.
        last_end: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last_end is None:
                self.last_end = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_times.append(now - self.last_end)
            self.last_end = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = DPOConfig(
        output_dir=spec["output_dir"],
        beta=spec["beta"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_ratio"],  # transformers 5: a float < 1 is a ratio of the steps
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=spec["max_length"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=spec["precompute_batch_size"],
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,  # fp32 compute on the CPU, as lora-dpo's model.dtype=auto picks there
        fp16=False,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=spec["seed"],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = TimedDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    trainer.train()
    trainer.save_model(spec["output_dir"])  # the adapter, as `lora-dpo train` saves it
    peaks = sampler.stop()
    return {
        "exit_code": 0,
        "step_times": step_times,
        "losses": losses,
        "rss_peaks": peaks,
        **timings,
        "decoder_tokens": tokens.steps,
        **flops,
    }


def main(argv: list[str]) -> int:
    mode, result_path, *rest = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if mode == "lora-precompute":
        result = lora_precompute(rest[0], rest[1:])
    elif mode == "lora-train":
        result = lora_train(rest[0], rest[1:])
    elif mode == "trl":
        result = trl_run(rest[0])
    elif mode == "gemm-peak":
        result = gemm_peak()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Path(result_path).write_text(json.dumps(result, indent=2))
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
