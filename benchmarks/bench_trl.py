"""Side by side: lora-dpo against TRL's DPOTrainer (precompute_ref_log_probs=True), same machine.

    pip install -e ".[bench]"          # TRL: a benchmark extra, never a runtime dependency
    python benchmarks/bench_trl.py     # about 30 min on 2 CPU cores; --quick checks it works

Fixtures, built here in code (no downloads): a byte-level BPE tokenizer trained on the data,
and two random tiny Llamas (hidden 256, 4 layers) that differ only in the vocabulary size of
their embeddings and LM head: Llama 3's 128,256 and the tokenizer's own (about 1,160: every
word of the data is one token). The data uses only the tokenizer's ids; what a large
vocabulary costs is the LM head, and that is what the 128k model has. Data: synthetic chat-like pairs (prompts 24-184 words, responses 24-216,
one word one token), all within max_length 512 so neither trainer truncates, and for prefix
sharing long-prompt pairs (prompts 288-400 words, responses 16-64).

Every run is a fresh subprocess (`bench_worker.py`), one at a time, each started once other
processes use fewer than --max-busy cores; how many they used during each run is reported. Both trainers get the same nf4 base (double
quantization, fp32 compute on the CPU), LoRA r 16 / alpha 32 / dropout 0.05 on all linear
layers, 4 pairs per step, max_length 512, one epoch of 4 x steps pairs, gradient
checkpointing, torch AdamW, logging every step; reference precompute in batches of 8 pairs.
Per fixture: lora-dpo precompute-ref once, then `lora-dpo train` and a TRL run for each β.

Reported: mean step time (first step of each run left out as warm-up) and tokens/s (tokens of
the 2B chosen and rejected sequences per step / mean step time); peak RSS, of the whole
process (kernel ru_maxrss) and of the training phase (sampled every 20 ms); reference
precompute throughput (pairs/s, scoring only, model load excluded); the β sweep's wall time
(lora-dpo: precompute + one `train` process per β; TRL: one full run per β, processes
started and ended, as a user runs them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LLAMA3_VOCAB = 128_256
TOKENIZER_VOCAB = 2048  # a cap: training stops once every word is one token (~1,160)
HIDDEN, LAYERS = 256, 4
MAX_LENGTH = 512
PAIRS_PER_STEP = 4
PRECOMPUTE_BATCH = 8
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE, WARMUP_RATIO, SEED = 5e-5, 0.1, 42
CHAT = {"prompt": (24, 184), "response": (24, 216)}
LONG_PROMPT = {"prompt": (288, 400), "response": (16, 64)}
# The decoder-dominated fixture: a model with a real model's proportions (the LM head is 13.6%
# of the parameters: Llama-style, grouped-query attention) and pairs with the length spread of
# real preference data (log-normal, so a heavy tail of long prompts and responses).
DECODER = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "intermediate": 1408, "vocab": 8192}
DECODER_QUICK = {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 352, "vocab": 8192}
REAL_SPREAD = {"prompt": (20, 600, 130, 0.9), "response": (20, 500, 120, 0.8)}  # (low, high, median, sigma)
REAL_SPREAD_QUICK = {"prompt": (20, 120, 40, 0.9), "response": (20, 100, 35, 0.8)}
DECODER_MAX_LENGTH, DECODER_PAIRS_PER_STEP = 1024, 8


def pseudo_words(count: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def make_rows(count: int, shape: dict, words: list[str], rng: random.Random) -> list[dict[str, str]]:
    def text(bounds) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*bounds)))

    return [
        {
            "prompt": text(shape["prompt"]) + "\n",
            "chosen": text(shape["response"]),
            "rejected": text(shape["response"]),
        }
        for _ in range(count)
    ]


def make_spread_rows(
    count: int, spread: dict, words: list[str], rng: random.Random, max_length: int
) -> list[dict]:
    """Pairs whose word counts are log-normal, clipped to [low, high], with prompt + the longer
    response within max_length - 24 (so neither trainer truncates, whatever it appends)."""

    def length(low: int, high: int, median: float, sigma: float) -> int:
        return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))

    rows = []
    while len(rows) < count:
        prompt, chosen, rejected = (
            length(*spread["prompt"]),
            length(*spread["response"]),
            length(*spread["response"]),
        )
        if prompt + max(chosen, rejected) > max_length - 24:
            continue
        text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
        rows.append({"prompt": text(prompt) + "\n", "chosen": text(chosen), "rejected": text(rejected)})
    return rows


@dataclass
class Fixture:
    name: str  # "vocab-128256"
    model_dir: Path
    vocab: int
    max_length: int = MAX_LENGTH
    pairs_per_step: int = PAIRS_PER_STEP
    max_tokens_per_batch: int = 0  # lora-dpo's micro-batches by tokens (0: pairs_per_step pairs)


def build_decoder_fixture(workdir: Path, pairs: int, quick: bool) -> tuple[Fixture, Path]:
    """The real-proportions model and its real-spread data (rebuilt only if missing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dpo.demo.models import tiny_config

    shape = DECODER_QUICK if quick else DECODER
    rng = random.Random(SEED + 1)
    words = pseudo_words(400, random.Random(SEED))  # the words the shared tokenizer knows
    path = workdir / "data" / "real_spread.jsonl"
    rows = make_spread_rows(
        pairs, REAL_SPREAD_QUICK if quick else REAL_SPREAD, words, rng, DECODER_MAX_LENGTH
    )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    name = "decoder-quick" if quick else "decoder"
    model_dir = workdir / "models" / name
    if not (model_dir / "config.json").is_file():
        config = tiny_config(
            "llama",
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            num_layers=shape["layers"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config.num_attention_heads, config.num_key_value_heads = shape["heads"], shape["kv_heads"]
        config.head_dim = shape["hidden"] // shape["heads"]
        config.intermediate_size = shape["intermediate"]
        config.max_position_embeddings = DECODER_MAX_LENGTH
        torch.manual_seed(SEED)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
    # lora-dpo's defaults: no token budget (train.max_tokens_per_batch=0), so with layout auto a
    # step's 8 pairs are one packed row, one forward (each forward dequantizes every 4-bit weight)
    fixture = Fixture(name, model_dir, shape["vocab"], DECODER_MAX_LENGTH, DECODER_PAIRS_PER_STEP)
    return fixture, path


def build_fixtures(workdir: Path, pairs: int) -> tuple[list[Fixture], dict[str, Path]]:
    """Data files, the tokenizer and both models (rebuilt only if missing)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dpo.demo.models import tiny_config
    from lora_dpo.demo.tokenizer import train_bpe_tokenizer

    rng = random.Random(SEED)
    words = pseudo_words(400, rng)
    datasets = {
        "chat": make_rows(pairs, CHAT, words, rng),
        "long_prompt": make_rows(pairs, LONG_PROMPT, words, rng),
    }
    data_files = {}
    for name, rows in datasets.items():
        path = workdir / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        data_files[name] = path
    texts = [" ".join(words)] * 4 + [row[k] for rows in datasets.values() for row in rows for k in row]
    tokenizer = train_bpe_tokenizer(texts, workdir / "tokenizer", vocab_size=TOKENIZER_VOCAB)
    fixtures = []
    for vocab in (LLAMA3_VOCAB, len(tokenizer)):
        model_dir = workdir / "models" / f"vocab-{vocab}"
        if not (model_dir / "config.json").is_file():
            config = tiny_config(
                "llama",
                vocab_size=vocab,
                hidden_size=HIDDEN,
                num_layers=LAYERS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(SEED)
            AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
            tokenizer.save_pretrained(str(model_dir))
        fixtures.append(Fixture(f"vocab-{vocab}", model_dir, vocab))
    return fixtures, data_files


def sequence_tokens(model_dir: Path, data_file: Path, max_length: int = MAX_LENGTH) -> tuple[int, int, int]:
    """(pairs, real tokens of their 2B chosen + rejected sequences, tokens they need: the
    prompt once + both responses), as lora-dpo tokenizes them."""
    from transformers import AutoTokenizer

    from lora_dpo.config import DataConfig
    from lora_dpo.data import load_preference_data

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = DataConfig(train_path=str(data_file), max_length=max_length, max_prompt_length=max_length - 64)
    pairs, report = load_preference_data(cfg, tokenizer, "train")
    assert report.truncated == 0 and report.kept == report.total, "benchmark pairs must fit max_length"
    needed = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return (
        len(pairs),
        sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        needed,
    )


def busy_cpu_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, handle.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cores(seconds: float = 5.0) -> float:
    """Cores kept busy by other processes over the next `seconds` (this one sleeps)."""
    before = busy_cpu_seconds()
    time.sleep(seconds)
    return (busy_cpu_seconds() - before) / seconds


def wait_for_quiet(max_cores: float, max_wait_s: float) -> float:
    """Wait until other work (tests of other people, say) uses less than max_cores."""
    deadline = time.time() + max_wait_s
    busy = others_cores()
    while busy > max_cores and time.time() < deadline:
        time.sleep(10)
        busy = others_cores()
    return busy


class Runner:
    def __init__(self, workdir: Path, max_busy: float, max_wait_s: float):
        self.workdir, self.max_busy, self.max_wait_s = workdir, max_busy, max_wait_s
        self.count = 0
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # TRL keeps its precomputed reference values in the datasets cache, as for any user.
            "HF_DATASETS_CACHE": str(workdir / "hf-datasets-cache"),
        }

    def run(self, mode: str, *args: str) -> dict:
        """One worker process: its JSON result plus wall time, kernel peak RSS, and how many
        cores other processes kept busy before and during it."""
        self.count += 1
        stem = self.workdir / "runs" / f"{self.count:02d}-{mode}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        busy_before = wait_for_quiet(self.max_busy, self.max_wait_s)
        command = [sys.executable, str(HERE / "bench_worker.py"), mode, f"{stem}.json", *args]
        print(
            f"  [{time.strftime('%H:%M:%S')}] {mode} {' '.join(args[1:])} (others: {busy_before:.2f} cores)",
            flush=True,
        )
        started, busy_start = time.perf_counter(), busy_cpu_seconds()
        with open(f"{stem}.log", "w") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=HERE.parent
            )
            _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        others = (busy_cpu_seconds() - busy_start - usage.ru_utime - usage.ru_stime) / wall
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{mode} failed with exit code {code}; see {stem}.log")
        result = json.loads(Path(f"{stem}.json").read_text())
        # ru_maxrss is in KiB on Linux
        return {
            **result,
            "wall_s": wall,
            "max_rss_bytes": usage.ru_maxrss * 1024,
            "others_cores_before": busy_before,
            "others_cores_during": max(others, 0.0),
        }


def lora_config(workdir: Path, fixture: Fixture, data_file: Path, cache_name: str) -> Path:
    config = {
        "model": {"name_or_path": str(fixture.model_dir)},
        "lora": LORA,
        "data": {
            "train_path": str(data_file),
            "max_length": fixture.max_length,
            "max_prompt_length": fixture.max_length - 64,
        },
        "precompute": {"cache_dir": str(workdir / "caches" / cache_name), "batch_size": PRECOMPUTE_BATCH},
        "train": {
            "output_dir": str(workdir / "lora-runs" / cache_name),
            "overwrite_output_dir": True,
            "learning_rate": LEARNING_RATE,
            "warmup_ratio": WARMUP_RATIO,
            "per_device_batch_size": fixture.pairs_per_step,
            "gradient_accumulation_steps": 1,
            "max_tokens_per_batch": fixture.max_tokens_per_batch,
            "epochs": 1,
            "logging_steps": 1,
            "seed": SEED,
        },
    }
    path = workdir / "configs" / f"{cache_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trl_spec(workdir: Path, fixture: Fixture, data_file: Path, beta: float) -> Path:
    spec = {
        "model": str(fixture.model_dir),
        "data": str(data_file),
        "output_dir": str(workdir / "trl-runs" / f"{fixture.name}-beta-{beta:g}"),
        "beta": beta,
        "learning_rate": LEARNING_RATE,
        "warmup_ratio": WARMUP_RATIO,
        "batch_size": fixture.pairs_per_step,
        "precompute_batch_size": PRECOMPUTE_BATCH,
        "max_length": fixture.max_length,
        "lora_r": LORA["r"],
        "lora_alpha": LORA["alpha"],
        "lora_dropout": LORA["dropout"],
        "seed": SEED,
    }
    path = workdir / "configs" / f"trl-{fixture.name}-beta-{beta:g}.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def steady_steps(runs: list[dict]) -> list[float]:
    """Step times of all runs, the first (warm-up) step of each left out."""
    return [t for run in runs for t in run["step_times"][1:]]


def bench_trainers(
    runner: Runner, workdir: Path, fixture: Fixture, data_file: Path, betas: list[float]
) -> dict:
    """lora-dpo (one cache, one train process per β) against TRL (one full run per β)."""
    config = lora_config(workdir, fixture, data_file, f"{fixture.name}-chat")
    precompute = runner.run("lora-precompute", str(config))
    lora_runs, trl_runs = [], []
    for beta in betas:  # interleaved, so drifting machine load hits both sides alike
        trl_runs.append(runner.run("trl", str(trl_spec(workdir, fixture, data_file, beta))))
        lora_runs.append(
            runner.run(
                "lora-train",
                str(config),
                f"train.beta={beta}",
                f"train.output_dir={workdir / 'lora-runs' / f'{fixture.name}-beta-{beta:g}'}",
            )
        )
    pairs, tokens, _ = sequence_tokens(fixture.model_dir, data_file)
    return {
        "pairs": pairs,
        "tokens_per_step": tokens / (pairs / PAIRS_PER_STEP),
        "lora_precompute": precompute,
        "lora_runs": lora_runs,
        "trl_runs": trl_runs,
    }


def bench_prefix_sharing(runner: Runner, workdir: Path, fixture: Fixture, data_file: Path) -> dict:
    """lora-dpo on long-prompt pairs, unshared against prefix sharing (one cache for both)."""
    config = lora_config(workdir, fixture, data_file, f"{fixture.name}-long")
    runner.run("lora-precompute", str(config))
    runs = {}
    for shared in (False, True):
        out = workdir / "lora-runs" / f"{fixture.name}-long-{'shared' if shared else 'unshared'}"
        runs[shared] = runner.run(
            "lora-train",
            str(config),
            f"train.layout={'prompt_shared' if shared else 'padded'}",
            f"train.output_dir={out}",
        )
    return {"unshared": runs[False], "shared": runs[True]}


def bench_decoder(
    runner: Runner, workdir: Path, fixture: Fixture, data_file: Path, betas: list[float]
) -> dict:
    """The decoder-dominated fixture: a β sweep of lora-dpo as it runs by default (layout auto,
    no token budget: one packed row per step; one cache, one train process per β) against TRL
    (one full run per β), and lora-dpo padded (per_device_batch_size pairs) at the first β."""
    config = lora_config(workdir, fixture, data_file, f"{fixture.name}-spread")
    precompute = runner.run("lora-precompute", str(config))
    out = workdir / "lora-runs" / fixture.name
    trl_runs, lora_runs = [], []
    for beta in betas:  # interleaved, so drifting machine load hits both sides alike
        trl_runs.append(runner.run("trl", str(trl_spec(workdir, fixture, data_file, beta))))
        lora_runs.append(
            runner.run(
                "lora-train", str(config), f"train.beta={beta}", f"train.output_dir={out}-beta-{beta:g}"
            )
        )
    padded = runner.run(
        "lora-train",
        str(config),
        f"train.beta={betas[0]}",
        "train.layout=padded",
        "train.max_tokens_per_batch=0",
        f"train.output_dir={out}-padded",
    )
    pairs, sequence, needed = sequence_tokens(fixture.model_dir, data_file, fixture.max_length)
    steps = pairs / fixture.pairs_per_step
    return {
        "pairs": pairs,
        "sequence_tokens_per_step": sequence / steps,
        "needed_tokens_per_step": needed / steps,
        "lora_precompute": precompute,
        "trl_runs": trl_runs,
        "lora_runs": lora_runs,
        "lora_padded": padded,
        "gemm_peak": runner.run("gemm-peak"),
    }


def token_accounting(runs: list[dict], needed_per_step: float, peak_flops: float) -> dict:
    """Decoder tokens computed per step and their padding share, over all steps of `runs` (the
    needed tokens are a mean over all steps too); the matmul FLOP/s of the timed steps (each
    run's first left out): FLOPs per computed token of the first steps x their tokens / their time."""
    steps = [s for run in runs for s in run["decoder_tokens"]]
    computed = statistics.mean(s["computed"] for s in steps)
    real = statistics.mean(s["real"] for s in steps)
    timed_tokens = statistics.mean(s["computed"] for run in runs for s in run["decoder_tokens"][1:])
    step_time = statistics.mean(steady_steps(runs))
    flops = sum(run["first_step_flops"] for run in runs)
    per_token = flops / max(sum(run["first_step_computed_tokens"] for run in runs), 1)
    achieved = per_token * timed_tokens / step_time
    return {
        "computed": computed,
        "needed": needed_per_step,
        "ratio": computed / needed_per_step,
        "padding": 1 - real / computed,
        "step_time": step_time,
        "flops": achieved,
        "peak_share": achieved / peak_flops,
    }


def summarize_decoder(name: str, r: dict) -> list[str]:
    peak = r["gemm_peak"]["fp32_gemm_flops"]
    betas = len(r["trl_runs"])
    runs = {
        f"lora-dpo (auto; {betas} runs)": r["lora_runs"],
        "lora-dpo (padded; 1 run)": [r["lora_padded"]],
        f"TRL ({betas} runs)": r["trl_runs"],
    }
    rows = {
        label: token_accounting(group, r["needed_tokens_per_step"], peak) for label, group in runs.items()
    }
    trl_step = rows[f"TRL ({betas} runs)"]["step_time"]
    lines = [
        f"### {name}: decoder-dominated, real length spread",
        "",
        f"{r['pairs']} pairs, {r['needed_tokens_per_step']:,.0f} tokens needed per step (prompt once + both "
        f"responses); this machine's fp32 GEMM peak, measured in this run: {peak / 1e9:,.1f} GFLOP/s "
        f"({r['gemm_peak']['threads']} threads).",
        "",
        "| trainer | mean step | / TRL | needed tokens/s | decoder tokens computed per step | computed / needed "
        "| padding share of computed | matmul FLOP/s | share of fp32 peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['step_time']:.2f} s | {row['step_time'] / trl_step:.3f} "
            f"| {r['needed_tokens_per_step'] / row['step_time']:,.0f} | {row['computed']:,.0f} | {row['ratio']:.2f} "
            f"| {row['padding']:.1%} | {row['flops'] / 1e9:,.1f} G | {row['peak_share']:.1%} |"
        )
    others = max(run["others_cores_during"] for group in runs.values() for run in group)
    lines += [
        "",
        "| measure | lora-dpo | TRL | lora-dpo / TRL |",
        "|---|---|---|---|",
        rss_row("peak RSS, whole training process", r, lambda run: run["max_rss_bytes"]),
        *sweep_rows(r),
        "",
        f"Other processes kept up to {others:.2f} of the {os.cpu_count()} cores busy during the runs. "
        f"Run wall times (s) {wall_times(r)}",
        "",
    ]
    return lines


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def rss_row(label: str, r: dict, peak_of) -> str:
    """A table row of the largest `peak_of(run)` over each trainer's runs, and their ratio."""
    lora, trl = (max(peak_of(run) for run in r[runs]) for runs in ("lora_runs", "trl_runs"))
    return f"| {label} | {mib(lora)} | {mib(trl)} | {lora / trl:.3f} |"


def sweep_rows(r: dict) -> list[str]:
    """The rows every fixture's table ends with: reference precompute (TRL's first run
    computes it), the β sweep's wall time (lora-dpo: precompute once + a train per β), and
    the first-step loss."""
    lora_pps = r["lora_precompute"]["pairs"] / r["lora_precompute"]["precompute_s"]
    trl_pps = r["pairs"] / r["trl_runs"][0]["precompute_train_s"]
    lora_sweep = r["lora_precompute"]["wall_s"] + sum(run["wall_s"] for run in r["lora_runs"])
    trl_sweep = sum(run["wall_s"] for run in r["trl_runs"])
    betas = len(r["trl_runs"])
    return [
        f"| reference precompute | {lora_pps:.2f} pairs/s | {trl_pps:.2f} pairs/s | {lora_pps / trl_pps:.2f}x |",
        f"| {betas}-β sweep wall time | {lora_sweep:.0f} s | {trl_sweep:.0f} s | {lora_sweep / trl_sweep:.3f} |",
        f"| first-step loss (ln 2 = 0.6931) | {r['lora_runs'][0]['losses'][0]:.4f} "
        f"| {r['trl_runs'][0]['losses'][0]:.4f} | |",
    ]


def wall_times(r: dict) -> str:
    return (
        "lora-dpo: "
        + ", ".join(f"{run['wall_s']:.0f}" for run in r["lora_runs"])
        + f" (+ precompute {r['lora_precompute']['wall_s']:.0f}); TRL: "
        + ", ".join(f"{run['wall_s']:.0f}" for run in r["trl_runs"])
    )


def summarize(results: dict) -> str:
    lines = []
    for name, r in results["fixtures"].items():
        lora_steps, trl_steps = steady_steps(r["lora_runs"]), steady_steps(r["trl_runs"])
        lora_step, trl_step = statistics.mean(lora_steps), statistics.mean(trl_steps)
        tokens = r["tokens_per_step"]
        lines += [
            f"### {name}",
            "",
            "| measure | lora-dpo | TRL | lora-dpo / TRL |",
            "|---|---|---|---|",
            f"| mean step time ({len(lora_steps)} / {len(trl_steps)} steps) | {lora_step:.2f} s | {trl_step:.2f} s "
            f"| {lora_step / trl_step:.3f} |",
            f"| median step time | {statistics.median(lora_steps):.2f} s | {statistics.median(trl_steps):.2f} s "
            f"| {statistics.median(lora_steps) / statistics.median(trl_steps):.3f} |",
            f"| tokens/s | {tokens / lora_step:,.0f} | {tokens / trl_step:,.0f} | {trl_step / lora_step:.2f}x |",
            rss_row("peak RSS, whole training process", r, lambda run: run["max_rss_bytes"]),
            rss_row("peak RSS, training phase", r, lambda run: run["rss_peaks"].get("train", 0)),
            *sweep_rows(r),
            "",
            f"Other processes kept up to {max(run['others_cores_during'] for run in r['lora_runs']):.2f} "
            f"(lora-dpo runs) and {max(run['others_cores_during'] for run in r['trl_runs']):.2f} (TRL runs) "
            f"of the {os.cpu_count()} cores busy during the runs.",
            "",
            "TRL precompute per run (s): "
            + ", ".join(f"{run.get('precompute_train_s', 0):.1f}" for run in r["trl_runs"])
            + f"; run wall times (s) {wall_times(r)}",
            "",
        ]
    for name, r in results.get("decoder", {}).items():
        lines += summarize_decoder(name, r)
    if results.get("prefix_sharing"):
        lines += [
            "### prefix sharing, long-prompt pairs (lora-dpo)",
            "",
            "| fixture | unshared step | shared step | shared / unshared |",
            "|---|---|---|---|",
        ]
        for name, r in results["prefix_sharing"].items():
            unshared = statistics.mean(steady_steps([r["unshared"]]))
            shared = statistics.mean(steady_steps([r["shared"]]))
            lines.append(f"| {name} | {unshared:.2f} s | {shared:.2f} s | {shared / unshared:.3f} |")
        lines.append("")
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    packages = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {name: md.version(name) for name in packages},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 betas: checks that everything runs")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per training run")
    parser.add_argument("--betas", default="0.05,0.1,0.2,0.5", help="the sweep")
    parser.add_argument("--workdir", default="runs/bench", help="fixtures, caches, runs, results.json")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.25,
        help="start a run only when other processes use fewer cores than this",
    )
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a quiet machine")
    parser.add_argument("--no-prefix-sharing", action="store_true", help="skip the long-prompt runs")
    parser.add_argument(
        "--only",
        choices=("vocab", "decoder"),
        help="only the vocabulary fixtures or only the "
        "decoder-dominated one (with --quick: a scaled-down model and shorter pairs)",
    )
    parser.add_argument("--decoder-steps", type=int, default=8, help="optimizer steps on the decoder fixture")
    args = parser.parse_args(argv)
    steps, betas = (2, [0.1, 0.2]) if args.quick else (args.steps, [float(b) for b in args.betas.split(",")])
    workdir = Path(args.workdir).resolve()
    import shutil

    for stale in ("hf-datasets-cache", "caches", "lora-runs", "trl-runs", "runs"):  # a fresh start each time
        shutil.rmtree(workdir / stale, ignore_errors=True)

    fixtures, data_files = build_fixtures(workdir, pairs=steps * PAIRS_PER_STEP)
    runner = Runner(workdir, args.max_busy, args.max_wait)
    results: dict = {
        "environment": environment(),
        "steps": steps,
        "betas": betas,
        "fixtures": {},
        "prefix_sharing": {},
        "decoder": {},
    }
    print(json.dumps(results["environment"], indent=2))
    if args.only != "vocab":
        decoder_steps = 2 if args.quick else args.decoder_steps
        fixture, data_file = build_decoder_fixture(
            workdir, decoder_steps * DECODER_PAIRS_PER_STEP, args.quick
        )
        print(
            f"{fixture.name}: lora-dpo (auto) and TRL, {len(betas)} betas, and lora-dpo padded, "
            f"{decoder_steps} steps each",
            flush=True,
        )
        results["decoder"][fixture.name] = bench_decoder(runner, workdir, fixture, data_file, betas)
    if args.only == "decoder":
        fixtures = []
    for fixture in fixtures:
        print(f"{fixture.name}: lora-dpo and TRL, {len(betas)} betas, {steps} steps each", flush=True)
        results["fixtures"][fixture.name] = bench_trainers(
            runner, workdir, fixture, data_files["chat"], betas
        )
    if not args.no_prefix_sharing and args.only != "decoder":
        for fixture in fixtures:
            print(f"{fixture.name}: prefix sharing on long-prompt pairs", flush=True)
            results["prefix_sharing"][fixture.name] = bench_prefix_sharing(
                runner, workdir, fixture, data_files["long_prompt"]
            )
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(summarize(results))
    print(f"results: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
