"""The 24 GB figures, measured: live tensor bytes of real training steps at the recipes' widths.

    python benchmarks/memory_check.py                 # 3 models x 1, 2 layers x 4 lengths (~15 min, 2 cores)
    python benchmarks/memory_check.py --quick         # one model, two short lengths (~2 min)

For Llama-3.1-8B, Qwen2.5-7B and Mistral-7B (their config.json in benchmarks/model_configs/,
with the public values), random models with 1 and with 2 decoder layers are saved and loaded
through the project's nf4 path (`load_base_model(..., quantize=True, dtype=bfloat16)`), get
LoRA r16 on every linear layer with gradient checkpointing (`build_policy`), and train one pair
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

from lora_dpo.architecture import Architecture  # noqa: E402
from lora_dpo.batching import collate  # noqa: E402
from lora_dpo.config import Config, load_config  # noqa: E402
from lora_dpo.data import TokenizedPair  # noqa: E402
from lora_dpo.fileio import write_json, write_text  # noqa: E402
from lora_dpo.logps import sequence_logps  # noqa: E402
from lora_dpo.losses import preference_loss  # noqa: E402
from lora_dpo.model import build_policy, load_base_model  # noqa: E402
from lora_dpo.plan import GIB, MemoryPlan, Workload, estimate  # noqa: E402
from lora_dpo.versions import package_versions  # noqa: E402

MODELS = ("llama3.1-8b", "qwen2.5-7b", "mistral-7b")
LENGTHS = (512, 1024, 2048, 4096)
# The recipes' settings, as the CPU runs them: bf16 compute, and bitsandbytes' 8-bit AdamW,
# whose state is paged_adamw_8bit's without the paging.
SETTINGS = [
    "model.quantization=nf4",
    "model.dtype=bf16",
    "lora.r=16",
    "lora.alpha=32",
    "lora.dropout=0.05",
    "train.per_device_batch_size=1",
    "train.optimizer=adamw_8bit",
    "train.gradient_checkpointing=true",
    "train.logits_chunk_size=512",
]
TOLERANCE = 0.15


def recipe_config(model_dir: str | Path, extra: list[str] = ()) -> Config:
    return load_config(None, [f"model.name_or_path={model_dir}", *SETTINGS, *extra])


def build_model(config_json: Path, num_layers: int, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random bf16 model of `config_json`'s widths with `num_layers` layers, saved like a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**json.loads(config_json.read_text()), "num_hidden_layers": num_layers, **overrides}
    fields.pop("layer_types", None)  # derived from the depth (Qwen2 validates them against it)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(out_dir))
    return out_dir


def make_pair(
    vocab: int, length: int, response_fraction: float, rng: random.Random, shorter_by: int
) -> TokenizedPair:
    """Random ids: chosen fills `length` tokens, rejected is `shorter_by` tokens shorter (a padded
    batch, as real pairs give); the last `response_fraction` of each sequence is the response."""
    prompt = length - max(2, round(length * response_fraction))
    ids = [rng.randrange(vocab) for _ in range(length)]
    return TokenizedPair(
        tuple(ids[:prompt]), tuple(ids[prompt:]), tuple(ids[prompt : length - shorter_by]), 0
    )


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
    policy = build_policy(base, config, gradient_checkpointing=True)
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
        steps.append(
            Step(
                length,
                int((batch.labels != -100).sum()),
                persistent,
                live.peak,
                live.end,
                live.workspace_peak,
                loss,
                time.perf_counter() - started,
                live.breakdown(depth=3, top=8),
            )
        )
        print(
            f"  {model_dir.name}: {length} tokens: peak {steps[-1].peak / GIB:.3f} GiB "
            f"(step {live.peak / GIB:.3f}), loss {loss:.6f}, {steps[-1].seconds:.0f} s",
            flush=True,
        )
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
    plan_full = estimate(
        recipe_config("unused"), arch, Workload(2, one.length, one.response_tokens, True), device="cpu"
    )
    return {
        "layers": arch.num_layers,
        "measured": fixed + arch.num_layers * per_layer,
        "plan": plan_full.tensor_bytes,
    }


def cell(values: dict[str, float]) -> str:
    unit, scale = ("GiB", GIB) if values["measured"] >= GIB / 8 else ("MiB", 2**20)
    return f"{values['measured'] / scale:.3f} / {values['plan'] / scale:.3f} {unit} ({values['ratio']:.3f})"


def render(results: dict) -> str:
    """The measured table: each part as measured / plan (plan / measured), then the full depth."""
    lines = [
        "| model | tokens per sequence | fixed: persistent | fixed: step peak | per layer: persistent | "
        "per layer: step peak | full depth: measured parts | plan | step-0 loss, 1 and 2 layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, entry in results["models"].items():
        for row in entry["lengths"]:
            parts, full = row["parts"], row["full_depth"]
            lines.append(
                f"| {model} | {row['length']} | {cell(parts['fixed, persistent'])} | {cell(parts['fixed, activations'])} | "
                f"{cell(parts['per layer, persistent'])} | {cell(parts['per layer, activations'])} | "
                f"{full['layers']} layers: {full['measured'] / GIB:.2f} GiB | {full['plan'] / GIB:.2f} GiB | "
                f"{row['loss'][0]:.6f}, {row['loss'][1]:.6f} |"
            )
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """benchmarks/memory.md: how it was measured, the table, what carries over to CUDA."""
    versions = ", ".join(
        f"{k} {v}"
        for k, v in results["versions"].items()
        if k in ("torch", "transformers", "peft", "bitsandbytes")
    )
    machine = results["machine"]
    workspace = max(
        s["blas_workspace"] for m in results["models"].values() for r in m["lengths"] for s in r["steps"]
    )
    return MARKDOWN.format(
        date=results["date"],
        cpu=machine["cpu"],
        cores=machine["cores"],
        load=machine.get("load_average", 0.0),
        versions=versions,
        minutes=results.get("seconds", 0) / 60,
        fraction=results["response_fraction"],
        table=render(results),
        tolerance=TOLERANCE,
        worst=worst_gap(results),
        workspace=workspace / 2**20,
        recipes=recipe_table(),
    )


def recipe_table() -> str:
    """plan on CUDA for every shipped 7-8B recipe: what the 24 GB claims rest on."""
    lines = [
        "| recipe | micro-batch | persistent | activations | CUDA context + allocator reserve | total | host (offload) |",
        "|---|---|---|---|---|---|---|",
    ]
    recipes = sorted(
        ((r, load_config(r)) for r in (ROOT.parent / "configs").glob("*-*b*.yaml")),
        key=lambda rc: (rc[0].name.split("-")[0], rc[1].data.max_length),
    )
    for recipe, config in recipes:
        arch = Architecture.from_config_json(
            ROOT / "model_configs" / "-".join(recipe.stem.split("-")[:2]) / "config.json"
        )
        plan = estimate(config, arch)
        host = f"{plan.host_bytes / GIB:.2f} GiB" if plan.host_bytes else "-"
        lines.append(
            f"| `{recipe.name}` | {config.train.per_device_batch_size} x {config.data.max_length} | "
            f"{plan.part('persistent') / GIB:.2f} GiB | {plan.part('activations') / GIB:.2f} GiB | "
            f"{plan.part('cuda') / GIB:.2f} GiB | **{plan.total / GIB:.1f} GiB** | {host} |"
        )
    return "\n".join(lines)


def worst_gap(results: dict) -> float:
    return max(
        abs(v["ratio"] - 1)
        for m in results["models"].values()
        for r in m["lengths"]
        for v in r["parts"].values()
    )


MARKDOWN = """# Memory: lora-dpo plan against measurement

`python benchmarks/memory_check.py` ({date}; {cpu}, {cores} cores, no GPU, shared with other
jobs: load average up to {load:.1f}; {versions}; {minutes:.0f} minutes; raw results in
`results/memory-{date}.json`).

For Llama-3.1-8B, Qwen2.5-7B and Mistral-7B at their real widths (config.json in
`model_configs/`), random models with 1 and with 2 decoder layers went through the project's
own path: `load_base_model(quantize=True, dtype=bfloat16)` (nf4, double quantization),
`build_policy` (r 16, alpha 32, dropout 0.05, every linear layer, non-reentrant gradient
checkpointing), bitsandbytes' 8-bit AdamW (the state of `paged_adamw_8bit`, without the
paging), and one training step per length: `sequence_logps` (logits chunk 512) and
`preference_loss` against reference log-probs from a no-grad `sequence_logps` forward of the
same model (what precompute computes; not a cache file), backward, gradient clipping,
optimizer step. One pair per micro-batch in the padded layout (chosen and rejected as two
rows; the one plan models, see `lora_dpo/plan.py` for why it bounds the packed layouts): chosen
fills the length, rejected is 16 tokens shorter (a padded batch with its attention mask); the last
{fraction:.0%} of each sequence is response. Every step starts from the initial adapter
(LoRA B = 0), so the step-0 loss is ln 2.

Measured: the bytes of the weights, adapters and optimizer state (their storages), and the
high-water mark of live tensor bytes during the step, from every allocation and free of the
CPU allocator (`torch.profiler` memory events; `live_bytes.py`). That count is exact (tested
on known allocations) and includes temporaries inside kernels, such as the dequantized weight
inside bitsandbytes' 4-bit matmul, which a dispatch-mode tracker of op outputs misses. Set
apart: the CPU matmuls' own workspace (oneDNN packing buffers, up to {workspace:.1f} MiB here),
which cuBLAS keeps in a fixed workspace instead. Two layers minus one is the per-layer part;
one layer minus that is the fixed part. Each cell: measured / `lora-dpo plan` for the same
truncated model and batch on the CPU's terms (plan / measured); largest gap {worst:.2%}
(tolerance {tolerance:.0%}). At these widths the step's peak is always the backward of the
last layer, during its recompute (plan's other moment, the LM head's logits chunk, is the
peak in one of the small models of `tests/test_memory.py`, which checks it the same way).

{table}

"Full depth" adds the per-layer part to the fixed part up to the model's depth (32, 28, 32
layers); plan's full-depth figure is its estimate of live tensors for the same batch on the
CPU. Both are extrapolations from 1 and 2 layers, on the evidence that every layer is the
same code: per layer, one checkpointed input [2, T, H] and the layer's weights, adapters and
optimizer state; everything else (the recomputed layer's activations, its backward
transients, the mask, the LM head) exists once.

## The recipes on a 24 GB card, by plan

The same model on CUDA's terms (bool dropout masks, and the CUDA-only terms below) for each
shipped recipe: pairs x tokens per sequence, every row at max_length and padded. Estimates,
until `benchmarks/gpu_check.py` has measured them on a GPU.

{recipes}

## What carries over to a CUDA GPU

The same: every tensor the code path makes. transformers' layers, peft's LoRA, torch's
autograd and checkpointing, sdpa's saved tensors (query, key and value
expanded to every head when a mask rules out grouped-query sdpa, output, log-sum-exp),
transformers' boolean mask and sdpa's additive copy of it, bitsandbytes' packed weights and
their dequantization in backward, the fused LM head's logits chunk. Their sizes do not depend
on the device.

Also the same: the dropout mask backward keeps, a bool per LoRA input element (CUDA's fused
dropout; `lora_dpo.dropout.Dropout16` on the CPU; `DROPOUT_MASK_BYTES` in `plan`).

Different, and modelled per device in `plan` (`CHECKPOINT_RNG_STATE_BYTES`,
`lora_under_autocast`): checkpointing
keeps the CPU generator's 5 KB state per layer (on CUDA that state lives on the host); on the
CPU (fp32) peft casts every LoRA input to the adapter's fp32 and the branch saves fp32 tensors,
while a bf16 decoder (CUDA's default) runs it under autocast and saves bf16 tensors (2 bytes instead of
4, and no fp32 copy of the down projection's input).

CUDA only, not measured here and estimated separately in `plan` (`cuda_only_terms`): the CUDA
context and kernel images (taken as 0.5 GiB), and the caching allocator's reserve above live
tensors (10% of the activations, at least 0.25 GiB). Kernel workspaces differ too: the flash
or memory-efficient attention backward allocates fp32 accumulators while it runs, but that is
after the MLP's saved tensors are freed, below the peak here; bitsandbytes' fused 4-bit kernel
skips the dequantized weight in forward for up to 1536 tokens (plan keeps it, an upper
bound). Paged 8-bit AdamW state lives in CUDA managed memory, outside `max_memory_allocated`.
`benchmarks/gpu_check.py` measures all of these on a GPU.
"""


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


def run(
    models: list[str], lengths: list[int], response_fraction: float, workdir: Path, unfinished: Path
) -> dict:
    """Measure each model; after each, the results so far go to `unfinished`, and a run that
    finds that file (same lengths and response share) goes on from where it stopped."""
    started = time.perf_counter()
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": package_versions(),
        "settings": SETTINGS,
        "lengths": lengths,
        "response_fraction": response_fraction,
        "models": {},
        "seconds": 0,
    }
    if unfinished.is_file():
        earlier = json.loads(unfinished.read_text())
        if (earlier["lengths"], earlier["response_fraction"]) == (lengths, response_fraction):
            results, started = earlier, started - earlier["seconds"]
    for model in models:
        if model in results["models"]:
            continue
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
            rows.append(
                {
                    "length": one.length,
                    "response_tokens": one.response_tokens,
                    "loss": [one.loss, two.loss],
                    "seconds": [one.seconds, two.seconds],
                    "steps": [asdict(one), asdict(two)],
                }
            )
        results["models"][model] = {"lengths": rows}
        results["seconds"] = round(time.perf_counter() - started)
        machine = results["machine"]  # other jobs on the machine slow the run, not the bytes
        machine["load_average"] = max(machine.get("load_average", 0.0), os.getloadavg()[0])
        write_json(unfinished, results)
    return compare_all(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument(
        "--response-fraction",
        type=float,
        default=0.25,
        help="share of each sequence that is response (the LM head's cost on the CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="Mistral-7B widths at 256 and 512 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="RESULTS_JSON",
        help="no measuring: compare the raw steps of an earlier run with the current plan",
    )
    parser.add_argument(
        "--markdown", type=Path, help="write the write-up (default for a full run: benchmarks/memory.md)"
    )
    args = parser.parse_args(argv)
    if (
        args.markdown is None
        and not args.quick
        and args.models == list(MODELS)
        and args.lengths == list(LENGTHS)
    ):
        args.markdown = ROOT / "memory.md"
    models, lengths = (["mistral-7b"], [256, 512]) if args.quick else (args.models, args.lengths)
    if args.compare:
        results = compare_all(json.loads(args.compare.read_text()))
    else:
        unfinished = args.out / "memory-unfinished.json"
        with tempfile.TemporaryDirectory() as workdir:
            results = run(models, lengths, args.response_fraction, Path(workdir), unfinished)
        unfinished.unlink()
    print(render(results))
    path = args.out / f"memory-{results['date']}.json"
    write_json(path, results)
    print(f"raw results: {path}")
    if args.markdown:
        write_text(args.markdown, render_markdown(results))
        print(f"table: {args.markdown}")
    worst = worst_gap(results)
    print(f"largest plan/measured gap: {worst:.1%} (tolerance {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
