"""`lora-dpo demo`: the whole pipeline on an embedded tiny model, on the CPU, with no downloads.

It writes a synthetic preference task that a tiny model can learn (describe a person: kind
words are preferred over unkind ones), keeps held-out pairs with unseen names apart, trains
a byte-level BPE tokenizer and a random tiny Llama locally and teaches it the task's format
with a few seconds of supervised training on both kinds of response (so the reference writes
"X is A and B." with kind and unkind words alike), then runs precompute-ref and 4-bit QLoRA
DPO training. It reports held-out reward accuracy before and after, and what the models now
write: the share of sampled descriptions of the held-out names that use only kind words,
from the reference and from the policy, with examples side by side.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dpo.config import Config, load_config
from lora_dpo.demo.models import build_tiny_llama
from lora_dpo.demo.task import HELD_OUT_NAMES, NAMES, make_pairs, only_kind_words, write_jsonl
from lora_dpo.demo.tokenizer import train_bpe_tokenizer
from lora_dpo.generate import GenerationSettings, HeldOut, held_out_prompts
from lora_dpo.samples import Sample
from lora_dpo.train import TrainResult, train

log = logging.getLogger(__name__)

SAMPLES_PER_NAME = 8  # sampled descriptions per held-out name, from each model
# Temperature below 1 trims the tiny model's tail of malformed text, not the kind/unkind choice.
SAMPLING = GenerationSettings(
    max_new_tokens=24, sample=True, temperature=0.7, top_p=1.0, seed=0, batch_size=40
)
EXAMPLES = 3
SFT_PAIRS = 512


@dataclass
class DemoResult:
    train: TrainResult
    reference_kind_share: float  # share of sampled held-out descriptions with only kind words
    policy_kind_share: float
    samples: list[Sample]  # every sampled description, SAMPLES_PER_NAME per held-out name


def prepare(workdir: Path, seed: int = 0, *, teach_format: bool = False) -> None:
    """Data, tokenizer and a random tiny Llama under `workdir` (deterministic per seed); with
    `teach_format`, the model is then fine-tuned on the training responses (the demo's reference)."""
    rng = random.Random(seed)
    train_rows = make_pairs(NAMES[:-HELD_OUT_NAMES], 256, rng)
    eval_rows = make_pairs(NAMES[-HELD_OUT_NAMES:], 64, rng)
    write_jsonl(workdir / "data" / "train.jsonl", train_rows)
    write_jsonl(workdir / "data" / "eval.jsonl", eval_rows)
    texts = [row[key] for row in train_rows + eval_rows for key in ("prompt", "chosen", "rejected")]
    tokenizer = train_bpe_tokenizer(texts, workdir / "model", vocab_size=384)
    build_tiny_llama(workdir / "model", tokenizer, hidden_size=64, num_layers=2, seed=seed)
    if teach_format:
        from lora_dpo.data import build_pairs
        from lora_dpo.demo.sft import teach_format as fine_tune

        # Every name, as a pretrained model knows every name; kind and unkind words equally
        # often, so it learns the format and no preference. DPO never sees the held-out names.
        sft_rows = make_pairs(list(NAMES), SFT_PAIRS, rng)
        write_jsonl(workdir / "data" / "sft.jsonl", sft_rows)
        pairs, _ = build_pairs(sft_rows, tokenizer, demo_config(workdir).data, source="sft")
        nll = fine_tune(workdir / "model", tokenizer, pairs, seed=seed)
        log.info("demo: taught the tiny Llama the task's format (final NLL %.3f per response token)", nll)


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
            # A tiny model needs a far larger step than a pretrained one.
            "train.learning_rate=0.002",
            "train.beta=0.1",
            "train.per_device_batch_size=8",
            "train.gradient_accumulation_steps=1",
            # Longer pushes the taught reference's chosen responses down too (the classic DPO
            # failure): margins keep rising while the samples fall apart into noise.
            "train.max_steps=24",
            "train.logging_steps=8",
            # what the policy writes, beside the reference: samples.jsonl and report.md
            "train.generate_every=8",
            "train.generate_max_new_tokens=24",
        ],
    )


def sample_descriptions(result: TrainResult, config: Config) -> DemoResult:
    """SAMPLES_PER_NAME sampled descriptions of each held-out name from the trained policy and
    from its reference, and the share of each that uses only kind words."""
    from lora_dpo.batching import pad_id_of
    from lora_dpo.data import load_preference_data
    from lora_dpo.generate import stop_token_ids
    from lora_dpo.model import default_device, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    pairs, _ = load_preference_data(config.data, tokenizer, "eval")
    names = held_out_prompts(pairs, HELD_OUT_NAMES)
    prompts = [prompt for prompt in names for _ in range(SAMPLES_PER_NAME)]
    stops = stop_token_ids(tokenizer, conversational=False)
    held_out = HeldOut(tokenizer, prompts, SAMPLING, stops, pad_id_of(tokenizer), default_device())
    samples = held_out.samples(result.policy, int(result.history[-1]["step"]))

    def share(texts: list[str]) -> float:
        return sum(map(only_kind_words, texts)) / len(texts)

    return DemoResult(
        result, share([s.reference for s in samples]), share([s.policy for s in samples]), samples
    )


def run_demo(workdir: str | Path = "runs/demo") -> DemoResult:
    from lora_dpo.cache import build_cache

    workdir = Path(workdir)
    # A hidden-64 model gains nothing from intra-op threads, and on a busy machine their
    # spin-waiting makes each step many times slower.
    torch.set_num_threads(1)
    log.info("demo: building a tiny Llama, a tokenizer and a preference task in %s", workdir)
    prepare(workdir, teach_format=True)
    config = demo_config(workdir)
    build_cache(config)
    result = train(config)
    before, after = result.eval_before, result.eval_after
    assert before is not None and after is not None
    demo = sample_descriptions(result, config)
    examples = [demo.samples[i * SAMPLES_PER_NAME] for i in range(EXAMPLES)]  # one per name
    print(
        "\nheld-out pairs (unseen names): "
        f"{after.pairs}\n"
        f"  reward accuracy      {before.reward_accuracy:.2f} -> {after.reward_accuracy:.2f}\n"
        f"  reward margin        {before.reward_margin:+.3f} -> {after.reward_margin:+.3f}\n"
        f"  preference accuracy  {before.preference_accuracy:.2f} -> {after.preference_accuracy:.2f}"
        "  (length-normalised likelihood, no reference)\n"
        f"sampled descriptions of the held-out names ({SAMPLES_PER_NAME} per name, temperature "
        f"{SAMPLING.temperature:g}):\n"
        f"  only kind words      {demo.reference_kind_share:.2f} (reference) -> "
        f"{demo.policy_kind_share:.2f} (policy)\n"
        + "".join(
            f"  {s.prompt.strip()!r}\n    reference: {s.reference!r}\n    policy:    {s.policy!r}\n"
            for s in examples
        )
        + "artifacts:\n"
        f"  data             {workdir / 'data'}\n"
        f"  model            {workdir / 'model'}\n"
        f"  reference cache  {config.precompute.cache_dir}\n"
        f"  metrics          {result.output_dir / 'metrics.jsonl'}\n"
        f"  samples          {result.output_dir / 'samples.md'}\n"
        f"  adapter          {result.adapter_dir}\n"
        f"  config           {result.output_dir / 'config.yaml'}"
    )
    return demo
