"""The 24 GB figures, measured: live tensor bytes of real training steps at the recipes' widths.

    python benchmarks/memory_check.py                 # 3 models x 1, 2 layers x 4 lengths (~15 min, 2 cores)
    python benchmarks/memory_check.py --quick         # one model, two short lengths (~2 min)

For Llama-3.1-8B, Qwen2.5-7B and Mistral-7B (their config.json in benchmarks/model_configs/,
with the public values), random models with 1 and with 2 decoder layers are saved and loaded
through the project's nf4 path (`load_base_model(..., quantize=True, dtype=bfloat16)`), get
LoRA r16 on every linear layer with gradient checkpointing (`attach_lora`), and train one pair
per micro-batch with `sequence_logps` and `preference_loss` and bitsandbytes' 8-bit AdamW,
on the CPU. Reference log-probs come from a no-grad `sequence_logps` forward of the same model
(what precompute computes), so the step-0 loss is ln 2.

Measured: persistent bytes (weights, adapters, optimizer state: their storages) and the
high-water mark of live tensor bytes during one training step (`live_bytes.LiveBytes`: every
allocation, kernel temporaries included). Two layers minus one is the per-layer part; one
layer minus that is the fixed part. Each is compared with `lora_dpo.plan.estimate` for the
same truncated config and batch on device="cpu" (the CPU's dropout masks, no CUDA-only terms).
Writes benchmarks/memory.md and benchmarks/results/memory-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from live_bytes import CPU_BLAS_OPS, LiveBytes, persistent_bytes  # noqa: E402

from lora_dpo.batching import collate  # noqa: E402
from lora_dpo.config import Config, load_config  # noqa: E402
from lora_dpo.data import TokenizedPair  # noqa: E402
from lora_dpo.fileio import write_json  # noqa: E402
from lora_dpo.logps import sequence_logps  # noqa: E402
from lora_dpo.loss import preference_loss  # noqa: E402
from lora_dpo.model import attach_lora, load_base_model  # noqa: E402
from lora_dpo.plan import GIB, Architecture, MemoryPlan, Workload, estimate  # noqa: E402
from lora_dpo.versions import package_versions  # noqa: E402

MODELS = ("llama3.1-8b", "qwen2.5-7b", "mistral-7b")
LENGTHS = (512, 1024, 2048, 4096)
# The recipes' settings, as the CPU runs them: bf16 compute, and bitsandbytes' 8-bit AdamW,
# whose state is paged_adamw_8bit's without the paging.
SETTINGS = [
    "model.quantization=nf4", "model.dtype=bf16",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
    "train.per_device_batch_size=1", "train.optimizer=adamw_8bit", "train.gradient_checkpointing=true",
    "train.logits_chunk_size=512",
]
TOLERANCE = 0.15


def recipe_config(model_dir: str | Path, extra: list[str] = ()) -> Config:
    return load_config(None, [f"model.name_or_path={model_dir}", *SETTINGS, *extra])


def build_model(config_json: Path, num_layers: int, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random bf16 model of `config_json`'s widths with `num_layers` layers, saved like a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_json), num_hidden_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(out_dir))
    return out_dir


def make_pair(vocab: int, length: int, response_fraction: float, rng: random.Random, shorter_by: int) -> TokenizedPair:
    """Random ids: chosen fills `length` tokens, rejected is `shorter_by` tokens shorter (a padded
    batch, as real pairs give); the last `response_fraction` of each sequence is the response."""
    prompt = length - max(2, round(length * response_fraction))
    ids = [rng.randrange(vocab) for _ in range(length)]
    return TokenizedPair(tuple(ids[:prompt]), tuple(ids[prompt:]), tuple(ids[prompt : length - shorter_by]), 0)


@dataclass
class Step:
    length: int  # tokens per sequence (the batch is 2 x length, padded)
    response_tokens: int
    persistent: int  # bytes of weights, adapters and optimizer state
    step_peak: int  # high-water mark of bytes allocated during the step
    step_end: int  # of those, still live after it (0: the step leaves nothing behind)
    blas_workspace: int  # high-water mark of the CPU matmuls' own workspace (not in step_peak)
    loss: float
    seconds: float
    at_peak: list[tuple[str, int]]  # largest groups of what was live at the peak

    @property
    def peak(self) -> int:
        return self.persistent + self.step_peak


def measure(
    model_dir: Path, lengths: list[int], response_fraction: float, shorter_by: int = 16, chunk: int = 512
) -> list[Step]:
    """One training step per length on a fresh nf4 + LoRA policy, after a warm-up step at lr 0
    that creates the optimizer state and leaves the weights as they were."""
    import bitsandbytes as bnb

    config = recipe_config(model_dir)
    base = load_base_model(config.model, quantize=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    torch.manual_seed(0)
    policy = attach_lora(base, config.lora, gradient_checkpointing=True)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=0.0)
    vocab = base.config.vocab_size
    rng = random.Random(0)

    def step(batch, ref_chosen, ref_rejected) -> float:
        policy.train()
        logps = sequence_logps(policy, batch, chunk)
        out = preference_loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected, beta=0.1)
        out.losses.sum().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.losses.mean().item()

    warm = collate([make_pair(vocab, 32, 0.5, rng, 4)], pad_id=0)
    step(warm, torch.zeros(1), torch.zeros(1))
    optimizer.param_groups[0]["lr"] = 5e-5
    lora_b = [p for name, p in policy.named_parameters() if "lora_B" in name]
    steps = []
    for length in lengths:
        with torch.no_grad():  # back to the initial adapter: the policy is the reference again
            for weight in lora_b:
                weight.zero_()
        batch = collate([make_pair(vocab, length, response_fraction, rng, shorter_by)], pad_id=0)
        policy.eval()
        with torch.no_grad():  # the reference: what precompute computes for this pair
            reference = sequence_logps(policy, batch)
        persistent = persistent_bytes(policy, optimizer)
        started = time.perf_counter()
        with LiveBytes(exclude_workspace_of=CPU_BLAS_OPS) as live:
            loss = step(batch, reference.chosen, reference.rejected)
        steps.append(Step(length, int((batch.labels != -100).sum()), persistent, live.peak, live.end, live.workspace_peak, loss,
                          time.perf_counter() - started, live.breakdown(depth=3, top=8)))
        print(f"  {model_dir.name}: {length} tokens: peak {steps[-1].peak / GIB:.3f} GiB "
              f"(step {live.peak / GIB:.3f}), loss {loss:.6f}, {steps[-1].seconds:.0f} s", flush=True)
    return steps


def planned(config_json: Path, num_layers: int, step: Step) -> MemoryPlan:
    """plan's estimate for the measured model and batch, on the CPU's terms."""
    arch = Architecture.from_config_json(config_json).with_layers(num_layers)
    workload = Workload(rows=2, length=step.length, response_tokens=step.response_tokens, padded=True)
    return estimate(recipe_config("unused"), arch, workload, device="cpu")


def parts(one: float, two: float) -> tuple[float, float]:
    """(fixed, per layer) from the 1- and 2-layer values."""
    return 2 * one - two, two - one


def compare(config_json: Path, one: Step, two: Step) -> dict[str, dict[str, float]]:
    """Measured and planned parts: fixed and per layer, each split into persistent and step."""
    plan1, plan2 = planned(config_json, 1, one), planned(config_json, 2, two)
    measured = {
        "persistent": parts(one.persistent, two.persistent),
        "activations": parts(one.step_peak, two.step_peak),
        "total": parts(one.peak, two.peak),
    }
    estimated = {
        "persistent": parts(plan1.part("persistent"), plan2.part("persistent")),
        "activations": parts(plan1.part("activations"), plan2.part("activations")),
        "total": parts(plan1.tensor_bytes, plan2.tensor_bytes),
    }
    rows = {}
    for what in measured:
        for index, part in enumerate(("fixed", "per layer")):
            m, e = measured[what][index], estimated[what][index]
            rows[f"{part}, {what}"] = {"measured": m, "plan": e, "ratio": e / m if m else math.nan}
    return rows


def extrapolate(config_json: Path, one: Step, two: Step) -> dict[str, float]:
    """The full-depth figure from the measured parts, next to plan's (both without CUDA terms)."""
    arch = Architecture.from_config_json(config_json)
    fixed, per_layer = parts(one.peak, two.peak)
    plan_full = estimate(recipe_config("unused"), arch, Workload(2, one.length, one.response_tokens, True), device="cpu")
    return {"layers": arch.num_layers, "measured": fixed + arch.num_layers * per_layer, "plan": plan_full.tensor_bytes}


def render(results: dict) -> str:
    lines = [
        "| model | tokens per sequence | part | measured | plan | plan / measured |",
        "|---|---|---|---|---|---|",
    ]
    for model, entry in results["models"].items():
        for row in entry["lengths"]:
            for part, values in row["parts"].items():
                lines.append(
                    f"| {model} | {row['length']} | {part} | {values['measured'] / GIB:.3f} GiB | "
                    f"{values['plan'] / GIB:.3f} GiB | {values['ratio']:.3f} |"
                )
    lines += ["", "| model | tokens per sequence | layers | measured parts, extrapolated | plan (tensors) | step-0 loss (ln 2 = 0.693147) | seconds (1 + 2 layers) |",
              "|---|---|---|---|---|---|---|"]
    for model, entry in results["models"].items():
        for row in entry["lengths"]:
            full = row["full_depth"]
            lines.append(
                f"| {model} | {row['length']} | {full['layers']} | {full['measured'] / GIB:.2f} GiB | "
                f"{full['plan'] / GIB:.2f} GiB | {row['loss'][0]:.6f}, {row['loss'][1]:.6f} | "
                f"{row['seconds'][0]:.0f} + {row['seconds'][1]:.0f} |"
            )
    return "\n".join(lines)


def compare_all(results: dict) -> dict:
    """Fill in the plan side of every row from the raw steps (cheap: rerun after a plan change)."""
    for model, entry in results["models"].items():
        config_json = ROOT / "model_configs" / model / "config.json"
        for row in entry["lengths"]:
            one, two = (Step(**{**s, "at_peak": [tuple(g) for g in s["at_peak"]]}) for s in row["steps"])
            row["parts"] = compare(config_json, one, two)
            row["full_depth"] = extrapolate(config_json, one, two)
    return results


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(models: list[str], lengths: list[int], response_fraction: float, workdir: Path) -> dict:
    started = time.perf_counter()
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": package_versions(),
        "settings": SETTINGS,
        "response_fraction": response_fraction,
        "models": {},
    }
    for model in models:
        config_json = ROOT / "model_configs" / model / "config.json"
        steps = {}
        for layers in (1, 2):
            model_dir = build_model(config_json, layers, workdir / f"{model}-{layers}")
            steps[layers] = measure(model_dir, lengths, response_fraction)
            for path in model_dir.iterdir():  # gigabytes each: keep the disk free
                path.unlink()
        rows = []
        for one, two in zip(steps[1], steps[2]):
            assert one.response_tokens == two.response_tokens, "both models score the same pairs"
            rows.append({
                "length": one.length, "response_tokens": one.response_tokens,
                "loss": [one.loss, two.loss], "seconds": [one.seconds, two.seconds],
                "steps": [asdict(one), asdict(two)],
            })
        results["models"][model] = {"lengths": rows}
    results["seconds"] = round(time.perf_counter() - started)
    return compare_all(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--response-fraction", type=float, default=0.25,
                        help="share of each sequence that is response (the LM head's cost on the CPU)")
    parser.add_argument("--quick", action="store_true", help="Mistral-7B widths at 256 and 512 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--compare", type=Path, metavar="RESULTS_JSON",
                        help="no measuring: compare the raw steps of an earlier run with the current plan")
    args = parser.parse_args(argv)
    models, lengths = (["mistral-7b"], [256, 512]) if args.quick else (args.models, args.lengths)
    if args.compare:
        results = compare_all(json.loads(args.compare.read_text()))
    else:
        with tempfile.TemporaryDirectory() as workdir:
            results = run(models, lengths, args.response_fraction, Path(workdir))
    table = render(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{results['date']}.json"
    write_json(path, results)
    print(f"raw results: {path}")
    worst = max(abs(v["ratio"] - 1) for m in results["models"].values() for r in m["lengths"] for v in r["parts"].values())
    print(f"largest plan/measured gap: {worst:.1%} (tolerance {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
