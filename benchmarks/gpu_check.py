"""The 24 GB figures on a real GPU, in one command (at most ~8 minutes on one CUDA GPU, no downloads).

    python benchmarks/gpu_check.py                  # on a CUDA machine
    python benchmarks/gpu_check.py --write-readme   # also append the table to benchmarks/README.md
    python benchmarks/gpu_check.py --dry-run        # the same code path on the CPU, tiny shapes, seconds

1. Fixtures, built in code: a byte-level BPE tokenizer (every pseudo-word one token), pairs of
   about 1024, 4096 and 8192 tokens per sequence (rejected a little shorter, so batches are
   padded as real ones are), and a random model with Llama-3.1-8B's widths (all 32 layers,
   128,256 vocabulary) saved in bf16, loaded through lora_dpo's nf4 path with bf16 compute.
2. precompute-ref (`precompute_reference`) over every pair, once: pairs/s.
3. `train` at each length with the matching recipe's micro-batch and offload setting
   (configs/llama3.1-8b.yaml, -4k, -8k; paged 8-bit AdamW): the step-1 loss against ln 2 (the
   untrained policy is the reference), peak `max_memory_allocated` / `max_memory_reserved`
   against `lora-dpo plan` for the same batch, tokens/s (steps after the first).
4. With TRL installed: the same steps on a random 1B-shaped model (Llama-3.2-1B's widths) with
   lora-dpo and with TRL's DPOTrainer (nf4, LoRA, precomputed reference, paged 8-bit AdamW),
   for memory and speed ratios; with Liger-Kernel importable, TRL again with use_liger_kernel.
5. What only a GPU shows of the CUDA paths fixed by reading (`cuda_paths.py`): the dtype
   `auto` picks on this card, whether the fp32-output bf16 matmul exists for the logits, where
   an 8B fp32 merge would be built, and the host syncs per optimizer step of every run above.
Results go to benchmarks/results/gpu-<date>.json and a printed table.

Not run here: this machine has no GPU. The CUDA parts (bf16 compute, bitsandbytes' CUDA
kernels, paged AdamW, pinned-memory offload, the memory statistics) follow the libraries'
documented use and are unverified until someone runs this script on a GPU. `--dry-run` runs
the same code on the CPU (fp32 compute, torch AdamW: what `auto` picks there), and a test runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from cuda_paths import HostSyncs, device_facts  # noqa: E402

from lora_dpo.config import Config, load_config  # noqa: E402
from lora_dpo.fileio import write_json, write_text  # noqa: E402
from lora_dpo.plan import GIB, Architecture, Workload, estimate  # noqa: E402

CONFIGS = ROOT.parent / "configs"
RECIPES = {1024: "llama3.1-8b.yaml", 4096: "llama3.1-8b-4k.yaml", 8192: "llama3.1-8b-8k.yaml"}
STEPS = 3  # optimizer steps per length: one to warm up, two to time
# "padded" is the layout plan models (like for like); "auto", the default, packs pairs into one
# row (FlexAttention on CUDA): no mask, the prompt once, so plan's figure bounds it from above.
LAYOUTS = ("padded", "auto")
# Llama-3.2-1B's widths (the TRL comparison model)
ONE_B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1152,
}
DRY_LENGTHS = {1024: 48, 4096: 96, 8192: 160}  # the recipes' lengths, scaled down for --dry-run


def pseudo_words(count: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def write_pairs(data_dir: Path, lengths: dict[int, int], counts: dict[int, int], words: list[str]) -> Path:
    """pairs-<L>.jsonl per recipe length and pairs.jsonl with all of them: about `length` tokens
    per sequence (half prompt; one token per word), rejected a sixteenth shorter."""
    rng = random.Random(0)
    every = []
    for recipe_length, length in lengths.items():

        def text(n: int) -> str:
            return " ".join(rng.choice(words) for _ in range(n))

        prompt, chosen = length // 2, length - length // 2 - 8
        rejected = chosen - max(2, chosen // 16)
        rows = [
            {"prompt": text(prompt) + "\n", "chosen": text(chosen), "rejected": text(rejected)}
            for _ in range(counts[recipe_length])
        ]
        write_text(data_dir / f"pairs-{recipe_length}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        every += rows
    write_text(data_dir / "pairs.jsonl", "".join(json.dumps(row) + "\n" for row in every))
    return data_dir / "pairs.jsonl"


def build_model(out_dir: Path, tokenizer: Any, device: torch.device, **fields: Any) -> Path:
    """A random bf16 model of Llama-3.1-8B's config with `fields` changed, saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kept = json.loads((ROOT / "model_configs" / "llama3.1-8b" / "config.json").read_text())
    config = AutoConfig.for_model(
        **{
            **kept,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **fields,
        }
    )
    torch.manual_seed(0)
    with device:  # initialised where it will run: fast on a GPU, and 16 GB fits a 24 GB card
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def run_config(
    recipe: str,
    workdir: Path,
    model_dir: Path,
    data: Path,
    max_length: int,
    dry_run: bool,
    layout: str = "auto",
) -> Config:
    """A recipe's settings on the check's model and data (one data config for every length, so
    one reference cache serves them all)."""
    overrides = [
        f"train.layout={layout}",
        f"model.name_or_path={model_dir}",
        f"data.train_path={data}",
        "data.eval_path=",
        "data.format=explicit",
        f"data.max_length={max_length}",
        f"data.max_prompt_length={max_length // 2}",
        f"precompute.cache_dir={workdir / (model_dir.name + '-cache')}",
        f"train.output_dir={workdir / 'runs' / model_dir.name / recipe.removesuffix('.yaml') / layout}",
        "train.overwrite_output_dir=true",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={STEPS}",
        "train.logging_steps=1",
        "train.save_steps=0",
        "train.epochs=1",
    ]
    if dry_run:
        overrides += ["model.dtype=auto", "train.optimizer=auto"]  # fp32 and torch AdamW on the CPU
    return load_config(CONFIGS / recipe, overrides)


class DeviceMemory:
    """Peak allocated / reserved bytes of a phase on CUDA (None elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> DeviceMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.allocated = self.reserved = self.in_use = None
        if self.cuda:
            torch.cuda.synchronize()
            self.allocated, self.reserved = (
                torch.cuda.max_memory_allocated(),
                torch.cuda.max_memory_reserved(),
            )
            free, total = torch.cuda.mem_get_info()
            self.in_use = total - free  # context, reserved blocks and paged optimizer state, now


def planned(config: Config, arch: Architecture, pairs: list, device: torch.device) -> dict[str, float]:
    """plan for this batch: live tensors; what the allocator counts (paged optimizer state is
    managed memory outside it); what it reserves; the whole card."""
    from lora_dpo.batching import collate

    batch = collate(pairs[: config.train.per_device_batch_size], pad_id=0)
    workload = Workload(
        rows=batch.input_ids.shape[0],
        length=batch.input_ids.shape[1],
        response_tokens=int((batch.labels != -100).sum()),
        padded=True,
    )
    plan = estimate(config, arch, workload, device="cuda" if device.type == "cuda" else "cpu")
    paged = sum(i.bytes for i in plan.items if "paged" in i.name)
    reserve = sum(i.bytes for i in plan.items if "reserve" in i.name)
    return {
        "tensors": plan.tensor_bytes,
        "allocated": plan.tensor_bytes - paged,
        "reserved": plan.tensor_bytes - paged + reserve,
        "card": plan.total,
        "rows": workload.rows,
        "length": workload.length,
        "response_tokens": workload.response_tokens,
    }


def lora_dpo_runs(
    model_dir: Path,
    data: Path,
    lengths: dict[int, int],
    counts: dict[int, int],
    workdir: Path,
    device: torch.device,
    dry_run: bool,
) -> dict[str, Any]:
    """precompute once, then `train` per length on that length's pairs, one base load for all."""
    from lora_dpo.cache import open_checked_cache, policy_precision
    from lora_dpo.data import load_preference_data
    from lora_dpo.inputs import RunInputs
    from lora_dpo.model import load_base_model, load_tokenizer
    from lora_dpo.train import train
    from precompute import precompute_reference

    max_length = max(lengths.values()) + 64
    base_config = run_config(RECIPES[1024], workdir, model_dir, data, max_length, dry_run)
    base_config.precompute.batch_size = 2  # 4 x 8192 tokens per forward: a 24 GB card's share
    started = time.perf_counter()
    cache_dir = precompute_reference(base_config)
    build = json.loads((cache_dir / "manifest.json").read_text())["history"][-1]  # this precompute-ref
    result: dict[str, Any] = {
        "precompute": {
            "pairs": build["scored"],
            "batch_size": 2,
            "seconds": build["seconds"],
            "pairs_per_s": build["scored"] / build["seconds"],
            "wall_s": time.perf_counter() - started,
        },
        "lengths": {},
    }
    tokenizer = load_tokenizer(base_config.model)
    pairs, report = load_preference_data(base_config.data, tokenizer, "train")
    precision = policy_precision(base_config, device)
    base = load_base_model(base_config.model, quantize=True, dtype=precision.dtype, device=device)
    arch = Architecture.from_config_json(model_dir / "config.json")
    first = 0
    for recipe_length in lengths:
        subset, first = pairs[first : first + counts[recipe_length]], first + counts[recipe_length]
        result["lengths"][str(recipe_length)] = runs = {}
        for layout in LAYOUTS:
            config = run_config(RECIPES[recipe_length], workdir, model_dir, data, max_length, dry_run, layout)
            cache = open_checked_cache(config, tokenizer, precision)
            inputs = RunInputs(
                tokenizer,
                subset,
                [],
                report,
                cache,
                cache.aligned(subset, "train"),
                cache.aligned([], "eval"),
                base,
                device,
            )
            runs[layout] = entry = {
                "recipe": RECIPES[recipe_length],
                "plan": planned(config, arch, subset, device),
            }
            try:
                with DeviceMemory(device) as memory, HostSyncs(device) as syncs:
                    trained = train(config, inputs)
            except torch.OutOfMemoryError as exc:  # a finding, not a crash of the check
                entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                return result  # the base now carries a half-made adapter: stop here
            base = trained.policy.unload()  # the frozen base without adapters, for the next run
            records = [
                json.loads(line)
                for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()
            ]
            steps = [r for r in records if "loss" in r][1:] or [records[0]]  # after the first: warm
            optimizer_steps = sum("loss" in r for r in records)
            entry.update(
                memory_of(memory),
                host_syncs_per_step=None if syncs.count is None else syncs.count / optimizer_steps,
                step1_loss=next(r["loss"] for r in records if "loss" in r),
                tokens_per_s=_mean([r["tokens_per_s"] for r in steps]),
                step_time_s=_mean([r["step_time_s"] for r in steps]),
            )
    return result


def memory_of(memory: DeviceMemory) -> dict[str, Any]:
    return {
        "max_memory_allocated": memory.allocated,
        "max_memory_reserved": memory.reserved,
        "device_in_use_after": memory.in_use,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def trl_runs(
    model_dir: Path, data_dir: Path, lengths: dict[int, int], workdir: Path, device: torch.device, liger: bool
) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs and micro-batches: nf4, LoRA r16 on all linear layers,
    precomputed reference, gradient checkpointing, paged 8-bit AdamW on CUDA."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lora_dpo.model import disable_cpu_weight_repack

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.begun, self.times, self.losses = 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begun = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.begun)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    results: dict[str, Any] = {}
    for recipe_length, length in lengths.items():
        config = load_config(CONFIGS / RECIPES[recipe_length])
        steps = Steps()
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            device_map={"": str(device)},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            ),
        )
        disable_cpu_weight_repack(model)  # the CPU repack trap (dry run): see lora_dpo.model
        args = DPOConfig(
            output_dir=str(workdir / "trl" / str(recipe_length)),
            beta=0.1,
            learning_rate=5e-5,
            max_steps=STEPS,
            per_device_train_batch_size=config.train.per_device_batch_size,
            gradient_accumulation_steps=1,
            max_length=length + 64,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=config.precompute.batch_size,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=cuda,
            optim="paged_adamw_8bit" if cuda else "adamw_torch",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=42,
            use_cpu=not cuda,
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_liger_kernel=liger,
        )
        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )
        dataset = load_dataset(
            "json", data_files=str(data_dir / f"pairs-{recipe_length}.jsonl"), split="train"
        )
        entry: dict[str, Any] = {}
        try:
            with DeviceMemory(device) as memory:
                trainer = DPOTrainer(
                    model=model,
                    args=args,
                    train_dataset=dataset,
                    processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
                    peft_config=peft_config,
                    callbacks=[steps],
                )
                trainer.train()
            entry.update(
                memory_of(memory),
                step1_loss=steps.losses[0] if steps.losses else math.nan,
                step_time_s=_mean(steps.times[1:] or steps.times),
            )
        except torch.OutOfMemoryError as exc:
            entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        results[str(recipe_length)] = entry
        del model
        if cuda:
            torch.cuda.empty_cache()
    return results


def environment(device: torch.device) -> dict[str, Any]:
    from lora_dpo.versions import package_versions

    info: dict[str, Any] = {
        "device": str(device),
        "versions": package_versions(),
        "torch_cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        torch.ones(1, device=device)  # the context exists from here on
        free, total = torch.cuda.mem_get_info()
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory=total,
            cuda_context=total - free - torch.cuda.memory_reserved(),
        )  # plan takes 0.5 GiB
    return info


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run(device: torch.device, dry_run: bool, workdir: Path) -> dict[str, Any]:
    from lora_dpo.demo.tokenizer import train_bpe_tokenizer

    lengths = DRY_LENGTHS if dry_run else {length: length for length in RECIPES}
    counts = {
        length: STEPS * load_config(CONFIGS / RECIPES[length]).train.per_device_batch_size
        for length in RECIPES
    }
    words = pseudo_words(400, random.Random(0))
    tokenizer = train_bpe_tokenizer(
        [" ".join(words)] * 4, workdir / "tokenizer", vocab_size=1200
    )  # every word a token
    data = write_pairs(workdir / "data", lengths, counts, words)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "dry_run": dry_run,
        "environment": environment(device),
        "lengths": lengths,
        "cuda_paths": device_facts(device),
    }
    started = time.perf_counter()
    model = build_model(workdir / "llama3.1-8b-shaped", tokenizer, device, **(TINY if dry_run else {}))
    results["llama3.1-8b"] = lora_dpo_runs(model, data, lengths, counts, workdir, device, dry_run)
    for path in model.glob("*.safetensors"):  # 16 GB: free the disk
        path.unlink()
    if importable("trl"):
        model = build_model(workdir / "llama3.2-1b-shaped", tokenizer, device, **(TINY if dry_run else ONE_B))
        results["llama3.2-1b"] = {
            "lora_dpo": lora_dpo_runs(model, data, lengths, counts, workdir, device, dry_run),
            "trl": trl_runs(model, data.parent, lengths, workdir, device, liger=False),
        }
        if importable("liger_kernel"):
            results["llama3.2-1b"]["trl_liger"] = trl_runs(
                model, data.parent, lengths, workdir, device, liger=True
            )
    results["seconds"] = round(time.perf_counter() - started)
    return results


def gib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 8 else f"{value / 2**20:.1f} MiB"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    run = results["llama3.1-8b"]
    pre = run["precompute"]
    lines = [
        f"{results['date']}, {env.get('gpu', env['device'])}"
        + (f", CUDA context {gib(env.get('cuda_context'))} (plan: 0.50 GiB)" if "cuda_context" in env else "")
        + f"; precompute {pre['pairs_per_s']:.2f} pairs/s ({pre['pairs']} pairs)",
        "",
        "| recipe | layout | padded batch (rows x tokens) | step-1 loss (ln 2 = 0.6931) | max_memory_allocated | "
        "plan | max_memory_reserved | plan | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    facts = results["cuda_paths"]
    syncs = {
        f"{entry['recipe']} {layout}": entry.get("host_syncs_per_step")
        for runs in run["lengths"].values()
        for layout, entry in runs.items()
    }
    notes = [
        "",
        f"model.dtype auto: {facts['auto_dtype']} ({facts['auto_dtype_reason']}); fp32-output bf16 matmul "
        f"for the logits: {'yes' if facts['fp32_logits_kernel'] else 'no'}; "
        f"an 8B merge at fp32 is built on {facts['merge_8b_fp32_on']} ({facts['merge_8b_fp32_reason']})",
        "host syncs per optimizer step (torch sync debug mode): "
        + ", ".join(f"{name} {'n/a' if n is None else format(n, '.1f')}" for name, n in syncs.items()),
    ]
    for runs in run["lengths"].values():
        for layout, entry in runs.items():
            plan = entry["plan"]
            head = f"| {entry['recipe']} | {layout} | {plan['rows']} x {plan['length']} |"
            if "error" in entry:
                lines.append(f"{head} {entry['error']} | | {gib(plan['allocated'])} | | | |")
                continue
            lines.append(
                f"{head} {entry['step1_loss']:.4f} | {gib(entry['max_memory_allocated'])} | {gib(plan['allocated'])} | "
                f"{gib(entry['max_memory_reserved'])} | {gib(plan['reserved'])} | {entry['tokens_per_s']:,.0f} |"
            )
    if "llama3.2-1b" in results:
        small = results["llama3.2-1b"]
        names = [n for n in ("trl", "trl_liger") if n in small]
        lines += [
            "",
            "1B-shaped model, same pairs and micro-batches: lora-dpo / peer",
            "",
            "| length | peer | peak allocated ratio | step time ratio | peer step-1 loss |",
            "|---|---|---|---|---|",
        ]
        for length, runs in small["lora_dpo"]["lengths"].items():
            ours = runs.get("auto", {})  # lora-dpo's default against TRL's
            for name in names:
                peer = small[name].get(length, {"error": "not run"})
                lines.append(
                    f"| {length} | {name} | {ratio(ours.get('max_memory_allocated'), peer.get('max_memory_allocated'))} | "
                    f"{ratio(ours.get('step_time_s'), peer.get('step_time_s'))} | "
                    f"{peer.get('error') or format(peer['step1_loss'], '.4f')} |"
                )
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the code path in seconds"
    )
    parser.add_argument(
        "--write-readme", action="store_true", help="append the table to benchmarks/README.md"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="where gpu-<date>.json goes")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --dry-run runs the same code path on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(device, args.dry_run, Path(workdir))
    table = render(results)
    print(table)
    name = f"gpu-{'dry-run-' if args.dry_run else ''}{results['date']}.json"
    write_json(args.out / name, results)
    print(f"raw results: {args.out / name}")
    if args.write_readme:
        readme = ROOT / "README.md"
        title = "GPU check (dry run on the CPU, tiny shapes)" if args.dry_run else "GPU check"
        write_text(readme, readme.read_text().rstrip("\n") + f"\n\n## {title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
