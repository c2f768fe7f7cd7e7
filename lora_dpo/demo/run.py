"""`lora-dpo demo`: the whole pipeline on an embedded tiny model, on the CPU, with no downloads.

It writes a synthetic preference task that a tiny model can learn (describe a person: kind
words are preferred over unkind ones), keeps held-out pairs with unseen names apart, trains
a byte-level BPE tokenizer and a random tiny Llama locally, then runs precompute-ref and
4-bit QLoRA DPO training, and reports held-out reward accuracy before and after.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from lora_dpo.config import Config, load_config
from lora_dpo.demo.models import build_tiny_llama
from lora_dpo.demo.task import HELD_OUT_NAMES, NAMES, make_pairs, write_jsonl
from lora_dpo.demo.tokenizer import train_bpe_tokenizer
from lora_dpo.train import TrainResult, train

log = logging.getLogger(__name__)


def prepare(workdir: Path, seed: int = 0) -> None:
    """Data, tokenizer and a random tiny Llama under `workdir` (deterministic per seed)."""
    rng = random.Random(seed)
    train_rows = make_pairs(NAMES[:-HELD_OUT_NAMES], 256, rng)
    eval_rows = make_pairs(NAMES[-HELD_OUT_NAMES:], 64, rng)
    write_jsonl(workdir / "data" / "train.jsonl", train_rows)
    write_jsonl(workdir / "data" / "eval.jsonl", eval_rows)
    texts = [row[key] for row in train_rows + eval_rows for key in ("prompt", "chosen", "rejected")]
    tokenizer = train_bpe_tokenizer(texts, workdir / "model", vocab_size=384)
    build_tiny_llama(workdir / "model", tokenizer, hidden_size=64, num_layers=2, seed=seed)


def demo_config(workdir: str | Path) -> Config:
    """The demo's settings; `configs/demo.yaml` holds the same (a test keeps them equal)."""
    workdir = Path(workdir)
    return load_config(
        None,
        [
            f"model.name_or_path={workdir / 'model'}",
            f"data.train_path={workdir / 'data' / 'train.jsonl'}",
            f"data.eval_path={workdir / 'data' / 'eval.jsonl'}",
            "data.max_length=64",
            "data.max_prompt_length=32",
            f"precompute.cache_dir={workdir / 'ref-cache'}",
            "precompute.batch_size=32",
            "lora.r=8",
            "lora.alpha=16",
            "lora.dropout=0.0",
            f"train.output_dir={workdir / 'train'}",
            "train.overwrite_output_dir=true",  # the demo rebuilds everything each time
            # A random tiny model needs a far larger step than a pretrained one.
            "train.learning_rate=0.002",
            "train.beta=0.1",
            "train.per_device_batch_size=8",
            "train.gradient_accumulation_steps=1",
            "train.epochs=2",
            "train.logging_steps=8",
        ],
    )


def run_demo(workdir: str | Path = "runs/demo") -> TrainResult:
    from lora_dpo.cache import build_cache

    workdir = Path(workdir)
    # A hidden-64 model gains nothing from intra-op threads, and on a busy machine their
    # spin-waiting makes each step many times slower.
    torch.set_num_threads(1)
    log.info("demo: building a tiny Llama, a tokenizer and a preference task in %s", workdir)
    prepare(workdir)
    config = demo_config(workdir)
    build_cache(config)
    result = train(config)
    before, after = result.eval_before, result.eval_after
    assert before is not None and after is not None
    print(
        "\nheld-out pairs (unseen names): "
        f"{after.pairs}\n"
        f"  reward accuracy      {before.reward_accuracy:.2f} -> {after.reward_accuracy:.2f}\n"
        f"  reward margin        {before.reward_margin:+.3f} -> {after.reward_margin:+.3f}\n"
        f"  preference accuracy  {before.preference_accuracy:.2f} -> {after.preference_accuracy:.2f}"
        "  (length-normalised likelihood, no reference)\n"
        "artifacts:\n"
        f"  data             {workdir / 'data'}\n"
        f"  model            {workdir / 'model'}\n"
        f"  reference cache  {config.precompute.cache_dir}\n"
        f"  metrics          {result.output_dir / 'metrics.jsonl'}\n"
        f"  adapter          {result.adapter_dir}\n"
        f"  config           {result.output_dir / 'config.yaml'}"
    )
    return result
